"""EOT-PGD: PGD on the sum of eot_iter gradients, for randomized models (Athalye et al., 2018). Linf."""
import numbers
from typing import Optional

import torch
import torch.nn as nn

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.pgd import linf_iterations, uniform_start
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def check_eot_iter(eot_iter) -> int:
    if isinstance(eot_iter, bool) or not isinstance(eot_iter, numbers.Integral):
        raise TypeError(f"eot_iter must be an int, got {type(eot_iter).__name__}")
    if eot_iter < 1:
        raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
    return int(eot_iter)


class SummedGradient:
    """The sum of eot_iter gradient evaluations at the same point, accumulated like the
    reference (zeros, then +=). Early stopping looks at the last evaluation's logits."""

    def __init__(self, gradient, eot_iter: int):
        self.gradient = gradient
        self.eot_iter = eot_iter

    def __call__(self, adv: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(adv)
        for _ in range(self.eot_iter):
            total += self.gradient(adv)
        return total

    def succeeded(self) -> torch.Tensor:
        return self.gradient.succeeded()

    def keep(self, mask: torch.Tensor) -> None:
        self.gradient.keep(mask)


def eotpgd_loop(forward, x, y, *, eps, alpha, steps, eot_iter=2, random_start=True, targeted=False, backend=None,
                engine=EXACT):
    """The EOT-PGD iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    adv = uniform_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    grad = SummedGradient(CrossEntropyGradient(forward, y, targeted, engine.precision), eot_iter)

    adv = linf_iterations(grad, adv, x, eps=eps, alpha=alpha, steps=steps, backend=backend, engine=engine, model=forward,
                          deterministic=False)  # EOT exists for randomized models: no cycle exit
    return adv.contiguous(memory_format=fmt)


def eotpgd(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
           steps: int = 10, eot_iter: int = 2, random_start: bool = True, targeted: bool = False,
           backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """PGD with Expectation over Transformation (summed gradients of eot_iter forward passes).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations. eot_iter: gradients summed per step (>= 1).
        random_start: start from a uniform point in the eps-ball.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with
    torchattacks.EOTPGD for float eps and alpha (a per-sample eps draws its start as
    U(-1, 1) * eps).
    """
    return run_functional(
        eotpgd_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), eot_iter=check_eot_iter(eot_iter), random_start=random_start,
        targeted=targeted, backend=backend,
    )


class EOTPGD(Attack):
    r"""EOT-PGD from 'Comment on "Adv-BNN: Improved Adversarial Defense through Robust
    Bayesian Neural Network"' [https://arxiv.org/abs/1907.00895].

    Distance measure: Linf. Each step sums the input gradients of eot_iter forward
    passes at the same point (a stochastic model gives different ones), then takes
    PGD's sign step, projection and clip. Equivalence: bit-exact with torchattacks
    3.5.1 EOTPGD (same seed, same device), random start on or off, every targeted mode.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        eot_iter (int): number of gradients summed per step. (Default: 2)
        random_start (bool): start from a uniform point in the eps-ball. (Default: True)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.EOTPGD(model, eps=8/255, alpha=2/255, steps=10, eot_iter=2)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 eot_iter: int = 2, random_start: bool = True, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("EOTPGD", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.eot_iter = check_eot_iter(eot_iter)
        self.random_start = random_start
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return eotpgd_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            eot_iter=self.eot_iter, random_start=self.random_start, targeted=self.targeted,
            backend=self.backend, engine=self.engine,
        )
