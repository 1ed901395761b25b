"""APGD: Auto-PGD with Linf or L2 budget (Croce & Hein, ICML 2020).

The iteration keeps all of its state on the device: the step sizes, the best
points and losses, the oscillation checks at the checkpoints and the restart
bookkeeping are tensors updated by masked selects, so no step waits for the host.
The checkpoint schedule itself (which iterations check) is plain Python ints.
Between restarts the still-robust samples are gathered once (one sync).

Two arithmetics, chosen by ``arithmetic=``:

- ``'torchattacks'`` (default): torchattacks 3.5.1 APGD/APGDT, bit-exact on the
  'torch' backend (the PyTorch twins in fastadv.reference).
- ``'original'``: pyautoattack 0.2.0 (fra31/auto-attack) APGDAttack and
  APGDAttack_targeted: its random start t / (max|t| + 1e-12), its L2 step order,
  per-sample step sizes in targeted L2, the targeted DLR denominator
  z_1 - 0.5 * (z_3 + z_4), its fp32 oscillation threshold and its zero-gradient
  warning for the DLR losses.

Randomness comes from a private ``torch.Generator`` seeded like the reference
seeds the global one, so the draws equal the reference's and the caller's global
RNG state is left untouched.

For AutoAttack, :func:`apgd_loop` runs restarts (and target classes) and returns
``(adv, robust)``; :func:`apgd_single_run` is one run returning
``(x_best, robust, loss_best, x_best_adv)``.
"""
import math
import numbers
import time
import warnings
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import ops, validation
from fastadv.attack import Attack
from fastadv.engine import EXACT, autocast_dtype, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack

NORMS = ("Linf", "L2")
LOSSES = ("ce", "dlr")
LOOP_LOSSES = ("ce", "dlr", "dlr-targeted")
ARITHMETICS = ("torchattacks", "original")


# -- argument checks -------------------------------------------------------------------------


def check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_count(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_rho(rho):
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(f"rho must be a number, got {type(rho).__name__}")
    if not math.isfinite(rho):
        raise ValueError(f"rho must be finite, got {rho}")
    return float(rho)


def check_seed(seed):
    """An int seed (floats are truncated, as torch.manual_seed does); None: the clock's."""
    if seed is None:
        return int(time.time())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Real):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed)


def check_n_classes(n_classes):
    """APGDT's n_classes: an int >= 2 (it targets the classes ranked 2..n_classes)."""
    return check_count(n_classes, "n_classes", minimum=2)


def check_model_output(logits, y, loss, n_target_classes=None):
    """The first forward: logits [N, C] with the labels in range and enough classes for the loss."""
    validation.check_logits(logits, y)
    c = logits.shape[1]
    if loss == "dlr" and c < 3:
        raise ValueError(f"loss='dlr' needs a model with at least 3 classes, the model returns {c}")
    if loss == "dlr-targeted":
        if c < 4:
            raise ValueError(f"the targeted DLR loss needs a model with at least 4 classes, the model returns {c}")
        if n_target_classes + 1 > c:
            raise ValueError(
                f"n_classes={n_target_classes + 1} (n_target_classes={n_target_classes}) exceeds the {c} classes "
                "the model returns"
            )


# -- losses and schedule ---------------------------------------------------------------------


def dlr_loss(logits, y):
    """Difference of logits ratio, per sample: -(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12),
    with z_(k) the k-th largest logit."""
    z_sorted, order = logits.sort(dim=1)
    y_on_top = (order[:, -1] == y).float()
    margin = _pick(logits, y) - z_sorted[:, -2] * y_on_top - z_sorted[:, -1] * (1.0 - y_on_top)
    return -margin / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def _pick(logits, classes):
    """logits[arange(N), classes], as a gather (the same values; its backward is a scatter,
    cheaper than advanced indexing's, and every logit receives at most two gradient terms
    in these losses, so their sum does not depend on the order autograd adds them)."""
    return logits.gather(1, classes.unsqueeze(1)).squeeze(1)


