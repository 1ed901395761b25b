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
import types
import warnings
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import ops, slots, validation
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


def checkpoints(n_iter, rho, arithmetic):
    """(k, threshold) per iteration i, as numpy arrays: k > 0 where iteration i ends with a
    checkpoint over its last k iterations, which halves the step of the samples whose loss
    rose at most threshold times in them."""
    k, n_iter_min, size_decr = checkpoint_schedule(n_iter)
    window = np.zeros(n_iter, dtype=np.int64)
    threshold = np.zeros(n_iter, dtype=np.int64)
    counter = 0
    for i in range(n_iter):
        counter += 1
        if counter == k:
            window[i], threshold[i] = k, oscillation_threshold(k, rho, arithmetic)
            counter = 0
            k = max(k - size_decr, n_iter_min)
    return window, threshold


class APGDSlots:
    """APGD's iteration (one run per phase of a unit) on fixed-shape slots (fastadv.slots).

    Every slot carries its own run: iteration index (the slot's age), step size, momentum
    (the previous iterate), best point, loss and gradient, last misclassified point and
    checkpoint state (the running count of loss increases), so samples at different
    iterations share each model call and a refilled slot starts its run at once. The
    arithmetic per sample is apgd's, op for op; where every slot is at the same iteration
    (a single batch, no refills) the masks fall away and the ops are exactly the plain loop's.

    Units: ``data`` holds x [m], y [m], eps [m] (else the program's eps), the CPU generator
    of the random starts (else one seeded with the unit's seed) and, for the targeted loss,
    ``y_target`` [m] or ``order`` [m, C] (the clean logits' classes sorted ascending; else
    computed from the clean logits, in calls of the slots' shape). Phases: n_restarts per target rank (ranks 2..n_target_classes + 1),
    each on the members the phases before left robust, each drawing its starts for them.
    Results per unit: ``robust`` [m] and ``adv`` (the last misclassified iterate where a run
    fooled the sample, else x), and with keep_best ``x_best``, ``loss_best``, ``x_best_adv``.

    fooled_exit: a sample leaves its run once an iterate fooled it (its robust flag is then
    final; with first_fooled its returned point is the first fooling iterate).
    first_step_only: torchattacks APGDT's L2 quirk, every sample steps with the first one's
    step size; it mixes samples, so only for a single batch without exits.
    """

    def __init__(self, forward, *, size, norm, n_iter, n_restarts, loss, n_target_classes=None, eot_iter=1, rho=0.75,
                 arithmetic="torchattacks", backend=None, precision=None, check=None, fooled_exit=False,
                 first_fooled=False, keep_best=False, verbose=False, first_step_only=False, eps=None):
        self.forward = forward
        self.eps = eps  # the budget of units whose data has no eps (a float)
        self.size = size
        self.steps = n_iter + 1  # gradient evaluations per run: the start and after each update
        self.n_iter = n_iter
        self.norm, self.loss, self.arithmetic, self.backend = norm, loss, arithmetic, backend
        self.n_restarts = n_restarts
        self.n_targets = (n_target_classes or 1) if loss == "dlr-targeted" else None
        self.eot_iter, self.precision, self.check = eot_iter, precision, check
        self.fooled_exit, self.first_fooled, self.keep_best, self.verbose = fooled_exit, first_fooled, keep_best, verbose
        self.first_step_only = first_step_only
        self.warn_zero = arithmetic == "original" and loss in ("dlr", "dlr-targeted")
        self.window, self.threshold = checkpoints(n_iter, rho, arithmetic)
        self.s = None  # the slot state, allocated with the first unit

    def phases(self, unit):
        return self.n_restarts * (self.n_targets or 1)

    # -- units and slots -----------------------------------------------------------------------

    def begin(self, unit, phase, members):
        data = unit.data
        if "generator" not in data:
            data["generator"] = torch.Generator().manual_seed(unit.seed)
        if "eps" not in data:
            data["eps"] = _eps_vector(self.eps, data["x"])
        if self.n_targets is not None and "order" not in data and "y_target" not in data:
            data["order"] = slots.forward_in_slots(self.forward, data["x"], self.size).sort(dim=1)[1]
        x = data["x"].index_select(0, members.to(data["x"].device))
        start = apgd_start(x, data["eps"][members.to(data["eps"].device)], norm=self.norm,
                           generator=data["generator"], arithmetic=self.arithmetic)
        state = {"start": start}
        if "y_target" in data:
            state["y_target"] = data["y_target"].index_select(0, members.to(x.device))
        elif self.n_targets is not None:
            rank = 2 + phase // self.n_restarts
            state["y_target"] = data["order"].index_select(0, members.to(x.device))[:, -rank]
        if self.s is None:
            self._allocate(data, start)
        results = unit.results
        if "robust" not in results:
            results["robust"] = torch.zeros(unit.size, dtype=torch.bool, device=x.device)
            results["robust"][unit.members if unit.members is not None else slice(None)] = True
            results["adv"] = data["x"].clone()
            if self.keep_best:
                results["x_best"], results["x_best_adv"] = data["x"].clone(), data["x"].clone()
        if self.verbose:
            print("parameters: ", self.n_iter, *checkpoint_schedule(self.n_iter))
        return state

    def _allocate(self, data, like):
        b, dev = self.size, like.device
        image = like.new_zeros((b, *like.shape[1:])).contiguous(memory_format=validation.memory_format(like))
        s = types.SimpleNamespace()
        for name in ("x", "x_adv", "x_old", "spare", "grad", "grad_best", "x_best", "x_best_adv"):
            setattr(s, name, image.clone())
        s.y = torch.zeros(b, dtype=data["y"].dtype, device=dev)
        s.y_target = torch.zeros_like(s.y) if self.n_targets is not None else None
        s.eps = torch.zeros(b, dtype=data["eps"].dtype, device=dev)
        s.step = torch.zeros(b, dtype=torch.float32, device=dev)
        s.loss_best = torch.zeros(b, device=dev)
        s.loss_best_last_check = torch.zeros(b, device=dev)
        s.last_loss = torch.zeros(b, device=dev)
        s.reduced_last_check = torch.ones(b, dtype=torch.bool, device=dev)
        s.robust = torch.zeros(b, dtype=torch.bool, device=dev)
        s.increases = torch.zeros(b, dtype=torch.long, device=dev)  # the running count of loss increases
        s.increases_at_check = torch.zeros(b, dtype=torch.long, device=dev)  # that count at the last checkpoint
        s.zero_grad = torch.zeros(b, dtype=torch.bool, device=dev)
        s.objective = _Objective(self.forward, s.y, self.loss, y_target=s.y_target, eot_iter=self.eot_iter,
                                 arithmetic=self.arithmetic, check=self.check, precision=self.precision)
        self.s = s

    def admit(self, rows, phase, positions):
        s, data = self.s, phase.unit.data
        dev_rows = rows.to(s.y.device)
        members = phase.members[positions]
        start = phase.state["start"].index_select(0, positions.to(s.y.device))
        for name in ("x_adv", "x_old", "x_best", "x_best_adv"):
            getattr(s, name).index_copy_(0, dev_rows, start)
        s.x.index_copy_(0, dev_rows, data["x"].index_select(0, members.to(s.y.device)))
        s.y.index_copy_(0, dev_rows, data["y"].index_select(0, members.to(s.y.device)))
        eps = data["eps"].index_select(0, members.to(s.y.device))
        s.eps.index_copy_(0, dev_rows, eps)
        s.step.index_copy_(0, dev_rows, eps.float() * 2.0)
        if s.y_target is not None:
            s.y_target.index_copy_(0, dev_rows, phase.state["y_target"].index_select(0, positions.to(s.y.device)))
        s.reduced_last_check = s.reduced_last_check.index_fill(0, dev_rows, True)
        s.last_loss = s.last_loss.index_fill(0, dev_rows, 0.0)
        s.increases = s.increases.index_fill(0, dev_rows, 0)
        s.increases_at_check = s.increases_at_check.index_fill(0, dev_rows, 0)

    # -- one iteration of every slot -------------------------------------------------------------

    def step(self, age):
        s = self.s
        live = age >= 0
        dev = s.y.device
        fresh, running = _Rows(live & (age == 0), dev), _Rows(age >= 1, dev)
        loss, logits, grad = s.objective(s.x_adv)
        pred = logits.max(1)[1] == s.y
        if self.warn_zero and fresh.any:
            zero = (grad.reshape(grad.shape[0], -1).abs().sum(-1) == 0)
            s.zero_grad = fresh.select(zero, s.zero_grad)
        # a fresh slot's first evaluation: its run's initial robust flag, best loss and gradient
        if running.any:
            increased = loss.float() > s.last_loss  # the reference keeps its loss history in fp32
            if self.n_iter == 1:  # the reference compares iteration 0 with loss_steps[-1], itself then
                increased = torch.zeros_like(increased)
            s.increases = running.select(s.increases + increased, s.increases)
            s.last_loss = running.select(loss.float(), s.last_loss)
            improved = running.restrict(loss > s.loss_best)
            fooled = ~pred
            if self.first_fooled:  # keep the first fooling iterate: track it while the run is robust
                fooled = fooled & s.robust
            ops.apgd_track_(s.x_adv, grad, s.x_best, s.grad_best, s.x_best_adv, improved, running.restrict(fooled),
                            backend=self.backend)
            s.loss_best = torch.where(improved, loss, s.loss_best)
            s.robust = running.select(s.robust & pred, s.robust)
        if fresh.any:
            s.robust = fresh.select(pred, s.robust)
            s.loss_best = fresh.select(loss, s.loss_best)
            s.loss_best_last_check = fresh.select(loss, s.loss_best_last_check)
            s.grad_best = fresh.select(grad, s.grad_best) if not fresh.all else grad.clone()
        s.grad = grad
        if self.verbose and running.any and len(set(age[live].tolist())) == 1:
            print("iteration: {} - Best loss: {:.6f}".format(int(age[live][0]) - 1, s.loss_best.sum()))
        if running.any:
            self._checkpoint(age, running.host)
        self._update(age, live, fresh)

    def _checkpoint(self, age, running):
        """The checkpoint of the slots whose iteration ends one: halve the step where the loss
        rose too rarely since the slot's last checkpoint (the reference's windows lie back to
        back, so that count is the running count's growth since then), and restart those from
        the best point. Full-width ops, kept to the slots at a checkpoint by a mask (after
        refills some slot is at one most steps: indexing those rows took more ops)."""
        s = self.s
        i = np.where(running, age - 1, 0)
        at = _Rows(running & (self.window[i] > 0), s.y.device)
        if not at.any:
            return
        thresholds = self.threshold[i]
        mine = thresholds[at.host]
        if (mine == mine[0]).all():  # one checkpoint for all: a scalar, no transfer
            threshold = int(mine[0])
        else:  # slots at different checkpoints (after refills)
            threshold = slots.on_device(np.where(at.host, thresholds, 0), s.y.device)
        reduce = (s.increases - s.increases_at_check <= threshold) | \
            (~s.reduced_last_check & (s.loss_best_last_check >= s.loss_best))
        reduce = at.restrict(reduce)
        s.reduced_last_check = at.select(reduce, s.reduced_last_check)
        s.loss_best_last_check = at.select(s.loss_best, s.loss_best_last_check)
        s.increases_at_check = at.select(s.increases, s.increases_at_check)
        s.step = torch.where(reduce, s.step / 2.0, s.step)
        reset = _column(reduce, s.x_adv)
        torch.where(reset, s.x_best, s.x_adv, out=s.x_adv)
        torch.where(reset, s.grad_best, s.grad, out=s.grad)

    def _update(self, age, live, fresh):
        s = self.s
        moving = live & (age < self.n_iter)
        if not moving.any():
            return
        x_next = self._move(1.0 if fresh.all else 0.75, out=s.spare)
        if fresh.any and not fresh.all:  # a fresh run's first update has no momentum (a = 1)
            # at full width, as in a batch that starts together: the same shape, the same bits
            torch.where(_column(fresh.mask, x_next), self._move(1.0), x_next, out=x_next)
        s.spare, s.x_old, s.x_adv = s.x_old, s.x_adv, x_next

    def _move(self, a, out=None):
        """The update of every slot with momentum weight a."""
        s = self.s
        x_adv, x_old, x, grad, step, eps = s.x_adv, s.x_old, s.x, s.grad, s.step, s.eps
        if self.norm == "Linf":
            return ops.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, backend=self.backend, out=out)
        if self.first_step_only:  # the first slot's step for every row (only ever a single batch)
            step = s.step[:1].expand(step.shape[0])
        return ops.apgd_l2_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, arithmetic=self.arithmetic,
                                backend=self.backend, out=out)

    def shrink(self, rows):
        """Keep only these slots (compaction: fastadv.slots.run's shrink)."""
        s, dev = self.s, self.s.y.device
        rows = rows.to(dev)
        b = s.y.shape[0]
        for name, value in vars(s).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
                setattr(s, name, value.index_select(0, rows))
        s.objective.y, s.objective.y_target = s.y, s.y_target
        self.size = rows.numel()

    # -- exits and results -----------------------------------------------------------------------

    def poll(self, age, limit):
        if not self.fooled_exit:
            return None
        return np.array((~self.s.robust).tolist()) & (age > 0)  # the one host sync of a poll

    def retire(self, rows, phase, positions):
        s, results = self.s, phase.unit.results
        dev_rows = rows.to(s.y.device)
        members = phase.members[positions].to(s.y.device)
        robust = s.robust.index_select(0, dev_rows)
        x = s.x.index_select(0, dev_rows)
        results["robust"].index_copy_(0, members, robust)
        results["adv"].index_copy_(0, members, torch.where(_column(robust, x), x, s.x_best_adv.index_select(0, dev_rows)))
        if self.keep_best:
            results.setdefault("loss_best", torch.zeros(phase.unit.size, dtype=s.loss_best.dtype, device=s.y.device))
            for name in ("x_best", "x_best_adv", "loss_best"):
                results[name].index_copy_(0, members, getattr(s, name).index_select(0, dev_rows))
        if self.warn_zero:
            phase.state["zero"] = phase.state.get("zero", 0) + s.zero_grad.index_select(0, dev_rows).sum()
        if phase.index + 1 < self.phases(phase.unit):
            return robust.tolist()  # which members the next phase attacks (one sync per retirement)
        return None

    def finish(self, phase):
        zero = int(phase.state.get("zero", 0)) if self.warn_zero else 0
        if zero:  # pyautoattack's check, once per run
            warnings.warn(f"there are {zero} points with zero gradient! This might lead to unreliable "
                          "evaluation with gradient-based attacks.", stacklevel=2)
        if self.verbose and self.phases(phase.unit) > 1:
            unit = phase.unit
            restart, rank = phase.index % self.n_restarts, 2 + phase.index // self.n_restarts
            target = "" if self.n_targets is None else f" - target_class {rank}"
            print("restart {}{} - robust accuracy: {:.2%} - cum. time: {:.1f} s".format(
                restart, target, unit.results["robust"].float().mean(), time.time() - unit.data.get("t0", 0.0)))


