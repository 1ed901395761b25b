"""Carlini-Wagner L2 (Carlini & Wagner, 2017), fixed c, Adam in tanh space."""
import numbers
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.engine import EXACT, autocast_dtype, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.validation import check_logits

MARGINS = ("reference", "correct")


def _number(value, name, positive=False):
    """Validated; a Python number is kept as given (the reference's arithmetic uses it as is)."""
    checked = validation.check_budget(value, name, positive=positive)
    return value if isinstance(value, numbers.Real) else checked


def check_cw_args(c, kappa, steps, lr, margin):
    """Validated (c, kappa, steps, lr, margin); errors name the argument."""
    c = _number(c, "c")
    kappa = _number(kappa, "kappa")
    steps = validation.check_steps(steps)
    lr = _number(lr, "lr", positive=True)
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    return c, kappa, steps, lr, margin


def engine_forward(forward, engine):
    """forward as the engine options run it: the model's input in the engine's layout
    (channels_last), under autocast in fast mode (logits back in fp32). The attack's
    own arithmetic stays in the images' dtype and contiguous layout."""
    dtype = autocast_dtype(engine.precision)
    if dtype is None and not engine.channels_last:
        return forward

    def wrapped(x):
        with torch.autocast(x.device.type, dtype, enabled=dtype is not None):
            out = forward(engine.layout(x))
        return out.float() if dtype is not None else out

    return wrapped


def to_tanh_space(x):
    """w with 0.5 * (tanh(w) + 1) == x: atanh(clamp(2x - 1, -1, 1)) as 0.5 * log((1 + z) / (1 - z)).

    Pixels at exactly 0 or 1 give w = -inf / +inf and stay fixed, as in the reference.
    """
    z = torch.clamp(x * 2 - 1, min=-1, max=1)
    return 0.5 * torch.log((1 + z) / (1 - z))


def from_tanh_space(w):
    # tanh's output is saved for its backward; the sum is not, so it can be scaled in place.
    return (torch.tanh(w) + 1).mul_(0.5)


def cw_margin(logits, labels, *, kappa, targeted=False, margin="reference"):
    """The f term of the CW objective, per sample, clamped below at -kappa.

    'reference' takes the label logit as max(onehot * logits) and the best other
    logit as max((1 - onehot) * logits), as torchattacks 3.5.1 does; both are wrong
    when logits are negative (the zeros win the max; issue #184). 'correct' takes
    the label logit itself and the max over the other classes.
    """
    onehot = torch.eye(logits.shape[1], device=logits.device)[labels]
    if margin == "reference":
        other = torch.max((1 - onehot) * logits, dim=1)[0]
        real = torch.max(onehot * logits, dim=1)[0]
    else:
        real = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        other = logits.masked_fill(onehot.bool(), float("-inf")).max(dim=1)[0]
    diff = other - real if targeted else real - other
    return torch.clamp(diff, min=-kappa)


