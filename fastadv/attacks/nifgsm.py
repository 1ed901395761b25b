"""NI-FGSM and SI-NI-FGSM (Lin et al., 2020): MI-FGSM with the gradient taken at a
Nesterov look-ahead point, averaged over m scaled copies for SI-NI-FGSM. Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.mifgsm import DecayedMomentumAttack
from fastadv.attacks.momentum import (
    Lookahead, ScaledCopiesGradient, check_count, momentum_iterations, refuse_early_stop,
)
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def nifgsm_loop(forward, x, y, *, eps, alpha, steps, decay=1.0, m=None, targeted=False, backend=None, engine=EXACT,
                name="NIFGSM"):
    """The NI-FGSM iteration (SI-NI-FGSM when m is given) on inputs the caller owns; returns the last iterate."""
    refuse_early_stop(engine, name, "its gradients are taken at the look-ahead point, not at the iterate")
    fmt = validation.memory_format(x)
    x = engine.layout(x)
    if m is None:
        grad = CrossEntropyGradient(forward, y, targeted, engine.precision)
    else:
        grad = ScaledCopiesGradient([
            CrossEntropyGradient(lambda p, s=2.0**i: forward(p / s), y, targeted, engine.precision) for i in range(m)
        ])
    momentum = torch.zeros_like(x)
    adv = momentum_iterations(
        Lookahead(grad, momentum, decay * alpha), x.clone(), x, momentum, eps=eps, alpha=alpha, steps=steps,
        decay=decay, backend=backend, engine=engine, model=forward,
    )
    return adv.contiguous(memory_format=fmt)


def nifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: float = 2 / 255,
           steps: int = 10, decay: float = 1.0, targeted: bool = False, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Nesterov iterative FGSM.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps: budget, a float or a per-sample [N] tensor. alpha: step size (float).
        steps: iterations. decay: momentum factor (float >= 0).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size, cuda_graph; no early_stop).
    Returns the adversarial images on the model's device. The 'torch' backend is
    bit-exact with torchattacks.NIFGSM (float eps).
    """
    return run_functional(
        nifgsm_loop, model, images, labels, budgets=("eps",), engine=engine, eps=eps,
        alpha=validation.check_budget(alpha, "alpha", positive=True), steps=validation.check_steps(steps),
        decay=validation.check_budget(decay, "decay"), targeted=targeted, backend=backend,
    )


def sinifgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: float = 2 / 255,
             steps: int = 10, decay: float = 1.0, m: int = 5, targeted: bool = False, backend: Optional[str] = None,
             **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Scale-invariant Nesterov iterative FGSM: as nifgsm, the gradient averaged over the
    look-ahead point divided by 1, 2, ..., 2**(m - 1). Bit-exact with torchattacks.SINIFGSM
    on the 'torch' backend (float eps)."""
    return run_functional(
        nifgsm_loop, model, images, labels, budgets=("eps",), engine=engine, eps=eps,
        alpha=validation.check_budget(alpha, "alpha", positive=True), steps=validation.check_steps(steps),
        decay=validation.check_budget(decay, "decay"), m=check_count(m, "m"), targeted=targeted, backend=backend,
        name="SINIFGSM",
    )


class NIFGSM(DecayedMomentumAttack):
    r"""NI-FGSM from 'Nesterov Accelerated Gradient and Scale Invariance for Adversarial
    Attacks' [https://arxiv.org/abs/1908.06281].

    Distance measure: Linf. Each step takes the gradient at the look-ahead point
    adv + decay * alpha * momentum, then MI-FGSM's update (g / mean(|g|) + decay *
    momentum, sign step, projection and clip). No random start.

    Equivalence: bit-exact with torchattacks 3.5.1 NIFGSM on the 'torch' backend (the
    CPU default), every targeted mode; on Triton the momentum step sums |grad| in
    another order (bound in the MIFGSM docstring). early_stop is refused (the logits
    are the look-ahead point's).

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations. (Default: 10)
        decay (float): momentum factor. (Default: 1.0)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Example::
        >>> attack = fastadv.NIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=1.0)
        >>> adv_images = attack(images, labels)
    """

    name = "NIFGSM"
    loop = staticmethod(nifgsm_loop)


class SINIFGSM(Attack):
    r"""SI-NI-FGSM from 'Nesterov Accelerated Gradient and Scale Invariance for
    Adversarial Attacks' [https://arxiv.org/abs/1908.06281].

    Distance measure: Linf. NI-FGSM whose gradient is the mean of the gradients at the
    look-ahead point divided by 2**i, i = 0 .. m - 1 (m forward and backward passes a
    step), summed from zeros in that order as the reference does.

    Equivalence: bit-exact with torchattacks 3.5.1 SINIFGSM on the 'torch' backend (the
    CPU default), every targeted mode; on Triton the momentum step sums |grad| in
    another order (bound in the MIFGSM docstring). early_stop is refused.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of iterations. (Default: 10)
        decay (float): momentum factor. (Default: 1.0)
        m (int): number of scaled copies. (Default: 5)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Example::
        >>> attack = fastadv.SINIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=1.0, m=5)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 decay: float = 1.0, m: int = 5, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("SINIFGSM", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.steps = validation.check_steps(steps)
        self.decay = validation.check_budget(decay, "decay")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.m = check_count(m, "m")
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return nifgsm_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            decay=self.decay, m=self.m, targeted=self.targeted, backend=self.backend, engine=self.engine,
            name=self.attack,
        )