class _Rows:
    """A set of slots: a numpy bool [B] mask, and its device copy, made once, when first needed."""

    def __init__(self, host: np.ndarray, device):
        self.host, self.device, self._mask = host, device, None
        self.all, self.any = bool(host.all()), bool(host.any())

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = slots.on_device(self.host, self.device)
        return self._mask

    def select(self, a, b):
        """a in these slots, b elsewhere; no op where the set is all or none."""
        if self.all or not self.any:
            return a if self.all else b
        return torch.where(_column(self.mask, a) if a.dim() > 1 else self.mask, a, b)

    def restrict(self, m: torch.Tensor) -> torch.Tensor:
        """The [B] bool m, False outside these slots."""
        return m if self.all else m & self.mask


def apgd_single_run(
    forward, x, y, *, norm="Linf", eps=8 / 255, n_iter=10, loss="ce", y_target=None, eot_iter=1, rho=0.75,
    generator=None, arithmetic="torchattacks", backend=None, verbose=False, check=None, precision=None,
    early_stop=False,
):
    """One APGD run from a random start on inputs the caller owns (APGDSlots on one batch).

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
        early_stop: a sample stops once an iterate fools the model. Its robust flag is then
            already False, and every sample's run is its own (the loss is summed, the step
            sizes and checkpoints are per sample), so every robust flag equals the full run's.
            The sample's x_best_adv is the first iterate that fooled it (the full run returns
            the last one) and its x_best and loss_best stop there. The batch shrinks
            (compaction), so every flag equals the full run's where the model gives a sample
            the same output at any batch size (PyTorch's CPU kernels from 8 samples on);
            evaluations that need exactness run on fixed-shape slots instead (fastadv.evaluate).
            Ignored for torchattacks' targeted L2 step, which takes the first sample's step
            size for all.
    Returns (x_best, robust, loss_best, x_best_adv): the highest-loss point, whether
    the sample was classified correctly at every iterate ([N] bool), that loss, and
    the last misclassified iterate (the start where there is none).
    """
    n = x.shape[0]
    eps = _eps_vector(eps, x)
    first_step_only = norm == "L2" and loss == "dlr-targeted" and arithmetic != "original"
    early_stop = early_stop and not first_step_only
    data = {"x": x, "y": y, "eps": eps, "generator": generator}
    if y_target is not None:
        data["y_target"] = y_target
    r = _run_once(forward, data, norm=norm, n_iter=n_iter, loss=loss, eot_iter=eot_iter, rho=rho,
                  arithmetic=arithmetic, backend=backend, precision=precision, check=check, early_stop=early_stop,
                  keep_best=True, verbose=verbose, first_step_only=first_step_only)
    return r["x_best"], r["robust"], r["loss_best"], r["x_best_adv"]