def dlr_loss_targeted(logits, y, y_target, arithmetic="torchattacks"):
    """Targeted DLR, per sample: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12); torchattacks
    computes the denominator as z_(1) - 0.5 z_(3) - 0.5 z_(4), pyautoattack as z_(1) - 0.5 (z_(3) + z_(4))."""
    z_sorted, _ = logits.sort(dim=1)
    if arithmetic == "original":
        spread = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4])
    else:
        spread = z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4]
    return -(_pick(logits, y) - _pick(logits, y_target)) / (spread + 1e-12)


def checkpoint_schedule(n_iter):
    """(first checkpoint interval, minimal interval, decrement) for n_iter iterations."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def oscillation_threshold(k, rho, arithmetic):
    """The largest count of loss increases over the last k steps that still halves the step.

    The reference tests count <= k * rho, in float64 (torchattacks, numpy) or after
    rounding k * rho to fp32 (pyautoattack); counts are integers, so the floor of
    that bound decides identically.
    """
    bound = k * rho
    if arithmetic == "original":
        bound = float(np.float32(bound))
    return math.floor(bound)


class _Objective:
    """Per-sample loss, logits and input gradient of the summed loss, averaged over eot_iter."""

    def __init__(self, forward, y, loss, *, y_target=None, eot_iter=1, arithmetic="torchattacks", check=None,
                 precision=None):
        self.forward = forward
        self.y = y
        self.y_target = y_target
        self.loss = loss
        self.arithmetic = arithmetic
        self.eot_iter = eot_iter
        self.check = check
        self.autocast = autocast_dtype(precision)

    def criterion(self, z):
        if self.loss == "ce":
            return F.cross_entropy(z, self.y, reduction="none")
        if self.loss == "dlr":
            return dlr_loss(z, self.y)
        return dlr_loss_targeted(z, self.y, self.y_target, self.arithmetic)

    def keep(self, rows):
        """Go on with these samples only (early stop): each sample's loss is its own, so the rest are unchanged."""
        self.y = self.y[rows]
        if self.y_target is not None:
            self.y_target = self.y_target[rows]

    def __call__(self, x_adv):
        x_adv = x_adv.detach().requires_grad_(True)
        grad = None
        autocast = torch.autocast(x_adv.device.type, self.autocast, enabled=self.autocast is not None)
        for _ in range(self.eot_iter):
            with torch.enable_grad(), autocast:
                logits = self.forward(x_adv)
                if self.check is not None:
                    self.check(logits, self.y)
                    self.check = None
                if self.autocast is not None:
                    logits = logits.float()
                loss_indiv = self.criterion(logits)
                g = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
            if self.eot_iter == 1:
                grad = g  # equals zeros + g / 1.0 up to the sign of zeros, which no step can see
            else:
                grad = (torch.zeros_like(x_adv) if grad is None else grad).add_(g)
        if self.eot_iter > 1:
            grad /= float(self.eot_iter)
        return loss_indiv.detach(), logits.detach(), grad


