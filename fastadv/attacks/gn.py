"""GN: Gaussian noise, clipped to [0, 1]. A baseline that uses neither labels nor gradients."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.arg_checks import check_number
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack


def gn_loop(forward, x, y=None, *, std, engine=EXACT):
    """clamp(x + std * N(0, 1), 0, 1), the noise drawn on x's device in x's layout."""
    return torch.clamp(x + std * torch.randn_like(x), min=0, max=1)


def gn(model: Model, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, std: float = 0.1,
       backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Add Gaussian noise of standard deviation std (>= 0) and clip to [0, 1].

    Arguments:
        model: the classifier (only its device is used). images: [N, ...] floats in [0, 1].
        labels: ignored (may be None). std: the noise's standard deviation.
        **engine: fastadv.engine.EngineOptions (batch_size chunks the draw; the others change nothing).
    Returns the noisy images on the model's device. Bit-exact with torchattacks.GN.
    """
    std = check_number(std, "std")
    validation.check_images(images)
    if labels is None:  # run_functional requires labels; GN never reads them
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    return run_functional(gn_loop, model, images, labels, engine=engine, std=std)


class GN(Attack):
    r"""Add Gaussian noise.

    Output: clamp(x + std * N(0, 1), 0, 1), the noise drawn from the attack device's
    generator in the images' memory layout. Labels are not used; default mode only.
    Equivalence: bit-exact with torchattacks 3.5.1 GN (same seed, same device).

    Arguments:
        model (nn.Module): model to attack (its device is used).
        std (float): standard deviation of the noise. (Default: 0.1)
        backend, **engine: see fastadv.Attack.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: ignored; output: (N, C, H, W).

    Example::
        >>> attack = fastadv.GN(model, std=0.1)
        >>> adv_images = attack(images)
    """

    def __init__(self, model: nn.Module, std: float = 0.1, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("GN", model, backend=backend, **engine)
        self.std = check_number(std, "std")
        self.supported_mode = ["default"]

    def _needs_labels(self):
        return False

    def forward(self, images, labels=None):
        x, _ = self._prepare(images, None)
        return gn_loop(self.get_logits, x, std=self.std)
