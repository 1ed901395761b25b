"""FAB: Fast Adaptive Boundary attack (Croce & Hein, ICML 2020). Linf and L2.

FAB looks for the adversarial example closest to the clean point. Each step
linearizes the model around the current iterate, picks the decision hyperplane
nearest in the chosen norm, and projects onto it twice: from the iterate and
from the clean point, with the box [0, 1] as a constraint. The new iterate is a
convex combination of the two projections, biased towards the clean point
(alpha <= alpha_max), with overshoot eta. When the iterate crosses the boundary,
it is kept if it is the closest so far, and is then pulled back towards the
clean point by the factor beta.

The arithmetic follows torchattacks 3.5.1 ``FAB`` op for op. The reference's
per-class backward loop stays a loop on the CPU (input gradient only: no
parameter gradients, unlike the reference's ``.backward()``) and becomes one
batched backward on accelerators where autograd can batch it (the same values
on CPU, where it is slower than the loop). The original ``FABAttack_PT``
(pyautoattack 0.2.0) does the same arithmetic for Linf and L2, so one code path
serves both libraries.
"""
import math
import numbers
import time
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadv import validation
from fastadv.attack import Attack
from fastadv.engine import EngineOptions, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack
from fastadv.retained import SharedForward

NORMS = ("Linf", "L2")
DEFAULT_EPS_BY_NORM = {"Linf": 0.3, "L2": 1.0}
ARITHMETICS = ("torchattacks", "original")
_NO_DISTANCE = 1e10  # "not fooled yet" marker for the best distance, as in the reference


# -- small helpers ------------------------------------------------------------------------


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _per_sample(v, ndims):
    """An [N] or [N, 1] tensor reshaped to broadcast over [N, *dims]."""
    return v.reshape(-1, *([1] * ndims))


def distance(delta, norm):
    """Per-sample Linf or L2 norm of delta [N, ...], reduced as the reference does."""
    if norm == "Linf":
        return _rows(delta).abs().max(dim=1)[0]
    return (_rows(delta) ** 2).sum(dim=-1).sqrt()


