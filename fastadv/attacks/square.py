"""Square Attack (Andriushchenko et al., 2020): score-based random search, Linf and L2.

Two arithmetics:

* 'torchattacks' (default): torchattacks 3.5.1 Square.
* 'original': pyautoattack 0.2.0 SquareAttack, the one AutoAttack runs (with
  resc_schedule=False there). It differs in four places: the window side is capped
  at the image side; a run returns at once when every start is already strictly
  misclassified and otherwise stops only once all samples are fooled; the L2 budget
  of the two windows is measured per channel; and a targeted attack always
  minimizes the cross-entropy to the target, whatever loss says.

Randomness: every draw comes from a private CPU torch.Generator seeded with seed,
in the reference's order, so the draws equal the reference's after
torch.manual_seed(seed) while the caller's global RNG state is left untouched.

Host syncs: the reference gathers the unfooled samples with .nonzero() every query.
With compact_every=1 (the CPU default, and always for L2, whose draws depend on how
many samples are left) the model sees exactly the reference's batches: one test per
query tells whether a sample left the working batch, and only then is it gathered
anew (a robust model keeps the same batch for thousands of queries, so the per-query
gathers and scatters of the reference are skipped); the Linf draws are made a block
of queries at a time. With compact_every=k > 1 (16 on accelerators, Linf) the working
batch is gathered every k queries; in between, the updates are masked on the working
batch and a period's random draws go to the device in one copy.

For AutoAttack: square_loop(forward, x, y, eps=, norm=, n_queries=, n_restarts=,
p_init=, loss=, resc_schedule=, seed=, arithmetic='original', return_success=)
returns adv (and the per-sample success flags), like SquareAttack.perturb(x, y).
"""
import math
import numbers
import time
from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.attacks.cw import engine_forward
from fastadv.engine import EXACT, run_functional
from fastadv.hints import Budget, EngineKwargs, Model, Unpack
from fastadv.validation import check_logits

NORMS = ("Linf", "L2")
LOSSES = ("margin", "ce")
ARITHMETICS = ("torchattacks", "original")
# Queries between compactions of the working batch on accelerators (Linf).
DEFAULT_COMPACT_EVERY_ACCEL = 16