def _run_once(forward, data, *, early_stop=False, keep_best=False, **options):
    """One APGD run (APGDSlots, one phase) on the samples of data, as one batch; returns its results.

    early_stop: a sample fooled leaves the batch, which shrinks (compaction: one batch has no
    stream to refill its slots from; the others' runs are their own, see apgd_single_run).
    """
    n = data["x"].shape[0]
    program = APGDSlots(forward, size=n, n_restarts=1, fooled_exit=early_stop, first_fooled=early_stop,
                        keep_best=keep_best, **options)
    unit = slots.Unit(n, data)
    slots.run(program, [unit], device=data["x"].device, shrink=early_stop)
    return unit.results


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
        engine: fastadv.engine.EngineOptions. batch_size below N runs the restarts (and
            target classes) on batch_size fixed-shape slots (APGDSlots, fastadv.slots): a
            sample whose run ends leaves its slot to the next, every model call has the shape
            [batch_size, ...], and the random starts are drawn for the whole batch as the
            reference draws them. precision runs the model under autocast and channels_last
            the run in that layout (both change the numbers); early_stop also stops each run
            on a sample once it is fooled: the same robust flags, fewer gradient
            evaluations, and a fooled sample gets the first iterate that fooled it instead of
            the last; cuda_graph does not apply (the checkpoints are host-side control flow).
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
    n = x.shape[0]
    targeted = loss == "dlr-targeted"
    first_step_only = norm == "L2" and targeted and arithmetic != "original"
    early_stop = engine.early_stop and not first_step_only
    size = engine.batch_size if engine.batch_size is not None and engine.batch_size < n and not first_step_only else n
    logits = None
    if robust is None or (targeted and size < n):
        logits = slots.forward_in_slots(forward, x, size)
        check(logits, y)
    robust = logits.max(1)[1] == y if robust is None else robust.to(device=x.device, dtype=torch.bool).clone()
    if verbose:
        rule = "-" * 26
        print(f"{rule} running {norm}-attack with epsilon {_describe(eps)} {rule}")
        print("initial accuracy: {:.2%}".format(robust.float().mean()))
    options = dict(norm=norm, n_iter=n_iter, loss=loss, eot_iter=eot_iter, rho=rho, arithmetic=arithmetic,
                   backend=backend, precision=engine.precision, check=check, verbose=verbose)
    data = {"x": x, "y": y, "eps": eps, "generator": generator, "t0": time.time()}
    if size < n:  # every run of every sample on `size` fixed-shape slots
        program = APGDSlots(forward, size=size, n_restarts=n_restarts, n_target_classes=n_target_classes,
                            fooled_exit=early_stop, first_fooled=early_stop, **options)
        unit = slots.Unit(n, data, members=robust.nonzero().flatten().cpu())  # the one sync before the runs
        if targeted:
            unit.data["order"] = logits.sort(dim=1)[1]
        slots.run(program, [unit], device=x.device)
        return unit.results["adv"].contiguous(memory_format=fmt), unit.results["robust"]

    # one batch: each run attacks the samples still robust, at their count, as the references do
    adv = x.clone()
    for target_rank in [None] if n_target_classes is None else range(2, n_target_classes + 2):
        for restart in range(n_restarts):
            idx = robust.nonzero().reshape(-1)  # the one sync per restart
            if idx.numel() == 0:
                continue
            sub = {"x": x[idx], "y": y[idx], "eps": eps[idx], "generator": generator}
            if target_rank is not None:
                with torch.no_grad():
                    logits = forward(sub["x"])
                check(logits, sub["y"])
                sub["y_target"] = logits.sort(dim=1)[1][:, -target_rank]
            r = _run_once(forward, sub, early_stop=early_stop, first_step_only=first_step_only, **options)
            robust.index_copy_(0, idx, r["robust"])
            adv.index_copy_(0, idx, r["adv"])
            if verbose:
                target = "" if target_rank is None else f" - target_class {target_rank}"
                print("restart {}{} - robust accuracy: {:.2%} - cum. time: {:.1f} s".format(
                    restart, target, robust.float().mean(), time.time() - data["t0"]))
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
        arithmetic=check_choice(arithmetic, "arithmetic", ARITHMETICS), backend=backend, slots=True,
    )


_NO_LOSS = object()  # APGDT takes no loss and, as in torchattacks, has no loss attribute


class _APGDBase(Attack):
    """What APGD and APGDT share: the constructor's checks, forward and the rho alias.

    The attributes are set in torchattacks' order, which __repr__ shows. engine is a
    dict, not **engine, so that a stray loss= given to APGDT still reaches EngineOptions
    (and fails there) instead of binding to loss here.
    """

    runs_on_slots = True

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
    batch_size the runs share batch_size fixed-shape slots (see apgd_loop), and the
    random starts are drawn for the whole batch as the reference draws them.

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
