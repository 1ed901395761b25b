"""VANILA: the identity attack (returns a copy of the inputs), a baseline for clean accuracy."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack


def vanila_loop(forward, x, y=None, *, engine=EXACT):
    return x  # run_functional already hands over a copy on the model's device


def vanila(model: Model, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """A copy of images on the model's device (validated like every attack's input).

    Arguments:
        model: the classifier (only its device is used). images: [N, ...] floats in [0, 1].
        labels: ignored (may be None). backend, **engine: accepted for uniformity; change nothing.
    Bit-exact with torchattacks.VANILA.
    """
    validation.check_images(images)
    if labels is None:  # run_functional requires labels; VANILA never reads them
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    return run_functional(vanila_loop, model, images, labels, engine=engine)


class VANILA(Attack):
    r"""The vanilla "attack": returns the input images unchanged (a copy on the
    attack's device). Labels are not used; default mode only. Equivalence: bit-exact
    with torchattacks 3.5.1 VANILA.

    Arguments:
        model (nn.Module): model to attack (its device is used).
        backend, **engine: see fastadv.Attack (nothing to change here).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: ignored; output: (N, C, H, W).

    Example::
        >>> attack = fastadv.VANILA(model)
        >>> adv_images = attack(images)
    """

    def __init__(self, model: nn.Module, *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("VANILA", model, backend=backend, **engine)
        self.supported_mode = ["default"]

    def _needs_labels(self):
        return False

    def forward(self, images, labels=None):
        x, _ = self._prepare(images, None)
        return x