def check_square_args(norm, n_queries, n_restarts, p_init, loss, resc_schedule, seed, arithmetic, compact_every):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, numbers.Integral):
        raise TypeError(f"n_queries must be an int, got {type(n_queries).__name__}")
    if n_queries <= 0:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    n_restarts = validation.check_steps(n_restarts, "n_restarts")
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real):
        raise TypeError(f"p_init must be a number, got {type(p_init).__name__}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must lie in (0, 1], got {p_init}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(resc_schedule, bool):
        raise TypeError(f"resc_schedule must be a bool, got {type(resc_schedule).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Real) or not math.isfinite(seed)):
        raise TypeError(f"seed must be an int (or None for the clock), got {seed!r}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    if compact_every is not None:
        if isinstance(compact_every, bool) or not isinstance(compact_every, numbers.Integral):
            raise TypeError(f"compact_every must be an int or None, got {type(compact_every).__name__}")
        if compact_every < 1:
            raise ValueError(f"compact_every must be >= 1, got {compact_every}")
    return int(n_queries), n_restarts, p_init


# -- randomness ---------------------------------------------------------------------------


class Draws:
    """The reference's random draws, from a private CPU generator, moved to device."""

    def __init__(self, generator, device):
        self.generator = generator
        self.device = device

    def uniform(self, shape):
        return torch.rand(shape, generator=self.generator)

    def sign(self, shape):
        """sign(2 * U[0, 1) - 1): +-1 (0 when the draw is exactly 0.5)."""
        return torch.sign(2 * self.uniform(shape) - 1).to(self.device)

    def integer(self, high, u=None):
        """int(high * U[0, 1)) truncated toward zero, as a Python int (no device sync).

        u: an already drawn [1] uniform (see linf_block), else one is drawn now.
        """
        u = self.uniform([1]) if u is None else u
        return int((0 + high * u).long())

    def linf_block(self, k, c):
        """The draws of k Linf queries at once, in the reference's order (per query: the
        window's row, its column, then C signs), with one host-to-device copy.
        Returns (positions [k, 2] CPU uniforms, signs [k, C, 1, 1] on device)."""
        u = self.uniform([k * (2 + c)]).view(k, 2 + c)
        return u[:, :2], torch.sign(2 * u[:, 2:] - 1).view(k, c, 1, 1).to(self.device)

    def coin(self):
        return bool(self.uniform([1]) > 0.5)

    def skip(self, count):
        if count > 0:
            self.uniform([count])


# -- the L2 window shape --------------------------------------------------------------------


def _nested_squares(rows, cols):
    """[rows, cols]: sum over the centred squares of side 2k+1 covering a cell of 1/(k+1)^2,
    normalized to unit L2 norm (float32, CPU)."""
    d = torch.zeros([rows, cols])
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        d[max(r0 - k, 0):min(r0 - k + 2 * k + 1, rows), max(c0 - k, 0):min(c0 - k + 2 * k + 1, cols)] += (
            1.0 / (torch.tensor([[k + 1.0]]) ** 2)
        )
    d /= (d ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
    return d


_ETA_CACHE = {}


def _eta_base(s):
    """[s, s]: nested squares on the top half, their negation on the bottom half, unit norm."""
    if s not in _ETA_CACHE:
        d = torch.zeros([s, s])
        d[: s // 2] = _nested_squares(s // 2, s)
        d[s // 2:] = -1.0 * _nested_squares(s - s // 2, s)
        d /= (d ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
        _ETA_CACHE[s] = d
    return _ETA_CACHE[s]


def eta(s, draws):
    """The L2 window of side s, transposed on a coin flip (one draw)."""
    d = _eta_base(s)
    if draws.coin():
        d = d.t()
    return d.to(draws.device)


# -- pieces shared by both norms -------------------------------------------------------------


def p_selection(it, n_queries, p_init, resc_schedule):
    """The fraction of pixels the window covers at query it (halving schedule)."""
    if resc_schedule:
        it = int(it / n_queries * 10000)
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def window_side(it, n_queries, p_init, resc_schedule, n_features, c, h, w, norm, original):
    p = p_selection(it, n_queries, p_init, resc_schedule)
    s = int(round(math.sqrt(p * n_features / c)))
    if norm == "Linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        if s % 2 == 0:
            s += 1
    if original:
        s = min(s, min(h, w))
    return s


def margin_and_loss(forward, x, y, *, loss, targeted, original):
    """(margin, loss) per sample; the attack stops at margin <= 0 and minimizes loss.

    margin = z_y - max_{k != y} z_k (targeted: the negation, y being the target).
    """
    logits = forward(x)
    column = y.long().unsqueeze(1)
    y_corr = logits.gather(1, column).squeeze(1)
    y_others = logits.scatter(1, column, -float("inf")).max(dim=-1)[0]
    # the cross-entropy only where it is the loss (the reference computes it always)
    if not targeted:
        margin = y_corr - y_others
        return margin, (-1.0 * F.cross_entropy(logits, y, reduction="none") if loss == "ce" else margin)
    margin = y_others - y_corr
    if original or loss == "ce":
        return margin, F.cross_entropy(logits, y, reduction="none")
    return margin, margin


def _per_sample(eps, like):
    return eps.view(-1, *([1] * (like.dim() - 1))) if isinstance(eps, torch.Tensor) else eps


def _l2_norm(t):
    """Per-sample L2 norm, [N, 1, 1, 1], summed as the reference does."""
    return (t ** 2).view(t.shape[0], -1).sum(-1).sqrt().view(-1, *([1] * (t.dim() - 1)))


def _l2_normalize(t):
    return t / (_l2_norm(t) + 1e-12)


def _linf_start(x, eps, draws):
    n, c, _, w = x.shape
    return torch.clamp(x + _per_sample(eps, x) * draws.sign([n, c, 1, w]), 0.0, 1.0)


def _l2_start(x, eps, draws):
    n, c, h, w = x.shape
    s = h // 5  # >= 1: square_loop rejects smaller images
    offset = (h - s * 5) // 2
    delta = torch.zeros_like(x)
    vh = offset
    for _ in range(h // s):
        vw = offset
        for _ in range(w // s):
            window = eta(s, draws).view(1, 1, s, s)
            delta[:, :, vh:vh + s, vw:vw + s] += window * draws.sign([n, c, 1, 1])
            vw += s
        vh += s
    return torch.clamp(x + _l2_normalize(delta) * _per_sample(eps, x), 0.0, 1.0)


def _linf_candidate(x, x_best, lo, hi, eps, s, draws, position, value):
    """x_best with one window of +-2 eps per channel, projected and clipped.

    position: the query's two CPU uniforms; value: its [C, 1, 1] signs (Draws.linf_block)."""
    _, c, h, w = x.shape
    vh = draws.integer(h - s, position[0:1])
    vw = draws.integer(w - s, position[1:2])
    if isinstance(eps, torch.Tensor):
        new_deltas = torch.zeros_like(x_best)
        new_deltas[:, :, vh:vh + s, vw:vw + s] = (2.0 * _per_sample(eps, x)) * value
    else:
        new_deltas = torch.zeros([c, h, w], dtype=x_best.dtype, device=x_best.device)
        new_deltas[:, vh:vh + s, vw:vw + s] = 2.0 * eps * value
    x_new = torch.min(torch.max(x_best + new_deltas, lo), hi)
    return torch.clamp(x_new, 0.0, 1.0)


def _l2_candidate(x, x_best, eps, s, draws, original):
    """x_best with the mass of a second window moved into a new window; 5 + N*C draws."""
    n, c, h, w = x.shape
    delta = x_best - x
    vh = draws.integer(h - s)
    vw = draws.integer(w - s)
    window_1 = delta[:, :, vh:vh + s, vw:vw + s]
    norms_window_1 = (window_1 ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
    vh2 = draws.integer(h - s)
    vw2 = draws.integer(w - s)
    both = torch.zeros_like(x)
    both[:, :, vh:vh + s, vw:vw + s] = 1.0
    both[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
    norms_image = _l2_norm(delta)
    if original:
        norms_windows = ((delta * both) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
    else:
        norms_windows = _l2_norm(delta * both)
    # Written into a contiguous buffer: a transposed eta would otherwise give the
    # product a transposed layout, and the window sums below another summation order.
    new_deltas = torch.ones([n, c, s, s], dtype=x.dtype, device=x.device)
    new_deltas *= eta(s, draws).view(1, 1, s, s) * draws.sign([n, c, 1, 1])
    new_deltas += window_1 / (1e-12 + norms_window_1)
    eps_sq = (_per_sample(eps, x) * torch.ones_like(norms_image)) ** 2
    budget = (torch.max(eps_sq - norms_image ** 2, torch.zeros_like(norms_image)) / c + norms_windows ** 2).sqrt()
    new_deltas = new_deltas / (1e-12 + (new_deltas ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * budget
    delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
    delta[:, :, vh:vh + s, vw:vw + s] = new_deltas + 0
    return torch.clamp(x + _l2_normalize(delta) * _per_sample(eps, x), 0.0, 1.0)


def _blend(flag, new, old):
    """flag * new + (1 - flag) * old, the reference's float select (kept for its NaN/inf semantics)."""
    return flag * new + (1.0 - flag) * old


def _keep_running(margin_min, it, original):
    """Whether the reference runs query it given margin_min at its start (a device bool)."""
    if not original:
        return (margin_min > 0.0).any()
    if it == 0:
        return (~(margin_min < 0.0)).any()
    return (~(margin_min <= 0.0)).any()


def _gather(idx, x, y, eps, x_best, margin_min, loss_min, n_used, norm):
    """The working batch, rows idx of the inputs and of the run's state: (x, y, eps, x_best,
    margin_min, loss_min, n_used, per-sample eps, lo, hi); the last three (Linf's box) are
    None for L2. Both query loops gather through here so that they index alike."""
    xw, yw = x[idx], y[idx]
    ew = eps[idx] if isinstance(eps, torch.Tensor) else eps
    xbw, mw, lw, qw = x_best[idx], margin_min[idx], loss_min[idx], n_used[idx]
    ep = lo = hi = None
    if norm == "Linf":
        ep = _per_sample(ew, xw)
        lo, hi = xw - ep, xw + ep
    return xw, yw, ew, xbw, mw, lw, qw, ep, lo, hi


# -- one run from a random start ---------------------------------------------------------------


def square_single_run(forward, x, y, *, eps, draws, norm="Linf", n_queries=5000, p_init=0.8, loss="margin",
                      resc_schedule=True, targeted=False, arithmetic="torchattacks", compact_every=1):
    """One Square run on all of x from a random start; the reference's attack_single_run.

    forward: images -> logits. x: [N, C, H, W] in [0, 1]; y: [N] labels (targets when
    targeted); eps: float or [N] tensor; draws: a Draws on x's device.
    compact_every: queries between gathers of the still-unfooled samples into the
    working batch (one host sync each). 1 evaluates the model on exactly the
    reference's batches; more evaluates a superset and masks the updates (same
    algorithm; bits may differ where the model's kernels depend on the batch). L2
    always uses 1: its draws depend on how many samples are left.
    Returns (x_best [N, C, H, W], margin_min [N] (<= 0: fooled), n_queries [N] float).
    """
    original = arithmetic == "original"
    n, c, h, w = x.shape
    n_features = c * h * w
    k_every = 1 if norm == "L2" else compact_every
    x_best = _linf_start(x, eps, draws) if norm == "Linf" else _l2_start(x, eps, draws)
    margin_min, loss_min = margin_and_loss(forward, x_best, y, loss=loss, targeted=targeted, original=original)
    n_used = torch.ones(n, device=x.device)
    if k_every == 1:
        _run_exact(forward, x, y, x_best, margin_min, loss_min, n_used, eps=eps, draws=draws, norm=norm,
                   n_queries=n_queries, p_init=p_init, loss=loss, resc_schedule=resc_schedule, targeted=targeted,
                   original=original)
        return x_best, margin_min, n_used
    # From here on Linf only (L2 always takes the exact path above), compact_every > 1.
    view = [-1] + [1] * (x.dim() - 1)
    it = 0
    while it < n_queries:
        # Compaction point: the reference's loop test, then gather the unfooled samples.
        idx = (margin_min > 0.0).nonzero().flatten()
        if not (bool(_keep_running(margin_min, it, original)) if original else idx.numel() > 0):
            break
        period = range(it, min(it + k_every, n_queries))
        if idx.numel() == 0:  # 'original' may run a query on no sample: only its draws remain
            draws.skip(2 + c)
            it += 1
            continue
        xw, yw, ew, xbw, mw, lw, qw, _, lo, hi = _gather(idx, x, y, eps, x_best, margin_min, loss_min, n_used, norm)
        state = draws.generator.get_state()
        nan_outside = margin_min.isnan().any() if original else None
        alive = torch.ones((), dtype=torch.bool, device=x.device)
        ran = torch.zeros((), dtype=torch.long, device=x.device)
        positions, signs = draws.linf_block(len(period), c)
        for t, j in enumerate(period):
            active = mw > 0.0
            if j > it:
                go = _keep_running(mw, j, original)
                alive = alive & (go | nan_outside if original else go)
            ran = ran + alive
            s = window_side(j, n_queries, p_init, resc_schedule, n_features, c, h, w, norm, original)
            x_new = _linf_candidate(xw, xbw, lo, hi, ew, s, draws, positions[t], signs[t])
            margin, loss_new = margin_and_loss(forward, x_new, yw, loss=loss, targeted=targeted, original=original)
            improved = (loss_new < lw).float()
            lw = torch.where(active, _blend(improved, loss_new, lw), lw)
            improved = torch.max(improved, (margin <= 0.0).float())
            mw = torch.where(active, _blend(improved, margin, mw), mw)
            xbw = torch.where(active.view(view), _blend(improved.view(view), x_new, xbw), xbw)
            qw = qw + active.float()
        x_best[idx], margin_min[idx], loss_min[idx], n_used[idx] = xbw, mw, lw, qw
        executed = int(ran)
        if executed < len(period):  # the reference stopped inside this period
            draws.generator.set_state(state)
            draws.skip(executed * (2 + c))
        it = period.stop
    return x_best, margin_min, n_used


class _LinfBlocks:
    """The Linf queries' draws, a block of queries at a time (one generator call and a
    few ops per block instead of per query), consumed in the reference's order (per
    query: the window's row, its column, then C signs).

    The draws per query are fixed (2 + C uniforms), so drawing ahead gives the same
    numbers; finish() puts the generator where the reference leaves it, just past
    the queries actually run.
    """

    BLOCK = 256

    def __init__(self, draws, c, h, w, n_queries, side):
        self.draws, self.c, self.h, self.w = draws, c, h, w
        self.n_queries, self.side = n_queries, side
        self.start = self.stop = 0
        self.state = None

    def take(self, j):
        """(vh, vw, signs [C, 1, 1] on the device) of query j (queries come in order)."""
        if j >= self.stop:
            self._draw(j)
        t = j - self.start
        return self.rows[t], self.cols[t], self.signs[t]

    def _draw(self, j):
        k = min(self.BLOCK, self.n_queries - j)
        self.state = self.draws.generator.get_state()
        u = self.draws.uniform([k * (2 + self.c)]).view(k, 2 + self.c)
        sides = [self.side(i) for i in range(j, j + k)]
        # int((0 + high * u).long()) per query, as Draws.integer, for the whole block
        highs = torch.tensor([[self.h - s, self.w - s] for s in sides], dtype=u.dtype)
        pos = (0 + highs * u[:, :2]).long().tolist()
        self.rows, self.cols = [p[0] for p in pos], [p[1] for p in pos]
        self.signs = torch.sign(2 * u[:, 2:] - 1).view(k, self.c, 1, 1).to(self.draws.device)
        self.start, self.stop = j, j + k

    def finish(self, next_query):
        """Rewind the generator to just after the draws of queries < next_query."""
        if self.state is not None and next_query < self.stop:
            self.draws.generator.set_state(self.state)
            self.draws.skip((next_query - self.start) * (2 + self.c))


def _run_exact(forward, x, y, x_best, margin_min, loss_min, n_used, *, eps, draws, norm, n_queries, p_init, loss,
               resc_schedule, targeted, original):
    """The queries on exactly the reference's batches (compact_every=1), updating x_best,
    margin_min, loss_min and n_used in place.

    The working batch (the samples with margin > 0) is gathered only when it changes:
    a sample leaves it once fooled and never comes back, so one test per query (one
    sync, where the reference syncs on nonzero) tells whether the batch of the next
    query is the same one; only then are the working tensors written back and the
    batch gathered anew. Each query's arithmetic is the reference's on the same rows.
    """
    n, c, h, w = x.shape
    n_features = c * h * w
    eps_t = isinstance(eps, torch.Tensor)
    view = [-1] + [1] * (x.dim() - 1)

    def side(j):
        return window_side(j, n_queries, p_init, resc_schedule, n_features, c, h, w, norm, original)

    blocks = _LinfBlocks(draws, c, h, w, n_queries, side) if norm == "Linf" else None
    idx = None  # the working batch's rows in the full tensors; None: not gathered
    xw = yw = ew = xbw = mw = lw = qw = lo = hi = window_eps = None  # the working batch's tensors
    it = 0
    while it < n_queries:
        if idx is not None and not bool((mw > 0.0).all()):
            x_best[idx], margin_min[idx], loss_min[idx], n_used[idx] = xbw, mw, lw, qw
            idx = None
        if idx is None:
            # the reference's loop test, then its gather of the unfooled samples
            idx = (margin_min > 0.0).nonzero().flatten()
            if idx.numel() == 0:
                idx = None
                if not (original and bool(_keep_running(margin_min, it, original))):
                    break
                # 'original' may run a query on no sample: only its draws remain
                if blocks is not None:
                    blocks.take(it)
                else:
                    draws.skip(5)
                it += 1
                continue
            xw, yw, ew, xbw, mw, lw, qw, ep, lo, hi = _gather(idx, x, y, eps, x_best, margin_min, loss_min, n_used,
                                                              norm)
            if norm == "Linf" and eps_t:
                window_eps = 2.0 * ep
        s = side(it)
        if norm == "Linf":
            vh, vw, value = blocks.take(it)
            if eps_t:
                new_deltas = torch.zeros_like(xbw)
                new_deltas[:, :, vh:vh + s, vw:vw + s] = window_eps * value
            else:
                new_deltas = torch.zeros([c, h, w], dtype=xbw.dtype, device=xbw.device)
                new_deltas[:, vh:vh + s, vw:vw + s] = 2.0 * eps * value
            x_new = torch.min(torch.max(xbw + new_deltas, lo), hi).clamp_(0.0, 1.0)
        else:
            x_new = _l2_candidate(xw, xbw, ew, s, draws, original)
        margin, loss_new = margin_and_loss(forward, x_new, yw, loss=loss, targeted=targeted, original=original)
        improved = (loss_new < lw).float()
        lw = _blend(improved, loss_new, lw)
        improved = torch.max(improved, (margin <= 0.0).float())
        mw = _blend(improved, margin, mw)
        xbw = _blend(improved.view(view), x_new, xbw)
        qw = qw + 1.0
        it += 1
    if idx is not None:
        x_best[idx], margin_min[idx], loss_min[idx], n_used[idx] = xbw, mw, lw, qw
    if blocks is not None:
        blocks.finish(it)


# -- restarts, the reference's perturb -------------------------------------------------------------


def default_compact_every(device, norm):
    return 1 if norm == "L2" or torch.device(device).type == "cpu" else DEFAULT_COMPACT_EVERY_ACCEL


def square_loop(forward, x, y, *, eps=8 / 255, norm="Linf", n_queries=5000, n_restarts=1, p_init=0.8, loss="margin",
                resc_schedule=True, seed=0, targeted=False, arithmetic="torchattacks", compact_every=None,
                generator=None, return_success=False, verbose=False, engine=EXACT):
    """Square on inputs the caller owns; the reference's perturb (restarts on the unfooled).

    forward: images -> logits. x: [N, C, H, W] in [0, 1]; y: [N] true labels, or the
    targets when targeted. eps: float or [N] tensor on x's device. seed: int seeding a
    private CPU generator (ignored when generator, a CPU torch.Generator, is given).
    Returns adv [N, C, H, W]: for each sample the first run's point that fools the
    model (re-checked with one forward on the run's batch), else x. With
    return_success, also the per-sample flags [N] bool: the model misclassifies adv
    (hits the target when targeted), including samples misclassified from the start.
    Host syncs: one per restart, one per compaction (see square_single_run).
    engine: precision and channels_last apply to the model (see engine_forward);
    Square stops per sample by itself (early_stop changes nothing).
    """
    if x.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if norm == "L2" and x.shape[2] < 5:
        raise ValueError(f"Square L2 needs images of at least 5x5 pixels, got {x.shape[2]}x{x.shape[3]}")
    fmt = validation.memory_format(x)
    x = x.contiguous()
    forward = validation.explain_float32_inputs(engine_forward(forward, engine), x.dtype, "Square")
    with torch.no_grad():
        pred = forward(x).max(1)[1]
        acc = pred != y if targeted else pred == y
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        draws = Draws(generator, x.device)
        k_every = compact_every if compact_every is not None else default_compact_every(x.device, norm)
        adv = x.clone()
        start = time.time()
        for restart in range(n_restarts):
            ind = acc.nonzero().flatten()
            if ind.numel() == 0:
                continue
            ew = eps[ind] if isinstance(eps, torch.Tensor) else eps
            x_best, _, _ = square_single_run(
                forward, x[ind].clone(), y[ind].clone(), eps=ew, draws=draws, norm=norm, n_queries=n_queries,
                p_init=p_init, loss=loss, resc_schedule=resc_schedule, targeted=targeted, arithmetic=arithmetic,
                compact_every=k_every,
            )
            pred = forward(x_best).max(1)[1]
            still = pred != y[ind] if targeted else pred == y[ind]
            fooled = ind[~still]
            acc[fooled] = False
            adv[fooled] = x_best[~still].clone()
            if verbose:
                print(f"restart {restart} - robust accuracy: {acc.float().mean():.2%} - cum. time: {time.time() - start:.1f} s")
    adv = adv.contiguous(memory_format=fmt)
    return (adv, ~acc) if return_success else adv


def _checked_forward(forward, y):
    """forward that checks its first output (the clean batch's logits) against y."""
    checked = []

    def wrapped(x):
        out = forward(x)
        if not checked:
            check_logits(out, y, n_classes_min=2)
            checked.append(True)
        return out

    return wrapped


def square(model: Model, images: torch.Tensor, labels: torch.Tensor, *, norm: Literal["Linf", "L2"] = "Linf",
           eps: Budget = 8 / 255, n_queries: int = 5000, n_restarts: int = 1, p_init: float = 0.8,
           loss: Literal["margin", "ce"] = "margin", resc_schedule: bool = True, seed: Optional[int] = 0,
           targeted: bool = False, arithmetic: Literal["torchattacks", "original"] = "torchattacks",
           compact_every: Optional[int] = None, return_success: bool = False, backend: Optional[str] = None,
           **engine: Unpack[EngineKwargs]) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Square Attack, a score-based (gradient-free) random search in the Linf or L2 ball.

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        norm: 'Linf' or 'L2'. (Default: 'Linf')
        eps: budget, a float or a per-sample [N] tensor, >= 0. (Default: 8/255)
        n_queries (int >= 1): queries per restart. (Default: 5000)
        n_restarts (int >= 0): runs, each on the samples not fooled yet. (Default: 1)
        p_init (float in (0, 1]): initial fraction of pixels a window covers. (Default: 0.8)
        loss: 'margin' or 'ce', the score minimized. (Default: 'margin')
        resc_schedule (bool): rescale the window schedule to n_queries. (Default: True)
        seed (int): seed of the private CPU generator; the global RNG is not touched. (Default: 0)
        arithmetic: 'torchattacks' (torchattacks 3.5.1 Square) or 'original'
            (pyautoattack 0.2.0 SquareAttack, AutoAttack's). (Default: 'torchattacks')
        compact_every (int or None): queries between host syncs that shrink the
            working batch (Linf); None: 1 on CPU, 16 on accelerators. (Default: None)
        return_success (bool): also return the per-sample success flags. (Default: False)
        **engine: fastadv.engine.EngineOptions: precision, channels_last (the model's
            input), batch_size (each chunk is attacked as its own call, seeded alike).
    Returns adv [N, C, H, W] on the model's device (and success [N] bool).
    Equivalence (float eps, compact_every=1, CPU, fp32): bit-exact with torchattacks
    3.5.1 Square ('torchattacks') and with pyautoattack 0.2.0 SquareAttack ('original').
    """
    n_queries, n_restarts, p_init = check_square_args(
        norm, n_queries, n_restarts, p_init, loss, resc_schedule, seed, arithmetic, compact_every)
    validation.check_images(images)
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got shape {tuple(images.shape)}")
    if seed is None:
        seed = time.time()
    out = run_functional(
        _square_core, model, images, labels, budgets=("eps",), engine=engine, eps=eps, norm=norm,
        n_queries=n_queries, n_restarts=n_restarts, p_init=p_init, loss=loss, resc_schedule=resc_schedule,
        seed=seed, targeted=targeted, arithmetic=arithmetic, compact_every=compact_every, packed=return_success,
    )
    if not return_success:
        return out
    if images.shape[0] == 0:
        return out, torch.zeros(0, dtype=torch.bool, device=out.device)
    return out[:, :-1].reshape(images.shape).contiguous(), out[:, -1] > 0.5


def _square_core(model, x, y, *, packed, engine, **kwargs):
    """square_loop for run_functional; packed: the success flag rides along as one more
    column of the flattened images, so chunking concatenates both."""
    adv, success = square_loop(_checked_forward(model, y), x, y, return_success=True, engine=engine, **kwargs)
    if not packed:
        return adv
    return torch.cat([adv.reshape(adv.shape[0], -1), success.to(adv.dtype)[:, None]], dim=1)


class Square(Attack):
    r"""Square Attack in the paper 'Square Attack: a query-efficient black-box adversarial
    attack via random search' [https://arxiv.org/abs/1912.00049].

    Distance measure: Linf or L2 (eps-ball around the clean image, then [0, 1]).
    A gradient-free random search: each query changes one square window (Linf: to
    +-eps per channel; L2: moves mass between two windows) and keeps the change when
    the loss drops or the sample becomes misclassified.

    Equivalence: bit-exact with torchattacks 3.5.1 Square on CPU in fp32 with the same
    seed (Linf and L2, margin and ce, every targeted mode) when compact_every is 1,
    the default on CPU. arithmetic='original' is bit-exact with pyautoattack 0.2.0
    SquareAttack. Unlike the reference, the global RNG is never re-seeded: draws come
    from a private CPU generator seeded with seed. With compact_every > 1 (the default
    on accelerators, Linf) the model runs on a superset of the reference's batches
    with masked updates: the same algorithm, and the random draws stay aligned.

    Arguments:
        model (nn.Module): model to attack.
        norm (str): 'Linf' or 'L2'. (Default: 'Linf')
        eps (float): maximum perturbation, >= 0. (Default: 8/255)
        n_queries (int): queries per restart, >= 1. (Default: 5000)
        n_restarts (int): random restarts, >= 0. (Default: 1)
        p_init (float): initial fraction of pixels a window covers, in (0, 1]. (Default: 0.8)
        loss (str): 'margin' or 'ce'. (Default: 'margin')
        resc_schedule (bool): rescale the p schedule to n_queries. (Default: True)
        seed (int): random seed; None draws it from the clock once. (Default: 0)
        verbose (bool): print robust accuracy after each restart. (Default: False)
        arithmetic (str, keyword-only): 'torchattacks' or 'original'. (Default: 'torchattacks')
        compact_every (int, keyword-only): queries between host syncs shrinking the
            working batch; None: 1 on CPU, 16 elsewhere (L2 always 1). (Default: None)
        backend (str, keyword-only): accepted for API uniformity; Square has no kernels.
        **engine (keyword-only): see fastadv.Attack; precision and channels_last apply
            to the model, batch_size chunks the batch (each chunk attacked as its own
            call with the same seed); Square stops per sample anyway.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.Square(model, norm='Linf', eps=8/255, n_queries=5000, n_restarts=1,
        ...                         p_init=.8, seed=0, verbose=False, loss='margin', resc_schedule=True)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255,
                 n_queries: int = 5000, n_restarts: int = 1, p_init: float = 0.8,
                 loss: Literal["margin", "ce"] = "margin", resc_schedule: bool = True, seed: Optional[int] = 0,
                 verbose: bool = False, *, arithmetic: Literal["torchattacks", "original"] = "torchattacks",
                 compact_every: Optional[int] = None, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("Square", model, backend=backend, **engine)
        n_queries, n_restarts, p_init = check_square_args(
            norm, n_queries, n_restarts, p_init, loss, resc_schedule, seed, arithmetic, compact_every)
        self.norm = norm  # in torchattacks' order, which its repr shows
        self.n_queries = n_queries
        self.eps = validation.check_budget(eps, "eps")
        self.p_init = p_init
        self.n_restarts = n_restarts
        self.seed = seed
        self.verbose = verbose
        self.loss = loss
        self.rescale_schedule = resc_schedule
        self.arithmetic = arithmetic
        self.compact_every = compact_every
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return self.perturb(x, y)

    def perturb(self, x, y=None):
        """The attack on [0, 1] inputs; y None: the model's predictions (untargeted) or
        the target function's labels (targeted), as the reference."""
        if self.seed is None:
            self.seed = time.time()
        if y is None:
            if self.targeted:
                y = self.get_target_label(x, None)
            else:
                with torch.no_grad():
                    y = self.get_logits(x).max(1)[1]
        elif self.targeted:
            y = self.get_target_label(x, y)
        y = y.detach().clone().long()
        return square_loop(
            _checked_forward(self.get_logits, y), x, y, eps=self.eps, norm=self.norm, n_queries=self.n_queries,
            n_restarts=self.n_restarts, p_init=self.p_init, loss=self.loss, resc_schedule=self.rescale_schedule,
            seed=self.seed, targeted=self.targeted, arithmetic=self.arithmetic, compact_every=self.compact_every,
            verbose=self.verbose, engine=self.engine,
        )
