"""Type aliases of the public API (the signatures of the attacks, fit and evaluate)."""
from typing import Callable, Optional, TypedDict, Union

import torch

Model = Callable[[torch.Tensor], torch.Tensor]
"""A classifier: images in [0, 1] to logits [N, C] (an nn.Module, or any such callable)."""

Budget = Union[float, torch.Tensor]
"""A budget or step size: a float, or a per-sample [N] tensor (plain functions only)."""


class EngineKwargs(TypedDict, total=False):
    """The keywords every attack takes for fastadv.engine.EngineOptions (``**engine``)."""

    precision: Optional[str]
    channels_last: bool
    early_stop: bool
    batch_size: Optional[int]
    cuda_graph: Optional[bool]
    fast: bool
    cycle_exit: Optional[bool]
