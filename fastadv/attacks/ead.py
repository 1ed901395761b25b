"""EAD: elastic-net attacks (Chen et al., 2018), FISTA with a binary search over the constant c.

EADL1 keeps, per sample, the fooling iterate of smallest L1 distance; EADEN the one of
smallest elastic-net distance (L2^2 + beta * L1). Both run torchattacks 3.5.1's
arithmetic op for op, including its habits (listed in EADL1's docstring).
"""
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.cw import engine_forward
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Unpack
from fastadv.validation import check_logits

DISTANCES = ("l1", "en")


def _number(value, name, positive=False):
    """Validated; a Python number is kept as given (the reference's arithmetic uses it as is)."""
    checked = validation.check_budget(value, name, positive=positive)
    return value if isinstance(value, numbers.Real) else checked


def check_ead_args(kappa, lr, binary_search_steps, max_iterations, abort_early, initial_const, beta):
    """Validated EAD arguments, in the constructor's order; errors name the argument."""
    if not isinstance(abort_early, bool):
        raise TypeError(f"abort_early must be a bool, got {type(abort_early).__name__}")
    return (
        _number(kappa, "kappa"), _number(lr, "lr", positive=True),
        validation.check_steps(binary_search_steps, "binary_search_steps"),
        validation.check_steps(max_iterations, "max_iterations"), abort_early,
        _number(initial_const, "initial_const"), _number(beta, "beta"),
    )


def l1_distance(a, b):
    return torch.abs(a.flatten(1) - b.flatten(1)).sum(dim=1)


def l2_distance(a, b):
    """Squared L2 per sample, as the reference's MSELoss(reduction='none') summed."""
    return F.mse_loss(a.flatten(1), b.flatten(1), reduction="none").sum(dim=1)


def ead_margin(logits, onehot, kappa, targeted):
    """The reference's f: label logit as max(onehot * z) (wrong for negative logits, as CW's),
    best other logit as max((1 - onehot) * z - 1e4 * onehot), clamped below at -kappa."""
    other = torch.max((1 - onehot) * logits - (onehot * 1e4), dim=1)[0]
    real = torch.max(onehot * logits, dim=1)[0]
    return torch.clamp(other - real if targeted else real - other, min=-kappa)


def succeeded(logits, labels, kappa, targeted):
    """The reference's compare() on logits: kappa is added (subtracted when targeted) to
    every column that is some sample's label (its output[:, labels] indexing), then argmax."""
    if kappa != 0:
        logits = logits.clone()
        logits[:, labels] += -kappa if targeted else kappa
    pred = torch.argmax(logits, 1)
    return pred == labels if targeted else pred != labels


def fista_step(y, x_k, anchor, beta, zt):
    """Shrinkage of y towards anchor by beta (clamped into [., 1] above, [0, .] below), then
    the momentum point; as the reference's cond-weighted sum, which also defines NaN handling."""
    upper = torch.clamp(y - beta, max=1)
    lower = torch.clamp(y + beta, min=0)
    diff = y - anchor
    # In y's dtype: the reference's .float() turns fp16/bf16 iterates into fp32 (then its model fails).
    cond1 = (diff > beta).to(y.dtype)
    cond2 = (torch.abs(diff) <= beta).to(y.dtype)
    cond3 = (diff < -beta).to(y.dtype)
    new_x = (cond1 * upper) + (cond2 * anchor) + (cond3 * lower)
    return new_x, new_x + (zt * (new_x - x_k))