def cw_loop(forward, x, y, *, c=1, kappa=0, steps=50, lr=0.01, targeted=False, margin="reference", engine=EXACT):
    """The CW iteration on inputs the caller owns; returns the best adversarial images.

    y are the true labels, or the targets when targeted. The gradient is taken with
    respect to w only (torch.autograd.grad), so model parameters' .grad are never
    written. Host syncs: one cost.item() every max(steps // 10, 1) steps, for the
    reference's early stop. engine: precision and channels_last apply to the model
    (see engine_forward); early_stop does not apply (CW keeps, per sample, the
    closest fooling iterate over all steps); batch_size is applied by the callers.
    """
    fmt = validation.memory_format(x)
    x = x.contiguous()
    forward = engine_forward(forward, engine)
    n = x.shape[0]
    w = to_tanh_space(x).detach().requires_grad_(True)
    best_adv = x.clone()
    best_l2 = 1e10 * torch.ones(n, device=x.device)
    lost = torch.zeros(n, dtype=torch.bool, device=x.device)
    prev_cost = 1e10
    optimizer = torch.optim.Adam([w], lr=lr)
    x_flat = x.flatten(1)
    sample_view = [-1] + [1] * (x.dim() - 1)
    check_every = max(steps // 10, 1)
    checked = False
    for step in range(steps):
        with torch.enable_grad():
            adv = from_tanh_space(w)
            cur_l2 = F.mse_loss(adv.flatten(1), x_flat, reduction="none").sum(dim=1)
            logits = forward(adv)
            if not checked:
                check_logits(logits, y, n_classes_min=2)
                checked = True
            cost = cur_l2.sum() + c * cw_margin(logits, y, kappa=kappa, targeted=targeted, margin=margin).sum()
            w.grad = torch.autograd.grad(cost, w)[0]
        optimizer.step()
        w.grad = None

        pred = torch.argmax(logits.detach(), 1)
        hit = (pred == y) if targeted else (pred != y)
        cur_l2 = cur_l2.detach()
        mask = hit.float() * (best_l2 > cur_l2)
        best_l2 = mask * cur_l2 + (1 - mask) * best_l2
        # The reference's mask * adv + (1 - mask) * best as a select: one pass instead of
        # four. They differ only where an iterate is not finite (a NaN model output): there
        # 0 * NaN makes the reference's best NaN for good; lost remembers those samples
        # (cur_l2 is NaN or inf exactly when the iterate is).
        best_adv = torch.where(mask.view(sample_view).bool(), adv.detach(), best_adv)
        lost |= ~torch.isfinite(cur_l2)

        if step % check_every == 0:
            value = cost.item()
            if value > prev_cost:
                break
            prev_cost = value
    best_adv = torch.where(lost.view(sample_view), float("nan"), best_adv)  # the callers return clean images there
    return best_adv.contiguous(memory_format=fmt)


def cw(model: Model, images: torch.Tensor, labels: torch.Tensor, *, c: float = 1, kappa: float = 0, steps: int = 50,
       lr: float = 0.01, targeted: bool = False, margin: Literal["reference", "correct"] = "reference",
       backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Carlini-Wagner L2 attack with a fixed c (no binary search), as torchattacks.CW.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        c (float >= 0): weight of the margin term. (Default: 1)
        kappa (float >= 0): confidence; the margin is clamped below at -kappa. (Default: 0)
        steps (int >= 0): Adam steps. (Default: 50)
        lr (float > 0): Adam learning rate. (Default: 0.01)
        margin: 'reference' (default, torchattacks' margin, wrong for negative
            logits, issue #184) or 'correct' (label logit minus best other logit).
        **engine: fastadv.engine.EngineOptions: precision, channels_last, batch_size (see cw_loop).
    Returns the adversarial images [N, ...] on the model's device: for each sample
    the misclassified iterate of smallest L2 distance, else the clean image.
    Bit-exact with torchattacks 3.5.1 CW (CPU, fp32) with margin='reference'.
    """
    c, kappa, steps, lr, margin = check_cw_args(c, kappa, steps, lr, margin)
    return run_functional(
        cw_loop, model, images, labels, engine=engine, c=c, kappa=kappa, steps=steps, lr=lr, targeted=targeted,
        margin=margin,
    )


class CW(Attack):
    r"""CW in the paper 'Towards Evaluating the Robustness of Neural Networks'
    [https://arxiv.org/abs/1608.04644].

    Distance measure: L2. Minimizes ||x' - x||_2^2 + c * f(x') over x' = (tanh(w) + 1) / 2
    with Adam, keeping per sample the closest misclassified iterate; a fixed c (the
    paper's binary search over c is not implemented, as in the reference). Stops
    early when the total cost rose since the last check (every max(steps // 10, 1) steps).

    Equivalence: bit-exact with torchattacks 3.5.1 CW on CPU in fp32 (default and
    targeted modes) with the default margin='reference'. Unlike the reference, the
    model parameters' .grad are never written.

    Arguments:
        model (nn.Module): model to attack.
        c (float): weight of the margin term f, >= 0. (Default: 1)
        kappa (float): confidence, >= 0: f(x') = max(Z_y - max_{i != y} Z_i, -kappa). (Default: 0)
        steps (int): number of Adam steps, >= 0. (Default: 50)
        lr (float): Adam learning rate, > 0. (Default: 0.01)
        margin (str, keyword-only): 'reference' (default) reproduces torchattacks'
            f, which takes max(onehot * Z) and max((1 - onehot) * Z) and is wrong
            for negative logits (issue #184); 'correct' uses Z_y and max_{i != y} Z_i.
        backend (str, keyword-only): accepted for API uniformity; CW has no kernels.
        **engine (keyword-only): see fastadv.Attack; precision and channels_last apply
            to the model, batch_size chunks the batch, early_stop does not apply.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.CW(model, c=1, kappa=0, steps=50, lr=0.01)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, c: float = 1, kappa: float = 0, steps: int = 50, lr: float = 0.01, *,
                 margin: Literal["reference", "correct"] = "reference", backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("CW", model, backend=backend, **engine)
        self.c, self.kappa, self.steps, self.lr, self.margin = check_cw_args(c, kappa, steps, lr, margin)
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return cw_loop(
            self.get_logits, x, self._targets(x, y), c=self.c, kappa=self.kappa, steps=self.steps, lr=self.lr,
            targeted=self.targeted, margin=self.margin, engine=self.engine,
        )
