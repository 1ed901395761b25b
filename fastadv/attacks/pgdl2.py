"""PGD with L2 budget (Madry et al., 2018)."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import loop, ops, reference, validation
from fastadv.attack import Attack
from fastadv.backend import resolve
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack


def l2_start(x, eps, backend=None):
    """The reference's L2 start: a Gaussian direction scaled to radius U(0, 1) * eps.

    As in torchattacks the radius is uniform, so the start is not uniform in the ball.
    """
    delta = torch.empty_like(x).normal_()
    norm = reference.l2_norm(delta)
    r = torch.zeros_like(norm).uniform_(0, 1)
    scale = (r / norm).float() * eps if isinstance(eps, torch.Tensor) else r / norm * eps
    return ops.random_start(x, delta, scale, backend=backend)


def pgdl2_loop(forward, x, y, *, eps, alpha, steps, random_start=True, eps_for_division=1e-10, targeted=False,
               backend=None, engine=EXACT):
    """The PGDL2 iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    adv = l2_start(x, eps, backend) if random_start else x.clone()  # noise in the caller's layout
    adv, x = engine.layout(adv), engine.layout(x)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)

    def update(adv, g, x, eps, out=None):
        return ops.l2_step(adv, x, g, alpha=alpha, eps=eps, div_eps=eps_for_division, backend=backend, out=out,
                           consume_grad=True)

    adv = loop.run(
        update, grad, adv, steps, {"x": x, "eps": eps}, early_stop=engine.early_stop,
        cuda_graph=engine.use_graph(x, resolve(backend, x.device)), model=forward,
    )
    return adv.contiguous(memory_format=fmt)


def pgdl2(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 1.0, alpha: float = 0.2,
          steps: int = 10, random_start: bool = True, eps_for_division: float = 1e-10, targeted: bool = False,
          backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Projected gradient descent in the L2 ball.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps: L2 budget, a float or a per-sample [N] tensor. alpha: step size (float).
        steps: iterations. random_start: start from the reference's random point in the ball.
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. The 'torch' backend is
    bit-exact with torchattacks.PGDL2; the Triton kernels sum the norms in another
    order (see tests/test_kernels.py for the bound).
    """
    return run_functional(
        pgdl2_loop, model, images, labels, budgets=("eps",), engine=engine, eps=eps,
        alpha=validation.check_budget(alpha, "alpha", positive=True), steps=validation.check_steps(steps),
        random_start=random_start, eps_for_division=eps_for_division, targeted=targeted, backend=backend,
    )


class PGDL2(Attack):
    r"""PGD with L2 budget from 'Towards Deep Learning Models Resistant to Adversarial
    Attacks' [https://arxiv.org/abs/1706.06083].

    Distance measure: L2. Equivalence: bit-exact with torchattacks 3.5.1 PGDL2 on the
    'torch' backend (the CPU default); on the Triton kernels the per-sample norms are
    summed in another order (bound in tests/test_kernels.py). Like the reference, the
    random start's radius is uniform, so the start is not uniform in the ball.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 1.0)
        alpha (float): step size. (Default: 0.2)
        steps (int): number of steps. (Default: 10)
        random_start (bool): using random initialization of delta. (Default: True)
        eps_for_division (float): added to the gradient norm before dividing. (Default: 1e-10)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 random_start: bool = True, eps_for_division: float = 1e-10, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("PGDL2", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = validation.check_steps(steps)
        self.random_start = random_start
        self.eps_for_division = validation.check_budget(eps_for_division, "eps_for_division")
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return pgdl2_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            random_start=self.random_start, eps_for_division=self.eps_for_division,
            targeted=self.targeted, backend=self.backend, engine=self.engine,
        )