def _column(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _eps_vector(eps, x):
    """eps as an [N] tensor in fp32 (fp64 for fp64 images) on x's device."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(eps, torch.Tensor):
        return eps.detach().to(x.device, dtype).reshape(-1).expand(x.shape[0])
    return torch.full((x.shape[0],), float(eps), dtype=dtype, device=x.device)


def apgd_start(x, eps, *, norm, generator=None, arithmetic="torchattacks"):
    """The random start, drawn on the CPU (generator, else the global RNG) as the reference draws it.

    Linf: t = 2 U(0, 1) - 1, start = x + eps * t / max|t| ('original': t / (max|t| + 1e-12)).
    L2:   t = N(0, 1),       start = x + eps * t / (||t||_2 + 1e-12).
    Clipped to [0, 1]. eps is an [N] tensor.
    """
    n = x.shape[0]
    e = _column(eps, x)
    dims = tuple(range(1, x.dim()))
    if norm == "Linf":
        t = (2 * torch.rand(x.shape, generator=generator) - 1).to(x.device)
        t_max = t.reshape(n, -1).abs().max(dim=1)[0]
        if arithmetic == "original":
            delta = e * (t / (_column(t_max, t) + 1e-12))
        else:
            delta = e * t / _column(t_max, t)
    else:
        t = torch.randn(x.shape, generator=generator).to(x.device)
        if arithmetic == "original":
            delta = e * (t / (_column((t ** 2).reshape(n, -1).sum(-1).sqrt(), t) + 1e-12))
        else:
            delta = e * t / ((t ** 2).sum(dim=dims, keepdim=True).sqrt() + 1e-12)
    return torch.clamp(x + delta, 0.0, 1.0).to(x.dtype)


# -- the attack ------------------------------------------------------------------------------


def apgd_single_run(
    forward, x, y, *, norm="Linf", eps=8 / 255, n_iter=10, loss="ce", y_target=None, eot_iter=1, rho=0.75,
    generator=None, arithmetic="torchattacks", backend=None, verbose=False, check=None, precision=None,
    early_stop=False,
):
    """One APGD run from a random start on inputs the caller owns.

    Arguments:
        forward: x -> logits [N, C] (the model, already in attack mode).
        x: [N, ...] clean images in [0, 1]; y: [N] labels.
        norm: 'Linf' or 'L2'. eps: float or [N] tensor. n_iter: iterations (>= 0).
        loss: 'ce', 'dlr' or 'dlr-targeted' (then y_target: [N] target classes).
        eot_iter: gradients averaged per step. rho: oscillation threshold fraction.
        generator: CPU torch.Generator for the start (None: the global RNG).
        arithmetic: 'torchattacks' or 'original' (see the module docstring).
        check: called as check(logits, y) with the first logits (input validation), or None.
        precision: None (exact), or 'bf16' / 'fp16' to run the model under autocast (fast mode).
        early_stop: a sample leaves the run once an iterate fools the model (one host sync per
            iteration). Its robust flag is then already False, and every sample's state is its
            own (the loss is summed, the step sizes and checkpoints are per sample), so the
            others follow exactly their trajectory and every robust flag equals the full run's
            (on a model whose output for a sample does not depend on the rest of the batch).
            The leaving sample's x_best_adv is the first iterate that fooled it (the full run
            returns the last one) and its x_best and loss_best stop there. Ignored for
            torchattacks' targeted L2 step, which takes the first sample's step size for all.
    Returns (x_best, robust, loss_best, x_best_adv): the highest-loss point, whether
    the sample was classified correctly at every iterate ([N] bool), that loss, and
    the last misclassified iterate (the start where there is none).
    """
    n = x.shape[0]
    original = arithmetic == "original"
    eps = _eps_vector(eps, x)
    n_iter_2, n_iter_min, size_decr = checkpoint_schedule(n_iter)
    if verbose:
        print("parameters: ", n_iter, n_iter_2, n_iter_min, size_decr)
    objective = _Objective(
        forward, y, loss, y_target=y_target, eot_iter=eot_iter, arithmetic=arithmetic, check=check, precision=precision,
    )

    x_adv = apgd_start(x, eps, norm=norm, generator=generator, arithmetic=arithmetic)
    x_best = x_adv.clone()
    x_best_adv = x_adv.clone()
    loss_steps = torch.zeros([n_iter, n], device=x.device)

    loss_indiv, logits, grad = objective(x_adv)
    if original and loss in ("dlr", "dlr-targeted"):
        _warn_zero_gradients(grad)
    grad_best = grad.clone()
    robust = logits.max(1)[1] == y
    loss_best = loss_indiv.clone()

    step = eps.float() * 2.0
    # torchattacks APGDT's L2 step takes the first sample's step size for all samples.
    first_step_only = norm == "L2" and loss == "dlr-targeted" and not original
    x_old = x_adv
    k = n_iter_2
    counter3 = 0
    loss_best_last_check = loss_best
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
    early_stop = early_stop and not first_step_only
    if early_stop:
        active = torch.arange(n, device=x.device)
        out = (x_best.clone(), torch.zeros_like(robust), loss_best.clone(), x_best_adv.clone())

    for i in range(n_iter):
        if early_stop and not bool(robust.all()):  # the one host sync per iteration of early stopping
            keep = robust.nonzero().flatten()
            gone = active[~robust]
            out[0][gone], out[2][gone], out[3][gone] = x_best[~robust], loss_best[~robust], x_best_adv[~robust]
            active = active[keep]
            if active.numel() == 0:
                return out
            x, y, eps, step, x_adv, x_old, grad, x_best, grad_best, x_best_adv, loss_best, loss_best_last_check, \
                reduced_last_check, robust = (t[keep] for t in (
                    x, y, eps, step, x_adv, x_old, grad, x_best, grad_best, x_best_adv, loss_best,
                    loss_best_last_check, reduced_last_check, robust))
            loss_steps = loss_steps[:, keep]
            objective.keep(keep)
            n = active.numel()
        a = 0.75 if i > 0 else 1.0
        if norm == "Linf":
            x_next = ops.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, backend=backend)
        else:
            s = step[:1].expand(n) if first_step_only else step
            x_next = ops.apgd_l2_step(
                x_adv, x_old, x, grad, step=s, eps=eps, a=a, arithmetic=arithmetic, backend=backend
            )
        x_old, x_adv = x_adv, x_next

        loss_indiv, logits, grad = objective(x_adv)
        pred = logits.max(1)[1] == y
        robust = robust & pred
        if verbose:
            print("iteration: {} - Best loss: {:.6f}".format(i, loss_best.sum()))

        loss_steps[i] = loss_indiv
        improved = loss_indiv > loss_best
        ops.apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, ~pred, backend=backend)
        loss_best = torch.where(improved, loss_indiv, loss_best)

        counter3 += 1
        if counter3 == k:
            # the reference counts loss_steps[j] > loss_steps[j - 1] for j = i-k+1..i, where
            # j - 1 = -1 wraps around to the last (still zero) row
            if i - k >= 0:
                previous = loss_steps[i - k:i]
            else:
                previous = torch.cat([loss_steps[-1:], loss_steps[:i]])
            increases = (loss_steps[i - k + 1:i + 1] > previous).sum(0)
            reduce = increases <= oscillation_threshold(k, rho, arithmetic)
            reduce = reduce | (~reduced_last_check & (loss_best_last_check >= loss_best))
            reduced_last_check = reduce
            loss_best_last_check = loss_best

            step = torch.where(reduce, step / 2.0, step)
            reset = _column(reduce, x_adv)
            x_adv = torch.where(reset, x_best, x_adv)
            grad = torch.where(reset, grad_best, grad)

            counter3 = 0
            k = max(k - size_decr, n_iter_min)

    if early_stop:
        out[0][active], out[1][active], out[2][active], out[3][active] = x_best, robust, loss_best, x_best_adv
        return out
    return x_best, robust, loss_best, x_best_adv


def _warn_zero_gradients(grad):
    """pyautoattack's check: warn when some samples have an all-zero gradient (one sync)."""
    zero = (grad.reshape(grad.shape[0], -1).abs().sum(-1) == 0).sum().item()
    if zero:
        warnings.warn(
            f"there are {zero} points with zero gradient! This might lead to unreliable evaluation "
            "with gradient-based attacks.",
            stacklevel=3,
        )