def check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def check_seed(seed):
    """An int seed (floats, e.g. from time.time(), are truncated like torch.manual_seed does)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Real) or not math.isfinite(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return int(seed)


def seeded_generator(seed):
    """A private CPU generator in the state torch.manual_seed(seed) gives the global one.

    The references reseed the global CPU generator and draw from it; drawing the
    same numbers from a private generator keeps the caller's global RNG untouched.
    """
    return torch.Generator().manual_seed(check_seed(seed))


def predict(forward, x):
    with torch.no_grad():
        return forward(x).max(1)[1]


# -- projections onto {z : <w, z> = b} within the box [0, 1] --------------------------------
#
# Both take points t [M, D], normals w [M, D] and offsets b [M], and return the
# displacement d [M, D] of minimal norm with <w, t + d> = b (or as close as the box
# allows) and t + d in [0, 1]. The case analysis the reference does with boolean
# indexing is done here on every row with torch.where, so nothing waits on the host;
# each row's arithmetic, and therefore its value, is the reference's.


def _bisect(like, test):
    """Per row, the column k in [0, D-1] the reference's bisection ends on: ceil(log2 D)
    halvings of [lb, ub], moving lb up where test(k [M, 1]) holds."""
    rows, dim = like.shape
    lb = torch.zeros(rows, device=like.device)
    ub = torch.full_like(lb, dim - 1)
    for _ in range(math.ceil(math.log2(dim))):
        mid = torch.floor((lb + ub) / 2)
        go_up = test(mid.long().unsqueeze(1))
        lb = torch.where(go_up, mid, lb)
        ub = torch.where(go_up, ub, mid)
    return lb.long()


def project_linf(t, w, b):
    """Minimal-Linf displacement onto the hyperplane, within the box."""
    dim = w.shape[1]
    side = 2 * ((w * t).sum(1) - b >= 0) - 1  # orient every hyperplane the same way
    w = w * side.unsqueeze(1)
    b = b * side
    neg = (w < 0).float()  # the box face each coordinate moves towards
    nonzero = (w != 0).float()
    d = (neg - t) * nonzero  # the largest move allowed in each coordinate
    p = neg - t * (2 * neg - 1)  # distance to that face
    order = torch.argsort(p, dim=1)

    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    rev = order.flip((1,))
    w_sorted = w.gather(1, rev)
    s = torch.cumsum(w_sorted.abs(), dim=1)
    sb = torch.cumsum(-w_sorted * d.gather(1, rev), dim=1) + b0.unsqueeze(1)

    b_all = sb[:, -1] - s[:, -1] * p.gather(1, order[:, 0:1]).squeeze(1)
    reach_all = b - b_all > 0  # even moving every coordinate fully is not enough
    search = (b - b0 > 0) & (~reach_all)

    def test(k):
        idx = order.gather(1, dim - 1 - k)
        return b - (sb.gather(1, k) - s.gather(1, k) * p.gather(1, idx)).squeeze(1) > 0

    k = _bisect(w, test)

    lam_all = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), min=0).unsqueeze(-1)
    d = torch.where(reach_all.unsqueeze(1), (2 * neg - 1) * lam_all, d)

    sk = sb.gather(1, k.unsqueeze(1)).squeeze(1)
    s_k = s.gather(1, k.unsqueeze(1)).squeeze(1)
    lam = torch.clamp_min((b - sk) / (-s_k), min=0).unsqueeze(-1)
    d_search = torch.min(lam, d) * neg + torch.max(-lam, d) * (1 - neg)
    d = torch.where(search.unsqueeze(1), d_search, d)
    return d * nonzero


def project_l2(t, w, b):
    """Minimal-L2 displacement onto the hyperplane, within the box."""
    c = (w * t).sum(1) - b
    side = 2 * (c >= 0) - 1
    w = w * side.unsqueeze(1)
    c = c * side

    live = (w.abs() > 1e-8).float()
    # the step length along -w at which each coordinate hits the box
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r = r.masked_fill(w.abs() < 1e-8, 1e12)
    r = torch.where(r == -1e12, r * -1, r)
    rs, order = torch.sort(r, dim=1)
    rs_next = F.pad(rs[:, 1:], (0, 1))
    rs = rs.masked_fill(rs == 1e12, 0)
    rs_next = rs_next.masked_fill(rs_next == 1e12, 0)

    w2 = (w ** 2).gather(1, order)
    w2_total = w2.sum(dim=1, keepdim=True)
    w2_rest = w2_total - torch.cumsum(w2, dim=1)
    d = -(r * w)
    d = d * live
    s = torch.cat((-w2_total * rs[:, 0:1], torch.cumsum((-rs_next + rs) * w2_rest, dim=1) - w2_total * rs[:, 0:1]), 1)

    free = s[:, 0] + c < 0  # the unconstrained projection stays inside the box
    clipped = (d * w).sum(dim=1) + c > 0  # even the fully clipped move stays short
    search = ~(free | clipped)

    def test(k):
        return s.gather(1, k).squeeze(1) + c > 0

    k = _bisect(w, test).unsqueeze(1)

    alpha_free = c / w2_total.squeeze(-1)
    d = torch.where(free.unsqueeze(1), -alpha_free.unsqueeze(-1) * w, d)

    w2_k = w2_rest.gather(1, k).squeeze(1)
    alpha = (s.gather(1, k).squeeze(1) + c) / w2_k + rs.gather(1, k).squeeze(1)
    alpha = torch.where(w2_k == 0, torch.zeros_like(alpha), alpha)
    past = (alpha.unsqueeze(-1) > r).float()
    d_search = d * past - alpha.unsqueeze(-1) * w * (1 - past)
    d = torch.where(search.unsqueeze(1), d_search, d)
    return d * live


PROJECTIONS = {"Linf": project_linf, "L2": project_l2}


# -- linearization -------------------------------------------------------------------------


def _all_class_gradients(forward, x):
    """logits [N, C] and d logits / dx as [C, N, ...], one cotangent per class.

    The reference runs one backward per class (retaining the graph), and so does
    this on the CPU, input gradient only: autograd's batched backward
    (is_grads_batched, a vmap over the backward) gives the same values but is about
    2x slower than the loop on the CPU (SmallCNN, batch 128: 370 vs 160 ms per
    linearization). On accelerators the batched backward is used (one pass instead
    of C), falling back to the loop where autograd cannot batch the model.
    """
    im = x.detach().requires_grad_(True)
    with torch.enable_grad():
        shared = SharedForward(forward, im)
        logits = shared.output
        n_classes = logits.shape[1]
        eye = torch.eye(n_classes, dtype=logits.dtype, device=logits.device)
        cot = eye.unsqueeze(1).expand(n_classes, *logits.shape)
        if im.device.type != "cpu":
            try:
                grads = torch.autograd.grad(logits, im, cot, retain_graph=True, is_grads_batched=True)[0]
                return logits.detach(), grads
            except RuntimeError:
                pass
        grads = torch.empty((n_classes, *im.shape), dtype=im.dtype, device=im.device)
        for k in range(n_classes):
            grads[k] = shared.grad(lambda z: z, grad_output=cot[k], retain=k < n_classes - 1)
    return logits.detach(), grads


def linearize(forward, x, labels):
    """Logit differences f_k - f_y [N, C] (1e10 at y) and their gradients [N, C, ...]."""
    logits, grads = _all_class_gradients(forward, x)
    grads = grads.transpose(0, 1)
    u = torch.arange(x.shape[0], device=x.device)
    df = logits - logits[u, labels].unsqueeze(1)
    dg = grads - grads[u, labels].unsqueeze(1)
    df[u, labels] = 1e10
    return df, dg


def linearize_targeted(forward, x, labels, targets):
    """f_t - f_y [N, 1] and its gradient [N, 1, ...]."""
    u = torch.arange(x.shape[0], device=x.device)
    im = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(im)
        diff = -(logits[u, labels] - logits[u, targets])
        grad = torch.autograd.grad(diff.sum(), im)[0]
    return diff.detach().unsqueeze(1), grad.unsqueeze(1)


# -- the attack ----------------------------------------------------------------------------


def fab_single_run(forward, x, y, *, norm, eps, steps, alpha_max, eta, beta, target=None, rand_start=False, generator=None):
    """One FAB run on x [n, ...] (labels y [n]); returns [n, ...].

    target: None (untargeted), an int k (target the class with the k-th largest
    clean logit) or a tensor of target classes indexed like the robust points of x.
    Points that are misclassified or not fooled come back clean; fooled points come
    back as the closest adversarial iterate found.
    """
    ndims = x.dim() - 1
    with torch.no_grad():
        logits = forward(x)
    correct = logits.max(1)[1] == y
    keep = correct.nonzero().squeeze(1)
    if keep.numel() == 0:
        return x.clone()
    if isinstance(target, int):
        target = logits.sort(dim=-1)[1][:, -target]
    x_clean = x[keep]
    labels = y[keep]
    targets = target[keep] if target is not None else None
    bs = x_clean.shape[0]
    u = torch.arange(bs, device=x.device)

    best = x_clean.clone()
    best_dist = torch.full([bs], _NO_DISTANCE, device=x.device)
    x1 = x_clean.clone()
    x0 = _rows(x_clean)

    if rand_start:
        radius = _per_sample(torch.min(best_dist, eps * torch.ones_like(best_dist)), ndims)
        if norm == "Linf":
            t = 2 * torch.rand(x1.shape, generator=generator).to(x.device) - 1
            scale = _per_sample(_rows(t).abs().max(dim=1, keepdim=True)[0], ndims)
        else:
            t = torch.randn(x1.shape, generator=generator).to(x.device)
            scale = _per_sample((t ** 2).reshape(bs, -1).sum(dim=-1).sqrt(), ndims)
        x1 = (x_clean + radius * t / scale * 0.5).clamp(0.0, 1.0)

    project = PROJECTIONS[norm]
    for _ in range(steps):
        with torch.no_grad():
            if targets is None:
                df, dg = linearize(forward, x1, labels)
            else:
                df, dg = linearize_targeted(forward, x1, labels, targets)
            if dg.shape[1] == 1:  # targeted: one hyperplane, the nearest by construction
                w_img, f_near = dg[:, 0], df[:, 0]
            else:
                dg_rows = dg.reshape(dg.shape[0], dg.shape[1], -1)
                dual = dg_rows.abs().sum(dim=-1) if norm == "Linf" else (dg_rows ** 2).sum(dim=-1).sqrt()
                nearest = (df.abs() / (1e-12 + dual)).min(dim=1)[1]
                w_img, f_near = dg[u, nearest], df[u, nearest]
            b = -f_near + _rows(w_img * x1).sum(dim=-1)
            w = _rows(w_img)

            d = project(torch.cat((_rows(x1), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d_iter = d[:bs].reshape(x1.shape)
            d_clean = d[-bs:].reshape(x1.shape)
            size = d.abs().max(dim=1, keepdim=True)[0] if norm == "Linf" else (d ** 2).sum(dim=1, keepdim=True).sqrt()
            # max(size, 1e-8) and min(max(., 0), alpha_max) of the reference, as clamps (the
            # bounds round to the same fp32 values; NaN propagates alike)
            size = _per_sample(size.clamp_min(1e-8), ndims)
            a1, a2 = size[:bs], size[-bs:]
            alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)
            x1 = ((x1 + eta * d_iter) * (1 - alpha) + (x_clean + d_clean * eta) * alpha).clamp(0.0, 1.0)

            fooled = predict(forward, x1) != labels
            dist = distance(x1 - x_clean, norm)
            closer = fooled & (dist < best_dist)
            best = torch.where(_per_sample(closer, ndims), x1, best)
            best_dist = torch.where(closer, dist, best_dist)
            x1 = torch.where(_per_sample(fooled, ndims), x_clean + (x1 - x_clean) * beta, x1)

    out = x.clone()
    succeeded = _per_sample(best_dist < _NO_DISTANCE, ndims)
    out[keep] = torch.where(succeeded, best, x_clean)
    return out


def fab_loop(forward, x, y, *, norm="Linf", eps=8 / 255, steps=10, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
             seed=0, multi_targeted=False, n_target_classes=9, targets=None, generator=None, verbose=False):
    """FAB over restarts (and target classes) on the points still robust; inputs owned by the caller.

    multi_targeted runs FAB-T against the classes with the 2nd .. (n_target_classes+1)-th
    largest clean logits in turn. targets: a tensor of target classes for the batch
    (FAB targeted mode), indexed as torchattacks indexes it (see FAB). generator: the
    CPU generator the random restarts draw from (default: a fresh one seeded with seed).
    Returns the adversarial images; points not fooled within eps stay clean.
    """
    if generator is None:
        generator = seeded_generator(seed)
    forward = validation.explain_float32_inputs(forward, x.dtype, "FAB")
    adv = x.clone()
    start = time.time()
    with torch.no_grad():
        logits = forward(x)
        if multi_targeted and n_target_classes + 1 > logits.shape[1]:
            raise ValueError(
                f"n_classes={n_target_classes + 1} exceeds the {logits.shape[1]} classes the model returns"
            )
        robust = logits.max(1)[1] == y
        plan = range(2, n_target_classes + 2) if multi_targeted else [targets]
        for target in plan:
            for restart in range(n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                x_sub, y_sub = x[idx], y[idx]
                adv_sub = fab_single_run(
                    forward, x_sub, y_sub, norm=norm, eps=eps, steps=steps, alpha_max=alpha_max, eta=eta,
                    beta=beta, target=target, rand_start=restart > 0, generator=generator,
                )
                still = (predict(forward, adv_sub) == y_sub) | (distance(x_sub - adv_sub, norm) > eps)
                robust[idx] = still
                adv[idx] = torch.where(_per_sample(still, x.dim() - 1), adv[idx], adv_sub)
                if verbose:
                    what = f" - target_class {target}" if isinstance(target, int) else ""
                    print(
                        f"restart {restart}{what} - robust accuracy: {robust.float().mean():.2%} at eps = {eps:.5f}"
                        f" - cum. time: {time.time() - start:.1f} s"
                    )
    return adv


def _check_params(norm, eps, steps, n_restarts, alpha_max, eta, beta, seed, n_classes):
    norm = check_norm(norm)
    eps = DEFAULT_EPS_BY_NORM[norm] if eps is None else validation.check_budget(eps, "eps")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    alpha_max = validation.check_budget(alpha_max, "alpha_max")
    if alpha_max > 1:
        raise ValueError(f"alpha_max must lie in [0, 1], got {alpha_max}")
    beta = validation.check_budget(beta, "beta")
    if beta > 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return dict(
        norm=norm, eps=eps, steps=validation.check_steps(steps), n_restarts=validation.check_steps(n_restarts, "n_restarts"),
        alpha_max=alpha_max, eta=validation.check_budget(eta, "eta", positive=True), beta=beta, seed=check_seed(seed),
        n_target_classes=int(n_classes) - 1,
    )


def check_engine(engine):
    """FAB runs in exact mode: of the engine options it honours batch_size (chunks of the
    batch, each attacked as its own call) and channels_last (the same numbers)."""
    if not isinstance(engine, EngineOptions):
        engine = EngineOptions(**(engine or {}))
    if engine.precision is not None or engine.early_stop:
        raise ValueError("FAB supports exact mode only: precision, fast and early_stop are not available")
    return engine


def _fab_core(model, x, y, engine=None, **kwargs):
    return fab_loop(model, engine.layout(x) if engine is not None else x, y, **kwargs)


def check_arithmetic(arithmetic):
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    return arithmetic


def fab(model: Model, images: torch.Tensor, labels: torch.Tensor, *, norm: Literal["Linf", "L2"] = "Linf",
        eps: float = 8 / 255, steps: int = 10, n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, seed: int = 0, multi_targeted: bool = False, n_classes: int = 10,
        arithmetic: Literal["torchattacks", "original"] = "torchattacks", backend: Optional[str] = None,
        **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Fast Adaptive Boundary attack, untargeted or multi-targeted (FAB-T).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, ...] floats in [0, 1]. labels: [N] true class indices.
        norm: 'Linf' or 'L2'. eps: the budget a result must meet to count (None: 0.3 / 1.0).
        steps, n_restarts, alpha_max, eta, beta, seed: as FAB.
        multi_targeted, n_classes: FAB-T against the n_classes-1 most likely other classes in turn.
        arithmetic: 'torchattacks' or 'original' (the same arithmetic; accepted for symmetry).
        **engine: batch_size and channels_last (see fastadv.engine.EngineOptions; FAB's own
            arithmetic is unchanged by them); exact mode only.
    Returns the adversarial images on the model's device: fooled points within eps, the
    others clean. Bit-exact with torchattacks.FAB on CPU; the caller's RNG is untouched.
    """
    check_arithmetic(arithmetic)
    params = _check_params(norm, eps, steps, n_restarts, alpha_max, eta, beta, seed, n_classes)
    engine = check_engine(engine)
    return run_functional(_fab_core, model, images, labels, engine=engine, multi_targeted=bool(multi_targeted), **params)


