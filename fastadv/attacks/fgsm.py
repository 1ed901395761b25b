"""FGSM: one signed-gradient step (Goodfellow et al., 2015). Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import ops, validation
from fastadv.attack import Attack
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def fgsm_loop(forward, x, y, *, eps, targeted=False, backend=None, engine=EXACT):
    """clamp(x + eps * sign(grad), 0, 1) on inputs the caller owns."""
    xr = engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)(xr)
    adv = ops.linf_step(xr, xr, grad, alpha=eps, eps=eps, project=False, backend=backend, consume_grad=True)
    return adv.contiguous(memory_format=validation.memory_format(x))


def fgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, targeted: bool = False,
         backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Fast Gradient Sign Method.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps: Linf budget, a float or a per-sample [N] tensor.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size, ...).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.FGSM.
    """
    return run_functional(fgsm_loop, model, images, labels, budgets=("eps",), engine=engine, eps=eps, targeted=targeted,
                          backend=backend, copy_images=False)


class FGSM(Attack):
    r"""FGSM from 'Explaining and harnessing adversarial examples' [https://arxiv.org/abs/1412.6572].

    Distance measure: Linf. Equivalence: bit-exact with torchattacks 3.5.1 FGSM.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        backend, **engine: see fastadv.Attack.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.FGSM(model, eps=8/255)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("FGSM", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels, copy_images=False)  # the loop only reads x
        return fgsm_loop(self.get_logits, x, self._targets(x, y), eps=self.eps, targeted=self.targeted,
                         backend=self.backend, engine=self.engine)