def apgd_loop(
    forward, x, y, *, norm="Linf", eps=8 / 255, n_iter=10, n_restarts=1, loss="ce", n_target_classes=None,
    eot_iter=1, rho=0.75, seed=0, generator=None, arithmetic="torchattacks", robust=None, backend=None,
    verbose=False, engine=EXACT,
):
    """APGD with restarts (and, for loss='dlr-targeted', target classes) on inputs the caller owns.

    Each restart attacks only the samples still robust; a sample fooled by a run
    gets that run's misclassified point. With n_target_classes the runs loop over
    the target ranks c = 2..n_target_classes+1 (the class with the c-th largest
    clean logit), restarts inside, as both references do.

    Arguments:
        forward: x -> logits [N, C] (the model, already in attack mode).
        x: [N, ...] clean images in [0, 1] on forward's device; y: [N] labels.
        norm: 'Linf' or 'L2'. eps: float or [N] tensor.
        n_iter: iterations per run. n_restarts: runs per target class (>= 1).
        loss: 'ce', 'dlr' or 'dlr-targeted' (needs n_target_classes).
        eot_iter, rho: as in APGD. seed: seeds a private CPU generator, unless
            generator (a CPU torch.Generator) is given, which is used and advanced.
        arithmetic: 'torchattacks' (default) or 'original' (pyautoattack 0.2.0).
        robust: [N] bool, the samples to attack (default: those forward classifies correctly).
        engine: fastadv.engine.EngineOptions. precision runs the model under autocast and
            channels_last the run in that layout (both change the numbers); early_stop
            also stops each run on a sample once it is fooled (apgd_single_run): the
            same robust flags, fewer gradient evaluations, and a fooled sample gets the
            first iterate that fooled it instead of the last; cuda_graph does not apply
            (the checkpoints are host-side control flow).
    Returns (adv, robust): adv [N, ...] holds the adversarial point of every fooled
    sample and x elsewhere; robust [N] bool is False where the sample was
    misclassified (clean or by some run).
    """
    norm = check_choice(norm, "norm", NORMS)
    loss = check_choice(loss, "loss", LOOP_LOSSES)
    arithmetic = check_choice(arithmetic, "arithmetic", ARITHMETICS)
    n_iter = validation.check_steps(n_iter, "n_iter")
    n_restarts = check_count(n_restarts, "n_restarts")
    eot_iter = check_count(eot_iter, "eot_iter")
    rho = check_rho(rho)
    if loss == "dlr-targeted":
        n_target_classes = check_count(n_target_classes, "n_target_classes")
    elif n_target_classes is not None:
        raise ValueError(f"n_target_classes is for loss='dlr-targeted', got loss={loss!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(check_seed(seed))

    checked = [False]

    def check(logits, labels):
        if not checked[0]:
            check_model_output(logits, labels, loss, n_target_classes)
            checked[0] = True

    fmt = validation.memory_format(x)
    x = engine.layout(x)
    eps = _eps_vector(eps, x)
    if robust is None:
        with torch.no_grad():
            logits = forward(x)
        check(logits, y)
        robust = logits.max(1)[1] == y
    else:
        robust = robust.to(device=x.device, dtype=torch.bool).clone()
    if verbose:
        rule = "-" * 26
        print(f"{rule} running {norm}-attack with epsilon {_describe(eps)} {rule}")
        print("initial accuracy: {:.2%}".format(robust.float().mean()))
    adv = x.clone()
    start_time = time.time()
    for target_rank in [None] if n_target_classes is None else range(2, n_target_classes + 2):
        for restart in range(n_restarts):
            idx = robust.nonzero().reshape(-1)  # the one sync per restart
            if idx.numel() == 0:
                continue
            x_sub, y_sub = x[idx], y[idx]
            y_target = None
            if target_rank is not None:
                with torch.no_grad():
                    logits = forward(x_sub)
                check(logits, y_sub)
                y_target = logits.sort(dim=1)[1][:, -target_rank]
            _, robust_sub, _, adv_sub = apgd_single_run(
                forward, x_sub, y_sub, norm=norm, eps=eps[idx], n_iter=n_iter, loss=loss, y_target=y_target,
                eot_iter=eot_iter, rho=rho, generator=generator, arithmetic=arithmetic, backend=backend,
                verbose=verbose, check=check, precision=engine.precision, early_stop=engine.early_stop,
            )
            robust.index_copy_(0, idx, robust_sub)
            adv.index_copy_(0, idx, torch.where(_column(robust_sub, x_sub), x_sub, adv_sub))
            if verbose:
                target = "" if target_rank is None else f" - target_class {target_rank}"
                print(
                    "restart {}{} - robust accuracy: {:.2%} - cum. time: {:.1f} s".format(
                        restart, target, robust.float().mean(), time.time() - start_time
                    )
                )
    return adv.contiguous(memory_format=fmt), robust


def _describe(eps):
    lo, hi = eps.min().item(), eps.max().item()
    return f"{lo:.4f}" if lo == hi else f"{lo:.4f}..{hi:.4f}"


def _apgd_core(model, x, y, **kwargs):
    return apgd_loop(model, x, y, **kwargs)[0]


def apgd(
    model: Model, images: torch.Tensor, labels: torch.Tensor, *, norm: Literal["Linf", "L2"] = "Linf",
    eps: Budget = 8 / 255, steps: int = 10, n_restarts: int = 1, seed: Optional[int] = 0,
    loss: Literal["ce", "dlr"] = "ce", eot_iter: int = 1, rho: float = 0.75, verbose: bool = False,
    arithmetic: Literal["torchattacks", "original"] = "torchattacks", backend: Optional[str] = None,
    **engine: Unpack[EngineKwargs],
) -> torch.Tensor:
    """Auto-PGD (untargeted), as torchattacks.APGD computes it.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1]. labels: [N] class indices.
        norm: 'Linf' or 'L2' (default 'Linf'). eps: budget, a float or a per-sample [N]
            tensor (default 8/255). steps: iterations (default 10). n_restarts: default 1.
        seed: seeds the random start (default 0; the global RNG is not touched).
        loss: 'ce' or 'dlr' (default 'ce'). eot_iter: gradients averaged per step
            (default 1). rho: step-size halving threshold (default 0.75).
        arithmetic: 'torchattacks' (default) or 'original' (pyautoattack 0.2.0 APGDAttack).
        backend: 'auto', 'triton', 'torch' or 'interpret' (default: FASTADV_BACKEND, else 'auto').
        **engine: fastadv.engine.EngineOptions (precision, channels_last, batch_size; see apgd_loop).
    Returns the adversarial images [N, C, H, W] on the model's device (the clean image
    where the attack fails). Equivalence: bit-exact with torchattacks 3.5.1 APGD on the
    'torch' backend (the CPU default); the Linf kernel is bit-exact too, the L2 kernel
    sums its norms in another order (see tests/test_kernel_apgd.py for the bound).
    """
    return run_functional(
        _apgd_core, model, images, labels, budgets=("eps",), engine=engine, eps=eps,
        norm=check_choice(norm, "norm", NORMS), n_iter=validation.check_steps(steps),
        n_restarts=check_count(n_restarts, "n_restarts"), seed=check_seed(seed), loss=check_choice(loss, "loss", LOSSES),
        eot_iter=check_count(eot_iter, "eot_iter"), rho=check_rho(rho), verbose=verbose,
        arithmetic=check_choice(arithmetic, "arithmetic", ARITHMETICS), backend=backend,
    )


_NO_LOSS = object()  # APGDT takes no loss and, as in torchattacks, has no loss attribute


class _APGDBase(Attack):
    """What APGD and APGDT share: the constructor's checks, forward and the rho alias.

    The attributes are set in torchattacks' order, which __repr__ shows. engine is a
    dict, not **engine, so that a stray loss= given to APGDT still reaches EngineOptions
    (and fails there) instead of binding to loss here.
    """

    def __init__(self, name, model, backend, engine, norm, eps, steps, n_restarts, seed, eot_iter, rho, verbose,
                 loss=_NO_LOSS):
        super().__init__(name, model, backend=backend, **engine)
        self.eps = validation.check_budget(eps, "eps")
        self.steps = validation.check_steps(steps)
        self.norm = check_choice(norm, "norm", NORMS)
        self.n_restarts = check_count(n_restarts, "n_restarts")
        self.seed = check_seed(seed)
        if loss is not _NO_LOSS:
            self.loss = check_choice(loss, "loss", LOSSES)
        self.eot_iter = check_count(eot_iter, "eot_iter")
        self.thr_decr = check_rho(rho)
        self.verbose = verbose
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        _, adv = self.perturb(x, y, cheap=True)
        return adv

    @property
    def rho(self):
        return self.thr_decr

    @rho.setter
    def rho(self, value):
        self.thr_decr = check_rho(value)


class APGD(_APGDBase):
    r"""APGD in the paper 'Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690],
    [https://github.com/fra31/auto-attack].

    Distance measure: Linf, L2. Threat model: untargeted, white-box (gradients), budget
    eps in [0, 1] pixel space. Equivalence: bit-exact with torchattacks 3.5.1 APGD (same
    seed) on the 'torch' backend, the CPU default; on the Triton kernels the Linf step is
    bit-exact too and the L2 step differs in the last bits of its norms. Unlike the
    reference, the global RNG is not re-seeded: the start is drawn from a private
    generator seeded with seed, which gives the same numbers. With the engine option
    batch_size each chunk is attacked (and seeded) on its own, so results then differ
    from a whole-batch run.

    Arguments:
        model (nn.Module): model to attack.
        norm (str): Lp-norm of the attack. ['Linf', 'L2'] (Default: 'Linf')
        eps (float): maximum perturbation. (Default: 8/255)
        steps (int): number of steps. (Default: 10)
        n_restarts (int): number of random restarts. (Default: 1)
        seed (int): random seed for the starting point. (Default: 0)
        loss (str): loss function optimized. ['ce', 'dlr'] (Default: 'ce')
        eot_iter (int): number of iteration for EOT. (Default: 1)
        rho (float): parameter for step-size update (Default: 0.75)
        verbose (bool): print progress. (Default: False)
        backend (str, keyword only): 'auto', 'triton', 'torch' or 'interpret'. (Default: None)
        **engine (keyword only): see fastadv.Attack and apgd_loop (exact mode by default).

    Shape:
        - images: (N, C, H, W) in [0, 1]. labels: (N,). output: (N, C, H, W).

    Examples::
        >>> attack = fastadv.APGD(model, norm='Linf', eps=8/255, steps=10, n_restarts=1, seed=0, loss='ce', eot_iter=1, rho=.75, verbose=False)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: Optional[int] = 0, loss: Literal["ce", "dlr"] = "ce", eot_iter: int = 1,
                 rho: float = 0.75, verbose: bool = False, *, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("APGD", model, backend, engine, norm, eps, steps, n_restarts, seed, eot_iter, rho, verbose,
                         loss=loss)

    def _options(self):
        return dict(
            norm=self.norm, eps=validation.check_budget(self.eps, "eps"), n_iter=validation.check_steps(self.steps),
            loss=check_choice(self.loss, "loss", LOSSES), eot_iter=self.eot_iter, rho=self.thr_decr,
            backend=self.backend, verbose=self.verbose,
        )

    def perturb(self, x_in, y_in, best_loss=False, cheap=True):
        """(acc, adv) as torchattacks' APGD.perturb; with best_loss, (loss_best, adv_best): the
        highest-loss points over n_restarts runs on every sample, drawn from the global RNG
        (the reference does not seed that path either)."""
        x, y = x_in.clone(), y_in.clone()
        if best_loss:
            options = self._options()
            check_choice(options["norm"], "norm", NORMS)
            adv_best = x.detach().clone()
            loss_best = torch.full([x.shape[0]], -float("inf"), device=x.device)
            for restart in range(check_count(self.n_restarts, "n_restarts")):
                best_curr, _, loss_curr, _ = apgd_single_run(
                    self.get_logits, x, y, generator=None, precision=self.engine.precision, **options
                )
                improved = loss_curr > loss_best
                adv_best = torch.where(_column(improved, x), best_curr, adv_best)
                loss_best = torch.where(improved, loss_curr, loss_best)
                if self.verbose:
                    print("restart {} - loss: {:.5f}".format(restart, loss_best.sum()))
            return loss_best, adv_best
        if not cheap:
            raise ValueError("not implemented yet")
        adv, robust = apgd_loop(
            self.get_logits, x, y, n_restarts=self.n_restarts, seed=self.seed, engine=self.engine, **self._options()
        )
        return robust, adv