class FAB(Attack):
    r"""FAB from 'Minimally distorted Adversarial Examples with a Fast Adaptive Boundary Attack'
    [https://arxiv.org/abs/1907.02044], [https://github.com/fra31/auto-attack].

    Threat model: white-box, gradients; minimal Linf or L2 perturbation. Returned points
    are adversarial only when their distance is at most eps, otherwise clean.

    Arguments:
        model (nn.Module): model to attack.
        norm (str): 'Linf' or 'L2'. (Default: 'Linf')
        eps (float): budget a result must meet to be kept; None means 0.3 (Linf) or 1.0 (L2).
            (Default: 8/255)
        steps (int): iterations per run. (Default: 10)
        n_restarts (int): runs per target; restarts after the first start at a random point
            of half the budget. (Default: 1)
        alpha_max (float): largest weight of the projection from the clean point. (Default: 0.1)
        eta (float): overshoot of the projections. (Default: 1.05)
        beta (float): backward step after crossing the boundary. (Default: 0.9)
        verbose (bool): print progress. (Default: False)
        seed (int): seed of the restarts' random starts (a private generator; the global
            RNG is untouched). (Default: 0)
        multi_targeted (bool): FAB-T against the n_classes-1 most likely other classes in
            turn. (Default: False)
        n_classes (int): number of classes (multi_targeted). (Default: 10)
        arithmetic (str, keyword): 'torchattacks' or 'original'. pyautoattack's FABAttack_PT
            does the same arithmetic, so both select the same code. (Default: 'torchattacks')
        backend (str, keyword): accepted for API symmetry; FAB runs on PyTorch ops.
        **engine (keyword): batch_size (chunks attacked as separate calls) and channels_last;
            FAB runs in exact mode only (precision, fast and early_stop raise ValueError).

    Targeted modes (set_mode_targeted_*) attack the given targets; the success test is
    untargeted, as in the reference. torchattacks computes the targets on the whole
    batch and then indexes them with positions within the correctly classified points,
    so targets shift when some inputs are misclassified; this is reproduced.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Equivalence: bit-exact with torchattacks 3.5.1 FAB on CPU (Linf and L2, untargeted,
    multi-targeted, targeted modes, restarts), and with pyautoattack 0.2.0 FABAttack_PT
    (n_iter=steps, targeted=True matching multi_targeted=True). Not checked on a GPU, where
    the batched per-class backward may round differently from the loop. Unlike both references,
    the caller's global RNG state is left unchanged.

    Example::
        >>> attack = fastadv.FAB(model, norm='Linf', eps=8/255, steps=10, multi_targeted=True)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 verbose: bool = False, seed: int = 0, multi_targeted: bool = False, n_classes: int = 10, *,
                 arithmetic: Literal["torchattacks", "original"] = "torchattacks", backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("FAB", model, backend=backend, **engine)
        check_engine(self.engine)
        params = _check_params(norm, eps, steps, n_restarts, alpha_max, eta, beta, seed, n_classes)
        self.arithmetic = check_arithmetic(arithmetic)
        # In torchattacks' order (its repr lists them so); target_class is its attribute too.
        self.norm = params["norm"]
        self.n_restarts = params["n_restarts"]
        self.eps = params["eps"]
        self.alpha_max = params["alpha_max"]
        self.eta = params["eta"]
        self.beta = params["beta"]
        self.steps = params["steps"]
        self.verbose = verbose
        self.seed = params["seed"]
        self.target_class = None
        self.multi_targeted = bool(multi_targeted)
        self.n_target_classes = params["n_target_classes"]
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        x = check_engine(self.engine).layout(x)
        generator = seeded_generator(self.seed)
        targets = None
        if self.targeted and not self.multi_targeted:
            targets = self._fab_targets(x, y, generator)
        return fab_loop(
            self.get_logits, x, y, norm=self.norm, eps=self.eps, steps=self.steps, n_restarts=self.n_restarts,
            alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, multi_targeted=self.multi_targeted,
            n_target_classes=self.n_target_classes, targets=targets, generator=generator, verbose=self.verbose,
        )

    def _fab_targets(self, x, y, generator):
        """The targets, drawn where the reference draws them: random ones come from the
        freshly seeded stream (torchattacks seeds the global RNG just before drawing)."""
        if self.attack_mode != "targeted(random)":
            return self.get_target_label(x, y)
        logits = self.get_output_with_eval_nograd(x)
        validation.check_logits(logits, y, n_classes_min=2)
        t = ((logits.shape[1] - 1) * torch.rand([y.shape[0]], generator=generator)).long().to(y.device)
        return t + (t >= y).long()
