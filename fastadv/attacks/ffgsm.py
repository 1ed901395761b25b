"""FFGSM ("fast" FGSM): one sign step from a uniform random start (Wong et al., 2020). Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import draws, ops, validation
from fastadv.attack import Attack
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def ffgsm_start(x, eps, backend=None):
    """clamp(x + U(-eps, eps), 0, 1), drawn as the reference draws it.

    The reference fills randn_like(x) and then overwrites it with uniform_, so the
    device RNG is consumed by a normal draw and then a uniform draw (see fastadv.draws).
    """
    if isinstance(eps, torch.Tensor):
        return ops.random_start(x, draws.uniform_after_discarded_normal(x, -1, 1), eps, backend=backend)
    return ops.random_start(x, draws.uniform_after_discarded_normal(x, -eps, eps), backend=backend)


def ffgsm_loop(forward, x, y, *, eps, alpha, targeted=False, backend=None, engine=EXACT):
    """Random start, one sign step of size alpha, projection and clip."""
    fmt = validation.memory_format(x)
    adv = engine.layout(ffgsm_start(x, eps, backend))  # noise in the caller's layout, as the reference
    x = engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)(adv)
    adv = ops.linf_step(adv, x, grad, alpha=alpha, eps=eps, backend=backend, consume_grad=True)
    return adv.contiguous(memory_format=fmt)


def ffgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 10 / 255,
          targeted: bool = False, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Fast FGSM: uniform random start in the eps-ball, then one sign step of size alpha.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size, ...).
    Returns the adversarial images on the model's device. Bit-exact with
    torchattacks.FFGSM for float eps and alpha (a per-sample eps draws its start as
    U(-1, 1) * eps).
    """
    return run_functional(
        ffgsm_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        targeted=targeted, backend=backend,
        copy_images=False,
    )


class FFGSM(Attack):
    r"""FFGSM from 'Fast is better than free: Revisiting adversarial training'
    [https://arxiv.org/abs/2001.03994].

    Distance measure: Linf. adv = clamp(x + U(-eps, eps), 0, 1), then one step
    adv + alpha * sign(grad), projection onto the eps-ball and [0, 1]. Equivalence:
    bit-exact with torchattacks 3.5.1 FFGSM (same seed, same device; the RNG is
    consumed by randn_like then uniform_, as there), every targeted mode.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 10/255)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.FFGSM(model, eps=8/255, alpha=10/255)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 10 / 255, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("FFGSM", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels, copy_images=False)  # the loop only reads x
        return ffgsm_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha,
            targeted=self.targeted, backend=self.backend, engine=self.engine,
        )
