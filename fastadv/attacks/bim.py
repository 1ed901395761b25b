"""BIM (iterative FGSM, Kurakin et al., 2017): sign steps clipped to the eps-box directly. Linf."""
from typing import Optional

import torch
import torch.nn as nn

from fastadv import ops, slots, validation
from fastadv.attack import Attack
from fastadv.backend import resolve
from fastadv.engine import EXACT, CrossEntropyGradient, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack
from fastadv.reference import per_sample


def paper_steps(eps: float) -> int:
    """The paper's count, min(eps*255 + 4, 1.25 * eps*255), which the reference takes for steps=0."""
    return int(min(eps * 255 + 4, 1.25 * eps * 255))


def box(x, eps):
    """BIM's clip bounds max(x - eps, 0) and min(x + eps, 1), in x's dtype, computed once.

    The reference clips adv to [max(x - eps, 0), x + eps] then to <= 1 (PGD instead
    adds a clamped delta back to x, which rounds differently); both bounds lie in
    [0, 1], so one clamp between them gives its numbers.
    """
    e = per_sample(eps.to(torch.float32), x) if isinstance(eps, torch.Tensor) else eps
    lo = torch.clamp((x - e).to(x.dtype), min=0)
    hi = torch.clamp((x + e).to(x.dtype), max=1)
    return lo, hi


def bim_loop(forward, x, y, *, eps, alpha, steps, targeted=False, backend=None, engine=EXACT):
    """The BIM iteration on inputs the caller owns; returns the last iterate."""
    fmt = validation.memory_format(x)
    x = engine.layout(x)
    lo, hi = box(x, eps)
    grad = CrossEntropyGradient(forward, y, targeted, engine.precision)

    def update(adv, g, lo, hi, alpha, out=None):
        # The fused FGSM step (adv + alpha * sign(g), clip to [0, 1]), then the box.
        step = ops.linf_step(adv, adv, g, alpha=alpha, eps=0.0, project=False, backend=backend, out=out,
                             consume_grad=True)
        return torch.clamp(step, min=lo, max=hi, out=step)

    adv = slots.iterations(update, grad, x.clone(), steps, {"lo": lo, "hi": hi, "alpha": alpha}, engine=engine,
                           model=forward, backend_name=resolve(backend, x.device))
    return adv.contiguous(memory_format=fmt)


def check_bim_steps(steps, eps):
    steps = validation.check_steps(steps)
    if steps == 0:
        if isinstance(eps, torch.Tensor):
            raise ValueError("steps=0 (the paper's count from eps) needs a float eps, got a per-sample tensor")
        return paper_steps(eps)
    return steps


def bim(model: Model, images: torch.Tensor, labels: torch.Tensor, *, eps: Budget = 8 / 255, alpha: Budget = 2 / 255,
        steps: int = 10, targeted: bool = False, backend: Optional[str] = None,
        **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Basic iterative method (iterative FGSM) in the Linf ball.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        eps, alpha: budget and step size, floats or per-sample [N] tensors.
        steps: iterations; 0 takes the paper's min(eps*255 + 4, 1.25*eps*255) (float eps).
        **engine: fastadv.engine.EngineOptions (precision, channels_last, early_stop, batch_size, cuda_graph).
    Returns the adversarial images on the model's device. Bit-exact with torchattacks.BIM
    (float eps and alpha).
    """
    if not isinstance(eps, torch.Tensor):
        eps = validation.check_budget(eps, "eps")
    return run_functional(
        bim_loop, model, images, labels, budgets=("eps", "alpha"), engine=engine, eps=eps, alpha=alpha,
        steps=check_bim_steps(steps, eps), targeted=targeted, backend=backend, slots=True,
    )


class BIM(Attack):
    r"""BIM (iterative FGSM) from 'Adversarial Examples in the Physical World'
    [https://arxiv.org/abs/1607.02533].

    Distance measure: Linf. Each step: adv + alpha * sign(grad), clipped to
    [max(x - eps, 0), min(x + eps, 1)]. No random start. steps=0 takes the paper's
    count, int(min(eps*255 + 4, 1.25*eps*255)), as the reference does.

    Equivalence: bit-exact with torchattacks 3.5.1 BIM on every backend (the step
    is the fused sign step and clip, then one clamp between bounds computed once),
    every targeted mode. early_stop is supported. For fp16/bf16 images the
    reference's float masks turn the iterate into fp32 (and then crash a
    half-precision model); here the clip is the same in the images' dtype.

    Arguments:
        model (nn.Module): model to attack.
        eps (float): maximum perturbation. (Default: 8/255)
        alpha (float): step size. (Default: 2/255)
        steps (int): number of steps; 0 for the paper's count. (Default: 10)
        backend, **engine: see fastadv.Attack (exact mode by default).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.BIM(model, eps=8/255, alpha=2/255, steps=10)
        >>> adv_images = attack(images, labels)
    """

    runs_on_slots = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("BIM", model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.alpha = validation.check_budget(alpha, "alpha", positive=True)
        self.steps = check_bim_steps(steps, self.eps)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return bim_loop(
            self.get_logits, x, self._targets(x, y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            targeted=self.targeted, backend=self.backend, engine=self.engine,
        )
