"""PGD with Linf budget (Madry et al., 2018)."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import ops, slots, validation
from fastadv.attack import Attack
from fastadv.backend import resolve
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def uniform_start(x, eps, backend=None):
    """clamp(x + U(-eps, eps), 0, 1), drawing like the reference (device RNG, x's layout)."""
    if isinstance(eps, torch.Tensor):
        return ops.random_start(x, torch.empty_like(x).uniform_(-1, 1), eps, backend=backend)
    return ops.random_start(x, torch.empty_like(x).uniform_(-eps, eps), backend=backend)


def linf_iterations(grad, adv, x, *, eps, alpha, steps, backend=None, engine=EXACT, model=None, deterministic=True):
    """steps fused Linf sign steps from adv (PGD, EOTPGD, RFGSM, TPGD, Jitter share this loop).

    grad(adv) is the attack's gradient (with succeeded()/keep() for early stopping; with
    per_sample()/on_slots() when it can run on slots). deterministic: False when grad draws
    randomness each step (EOT), which rules out slots and the cycle exit.
    """

    def update(adv, g, x, eps, alpha, out=None):
        return ops.linf_step(adv, x, g, alpha=alpha, eps=eps, backend=backend, out=out, consume_grad=True)

    return slots.iterations(update, grad, adv, steps, {"x": x, "eps": eps, "alpha": alpha}, engine=engine,
                            model=model, backend_name=resolve(backend, x.device), deterministic=deterministic)


def pgd_loop(forward, x, y, *, eps, alpha, steps, random_start=True, targeted=False, backend=None, engine=EXACT):
    """The PGD iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    adv = uniform_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)

    adv = linf_iterations(grad, adv, x, eps=eps, alpha=alpha, steps=steps, backend=backend, engine=engine, model=forward)
    return adv.contiguous(memory_format=fmt)


def pgd(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
        steps: int = 10, random_start: bool = True, targeted: bool = False, backend: Optional[str] = None,
        **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Projected gradient descent in the Linf ball.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations. random_start: start from a uniform point in the eps-ball.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.PGD
    for float eps and alpha (a per-sample eps draws its start as U(-1, 1) * eps).
    """
    return run_functional(
        pgd_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), random_start=random_start, targeted=targeted, backend=backend,
        copy_images=False, slots=True,
    )


class PGD(Attack):
    r"""PGD from 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083].

    Distance measure: Linf. Equivalence: bit-exact with torchattacks 3.5.1 PGD (same
    seed, same device), random start on or off, every targeted mode.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        random_start (bool): start from a uniform point in the eps-ball. (Default: True)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PGD(model, eps=8/255, alpha=1/255, steps=10, random_start=True)
        >>> adv_images = attack(images, labels)
    """

    runs_on_slots = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("PGD", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.random_start = random_start
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels, copy_images=False)  # the loop only reads x
        return pgd_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            random_start=self.random_start, targeted=self.targeted, backend=self.backend, engine=self.engine,
        )
