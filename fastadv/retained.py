"""Several input gradients from one forward, as the references take them: one backward
per output, the graph retained between them (DeepFool, JSMA, FAB).

A ``torch.compile``d model whose backward was first compiled for a single use donates
its saved buffers, and then refuses any backward that retains the graph ("compiled with
non-empty donated buffers"); which use comes first depends on what ran before on the
same compiled model. The references crash there. Here every gradient then reruns the
forward: the same graph and the same values, one forward per gradient instead of one.
"""
from typing import Callable, Optional

import torch

_DONATED = "donated buffers"


class SharedForward:
    """``forward(x)`` once (``.output``), then ``grad(select)`` = d select(output) / dx."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        self.forward = forward
        self.x = x
        self.output = forward(x)
        self._rerun = False

    def grad(self, select: Callable[[torch.Tensor], torch.Tensor], *, retain: bool = True,
             grad_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self._rerun:
            try:
                return torch.autograd.grad(select(self.output), self.x, grad_output, retain_graph=retain)[0]
            except RuntimeError as exc:
                if _DONATED not in str(exc):
                    raise
                self._rerun = True  # nothing was computed: the check comes before the backward
        return torch.autograd.grad(select(self.forward(self.x)), self.x, grad_output)[0]
