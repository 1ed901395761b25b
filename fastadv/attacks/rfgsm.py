"""R+FGSM: a random sign step, then iterative sign steps (Tramèr et al., 2018). Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import ops, validation
from fastadv.attack import Attack
from fastadv.attacks.pgd import linf_iterations
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def rfgsm_start(x, alpha, backend=None):
    """clamp(x + alpha * sign(randn_like(x)), 0, 1), drawn as the reference draws it."""
    noise = torch.randn_like(x).sign()
    if isinstance(alpha, torch.Tensor):
        return ops.random_start(x, noise, alpha, backend=backend)
    return ops.random_start(x, alpha * noise, backend=backend)


def rfgsm_loop(forward, x, y, *, eps, alpha, steps, targeted=False, backend=None, engine=EXACT):
    """The R+FGSM iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    adv = engine.layout(rfgsm_start(x, alpha, backend))  # noise in the caller's layout, as the reference
    x = engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)

    adv = linf_iterations(grad, adv, x, eps=eps, alpha=alpha, steps=steps, backend=backend, engine=engine, model=forward)
    return adv.contiguous(memory_format=fmt)


def rfgsm(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
          steps: int = 10, targeted: bool = False, backend: Optional[str] = None,
          **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """R+FGSM as torchattacks runs it: a random sign step of size alpha, then steps PGD steps of size alpha.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.RFGSM.
    """
    return run_functional(
        rfgsm_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=validation.check_steps(steps), targeted=targeted, backend=backend,
        copy_images=False, slots=True,
    )


class RFGSM(Attack):
    r"""R+FGSM from 'Ensemble Adversarial Training: Attacks and Defences'
    [https://arxiv.org/abs/1705.07204].

    Distance measure: Linf. As in torchattacks (not the paper's single (eps - alpha)
    step): adv = clamp(x + alpha * sign(N(0, 1)), 0, 1), then steps PGD steps of size
    alpha with projection onto the eps-ball and [0, 1]. The start is not projected,
    so with steps=0 and alpha > eps the output may leave the eps-ball, as there.
    Equivalence: bit-exact with torchattacks 3.5.1 RFGSM (same seed, same device),
    every targeted mode.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps. (Default: 10)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.RFGSM(model, eps=8/255, alpha=2/255, steps=10)
        >>> adv_images = attack(images, labels)
    """

    runs_on_slots = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("RFGSM", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels, copy_images=False)  # the loop only reads x
        return rfgsm_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            targeted=self.targeted, backend=self.backend, engine=self.engine,
        )