def ead_loop(forward, x, y, *, kappa=0, lr=0.01, binary_search_steps=9, max_iterations=100, abort_early=True,
             initial_const=0.001, beta=0.001, distance="l1", targeted=False, engine=EXACT):
    """The EAD search on inputs the caller owns; returns the best adversarial images.

    y are the true labels, or the targets when targeted. Gradients are taken with
    respect to the iterate only (model parameters' .grad are never written). Host
    syncs: one loss comparison every max(max_iterations // 10, 1) iterations when
    abort_early (the reference's early abort, decided for the whole batch). On the CPU
    the best iterates are copied by boolean mask (no device there to stall; only improved
    rows are copied), elsewhere by a select.
    """
    fmt = validation.memory_format(x)
    x = x.contiguous()
    forward = engine_forward(forward, engine)
    n = x.shape[0]
    dev = x.device
    with torch.no_grad():
        logits = forward(x)
    check_logits(logits, y, n_classes_min=2)
    onehot = torch.eye(logits.shape[1], device=dev)[y]
    sample = [-1] + [1] * (x.dim() - 1)

    lower_bound = torch.zeros(n, device=dev)
    const = torch.ones(n, device=dev) * initial_const
    upper_bound = torch.ones(n, device=dev) * 1e10
    best_adv = x.clone()
    o_best_dist = torch.full((n,), 1e10, device=dev)
    # The reference's y_k is an nn.Parameter sharing storage with its copy of the images,
    # so its first gradient step moves that copy too: every distance and the shrinkage are
    # then measured from x - lr * grad_0. anchor is that point (x until the first step).
    anchor = x
    x_k = x.clone()
    y_k = x.clone()
    check_every = max(max_iterations // 10, 1)  # the reference divides by zero below 10 iterations
    first_step = True

    for outer in range(binary_search_steps):
        best_dist = torch.full((n,), 1e10, device=dev)
        best_score = torch.full((n,), -1.0, device=dev)
        prev_loss = 1e6
        if binary_search_steps >= 10 and outer == binary_search_steps - 1:
            const = upper_bound  # the reference repeats the search once with the upper bounds
        step_lr = lr
        for iteration in range(max_iterations):
            with torch.enable_grad():
                yg = y_k.detach().requires_grad_(True)
                cost = torch.sum(const * ead_margin(forward(yg), onehot, kappa, targeted)) + torch.sum(l2_distance(yg, anchor))
                grad = torch.autograd.grad(cost, yg)[0]
            y_k = y_k - grad * step_lr
            if first_step:
                anchor, first_step = y_k, False
            global_step = iteration + 1
            step_lr = lr * (1 - global_step / max_iterations) ** 0.5
            x_k, y_k = fista_step(y_k, x_k, anchor, beta, global_step / (global_step + 3))

            with torch.no_grad():
                logits = forward(x_k)
            l1 = l1_distance(x_k, anchor)
            l2 = l2_distance(x_k, anchor) if distance == "en" or abort_early else None
            if abort_early and iteration % check_every == 0:
                loss = torch.sum(const * ead_margin(logits, onehot, kappa, targeted)) + torch.sum(l2) + torch.sum(beta * l1)
                if loss > prev_loss * 0.999999:
                    break
                prev_loss = loss

            dist = l1 if distance == "l1" else l2 + (l1 * beta)
            hit = succeeded(logits, y, kappa, targeted)
            label = torch.argmax(logits, 1).float()
            mask = (dist < best_dist) & hit
            best_dist = torch.where(mask, dist, best_dist)
            best_score = torch.where(mask, label, best_score)
            mask = (dist < o_best_dist) & hit
            o_best_dist = torch.where(mask, dist, o_best_dist)
            if dev.type == "cpu":  # syncs cost nothing here: copy only the improved rows
                best_adv[mask] = x_k[mask]
            else:
                best_adv = torch.where(mask.view(sample), x_k, best_adv)

        found = (best_score == y if targeted else best_score != y) & (best_score != -1)
        upper_bound = torch.where(found, torch.minimum(upper_bound, const), upper_bound)
        lower_bound = torch.where(found, lower_bound, torch.maximum(lower_bound, const))
        const = torch.where(upper_bound < 1e9, (lower_bound + upper_bound) / 2, const * 10)
    return best_adv.contiguous(memory_format=fmt)


def _ead_function(distance):
    def attack(model, images, labels, *, kappa=0, lr=0.01, binary_search_steps=9, max_iterations=100,
               abort_early=True, initial_const=0.001, beta=0.001, targeted=False, backend=None, **engine):
        args = check_ead_args(kappa, lr, binary_search_steps, max_iterations, abort_early, initial_const, beta)
        names = ("kappa", "lr", "binary_search_steps", "max_iterations", "abort_early", "initial_const", "beta")
        return run_functional(ead_loop, model, images, labels, engine=engine, distance=distance, targeted=targeted,
                              **dict(zip(names, args)))

    attack.__name__ = attack.__qualname__ = f"ead{distance}"
    attack.__doc__ = f"""EAD with the {'L1' if distance == 'l1' else 'elastic-net'} decision rule, as torchattacks.EAD{distance.upper()}.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        kappa, lr, binary_search_steps, max_iterations, abort_early, initial_const, beta:
            see fastadv.EAD{distance.upper()}.
        **engine: fastadv.engine.EngineOptions: precision, channels_last, batch_size.
    Returns the adversarial images [N, ...] on the model's device. Bit-exact with
    torchattacks 3.5.1 EAD{distance.upper()} (CPU, fp32).
    """
    return attack


eadl1 = _ead_function("l1")
eaden = _ead_function("en")


class EADL1(Attack):
    r"""EAD in the paper 'EAD: Elastic-Net Attacks to Deep Neural Networks'
    [https://arxiv.org/abs/1709.04114], keeping the closest adversarial example in L1.

    Distance measure: L1. Per binary-search step (over the constant c, per sample): up to
    max_iterations FISTA iterations, a gradient step on c * f(y) + ||y - x||_2^2 with a
    square-root decaying learning rate, then shrinkage by beta and momentum.

    Equivalence: bit-exact with torchattacks 3.5.1 EADL1 on CPU in fp32, default and
    targeted modes. Its habits are reproduced, not fixed:
      - its first gradient step also moves its copy of the images (an nn.Parameter shares
        their storage), so distances and the shrinkage are measured from x - lr * grad_0,
        not x, and outputs may leave [0, 1] by up to lr * |grad_0|;
      - the label logit is max(onehot * z), wrong for negative logits (as CW, issue #184);
      - the success test adds kappa to every column that is some sample's label, so with
        kappa > 0 results depend on the batch (and on engine batch_size chunks);
      - abort_early stops the whole batch's inner loop when the batch's total loss stopped
        decreasing (checked every max_iterations // 10 iterations: one host sync each).
    Where the reference crashes: max_iterations < 10 with abort_early (a modulo by zero):
    fastadv then checks every iteration; fp16/bf16 images (its shrinkage turns them into
    fp32): fastadv keeps the images' dtype. Unlike the reference, the model parameters' .grad
    are never written.

    Arguments:
        model (nn.Module): model to attack.
        kappa (float): confidence, >= 0. (Default: 0)
        lr (float): learning rate, > 0. (Default: 0.01)
        binary_search_steps (int): binary-search steps over c, >= 0; from 10 on, the last
            step reruns with the upper bounds. (Default: 9)
        max_iterations (int): iterations per binary-search step, >= 0. (Default: 100)
        abort_early (bool): stop a binary-search step once the loss stops improving. (Default: True)
        initial_const (float): first c, >= 0. (Default: 0.001)
        beta (float): L1 weight (the shrinkage threshold), >= 0. (Default: 0.001)
        backend (str, keyword-only): accepted for API uniformity; EAD has no kernels.
        **engine (keyword-only): see fastadv.Attack; precision and channels_last apply to
            the model, batch_size chunks the batch, early_stop does not apply.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.EADL1(model, kappa=0, lr=0.01, max_iterations=100)
        >>> adv_images = attack(images, labels)
    """

    distance = "l1"

    def __init__(self, model: nn.Module, kappa: float = 0, lr: float = 0.01, binary_search_steps: int = 9,
                 max_iterations: int = 100, abort_early: bool = True, initial_const: float = 0.001, beta: float = 0.001,
                 *, backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("EADL1" if self.distance == "l1" else "EADEN", model, backend=backend, **engine)
        (self.kappa, self.lr, self.binary_search_steps, self.max_iterations, self.abort_early, self.initial_const,
         self.beta) = check_ead_args(kappa, lr, binary_search_steps, max_iterations, abort_early, initial_const, beta)
        self.repeat = self.binary_search_steps >= 10
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return ead_loop(
            self.get_logits, x, self._targets(x, y), kappa=self.kappa, lr=self.lr,
            binary_search_steps=self.binary_search_steps, max_iterations=self.max_iterations,
            abort_early=self.abort_early, initial_const=self.initial_const, beta=self.beta, distance=self.distance,
            targeted=self.targeted, engine=self.engine,
        )


class EADEN(EADL1):
    r"""EAD in the paper 'EAD: Elastic-Net Attacks to Deep Neural Networks'
    [https://arxiv.org/abs/1709.04114], keeping the closest adversarial example in the
    elastic-net distance ||x' - x||_2^2 + beta * ||x' - x||_1.

    Distance measure: L1 and L2. The same search as fastadv.EADL1 (see its docstring for
    the arguments, the reproduced habits of the reference and the engine options); only the
    rule that picks the best iterate differs. Bit-exact with torchattacks 3.5.1 EADEN on
    CPU in fp32, default and targeted modes.

    Example::
        >>> attack = fastadv.EADEN(model, kappa=0, lr=0.01, max_iterations=100)
        >>> adv_images = attack(images, labels)
    """

    distance = "en"
