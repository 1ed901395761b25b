"""Fused APGD updates (Croce & Hein, 2020): one launch per iteration for the whole step.

Linf (elementwise; reads x_adv, x_old, x and grad once, writes the next iterate):

    z   = P(x_adv + step * sign(grad))
    out = P(x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a))
    P(v) = clamp(min(max(v, x - eps), x + eps), 0, 1)

L2 (three per-sample norms, each depending on the previous one):

    z   = x_adv + step * grad / (n(grad) + 1e-12)
    z   = clamp(x + (z - x) / (n(z - x) + 1e-12) * min(eps, n(z - x)), 0, 1)
    u   = x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a)
    out = clamp(x + (u - x) / (n(u - x) + 1e-12) * min(eps, n(u - x) [+ 1e-12]), 0, 1)

ORIGINAL selects pyautoattack 0.2.0's order, step * (grad / (n(grad) + 1e-12)),
and drops the last "+ 1e-12" (torchattacks 3.5.1 has it). When a sample fits in
one block (C*H*W <= MAX_ROW) one program owns it and the step is one launch;
larger samples take four launches over (tile, sample) tiles: partial sums of
grad^2, of (z - x)^2 and of (u - x)^2, then the write, each recomputing the
elementwise chain rather than storing it.

Bookkeeping (``apgd_track_``, in place): where the loss rose, x_best and
grad_best take x_adv and grad; where the model is fooled, x_best_adv takes x_adv.
Only the rows that change are read and written.

Every elementwise op is rounded to the tensor dtype where PyTorch rounds, so the
Linf step and the bookkeeping equal their twins in fastadv.reference bit for bit
in fp32, fp16 and bf16. The L2 norms are fp32 (as the twin keeps them for half
precision) and summed in a tree order that differs from torch's, so the L2 step
may differ from its twin in the last bits (about one fp32 ulp; in fp16/bf16 the
final rounding usually hides it).
"""
import torch
import triton
import triton.language as tl

from ._common import clamp, element_eps, element_samples, load_f32, minimum, rnd, sample_eps, sample_row, sample_tile, sign, total
from .utils import check_images, deliver, dense_like, elementwise_settings, eps_args, output_buffer

MAX_ROW = 4096  # largest sample handled by the one-launch L2 row kernel
TILE = 2048  # tile of the multi-launch L2 path


@triton.jit
def _project_box(v, lo, hi):
    """clamp(min(max(v, x - eps), x + eps), 0, 1)."""
    return clamp(clamp(v, lo, hi), 0.0, 1.0)


@triton.jit
def _blend(xa, xo, z, a, b, DT: tl.constexpr):
    """x_adv + (z - x_adv) * a + (x_adv - x_old) * b, left to right as the reference adds."""
    u = rnd(xa + rnd(rnd(z - xa, DT) * a, DT), DT)
    return rnd(u + rnd(rnd(xa - xo, DT) * b, DT), DT)


@triton.jit
def _apgd_linf_kernel(
    adv_ptr,  # current iterate x_adv, read
    old_ptr,  # previous iterate x_old, read
    x_ptr,  # clean images, read
    grad_ptr,  # loss gradient at x_adv, read
    out_ptr,  # next iterate, written
    step_ptr,  # [N] fp32 step sizes when PER_SAMPLE_STEP
    eps_ptr,  # [N] fp32 budgets when PER_SAMPLE_EPS
    step,  # fp32 step size when not PER_SAMPLE_STEP
    eps,  # fp32 budget when not PER_SAMPLE_EPS
    a,  # momentum weight (1.0 on the first iteration, then 0.75)
    b,  # 1 - a
    n_elements,  # elements in the batch
    sample_numel,  # elements per sample
    PER_SAMPLE_STEP: tl.constexpr,
    PER_SAMPLE_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_elements
    sample = element_samples(start, sample_numel, BLOCK)
    xa = tl.load(adv_ptr + offs, mask=mask).to(tl.float32)
    xo = tl.load(old_ptr + offs, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    s = element_eps(step, step_ptr, sample, mask, PER_SAMPLE_STEP)
    e = element_eps(eps, eps_ptr, sample, mask, PER_SAMPLE_EPS)
    lo = rnd(x - e, DT)
    hi = rnd(x + e, DT)
    z = _project_box(rnd(xa + rnd(s * sign(g), DT), DT), lo, hi)
    out = _project_box(_blend(xa, xo, z, a, b, DT), lo, hi)
    tl.store(out_ptr + offs, out.to(DT), mask=mask)


@triton.jit
def _l2_z(xa, x, g, s, gnorm, tiny, mask, DT: tl.constexpr, ORIGINAL: tl.constexpr):
    """z - x for z = x_adv + step * grad / (n(grad) + 1e-12); 0 on masked lanes."""
    den = gnorm + tiny  # fp32, as the reference's norm column
    if ORIGINAL:
        z = rnd(xa + rnd(s * rnd(tl.div_rn(g, den), DT), DT), DT)
    else:
        z = rnd(xa + rnd(tl.div_rn(rnd(s * g, DT), den), DT), DT)
    return tl.where(mask, rnd(z - x, DT), 0.0)


@triton.jit
def _l2_project(x, d, n, e, tiny, PLUS_TINY: tl.constexpr, DT: tl.constexpr):
    """clamp(x + d / (n + 1e-12) * min(eps, n [+ 1e-12]), 0, 1)."""
    den = n + tiny
    if PLUS_TINY:
        m = rnd(minimum(e, den), DT)
    else:
        m = rnd(minimum(e, n), DT)
    q = rnd(tl.div_rn(d, den), DT)
    return clamp(rnd(x + rnd(q * m, DT), DT), 0.0, 1.0)


@triton.jit
def _l2_blend_delta(xa, xo, x, d1, n1, e, a, b, tiny, mask, DT: tl.constexpr):
    """u - x for the momentum blend u of the projected z = x + d1 (0 on masked lanes)."""
    z = _l2_project(x, d1, n1, e, tiny, False, DT)
    return tl.where(mask, rnd(_blend(xa, xo, z, a, b, DT) - x, DT), 0.0)


@triton.jit
def _apgd_l2_row_kernel(
    adv_ptr, old_ptr, x_ptr, grad_ptr, out_ptr,  # [N, sample_numel] in storage order
    step_ptr, eps_ptr,  # [N] fp32 step sizes / budgets when per sample
    step, eps,  # fp32 scalars otherwise
    a, b,  # momentum weight and 1 - a
    tiny,  # fp32 1e-12
    sample_numel,  # elements per sample, <= BLOCK
    ORIGINAL: tl.constexpr,  # pyautoattack's arithmetic instead of torchattacks'
    LAST_TINY: tl.constexpr,  # 1e-12 inside the last min (torchattacks, i.e. not ORIGINAL)
    PER_SAMPLE_STEP: tl.constexpr,
    PER_SAMPLE_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    sample, offs, mask = sample_row(sample_numel, BLOCK)
    g = load_f32(grad_ptr, offs, mask)
    xa = load_f32(adv_ptr, offs, mask)
    xo = load_f32(old_ptr, offs, mask)
    x = load_f32(x_ptr, offs, mask)
    s = sample_eps(step, step_ptr, sample, PER_SAMPLE_STEP)
    e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
    d1 = _l2_z(xa, x, g, s, tl.sqrt_rn(total(g * g, 0)), tiny, mask, DT, ORIGINAL)
    d2 = _l2_blend_delta(xa, xo, x, d1, tl.sqrt_rn(total(d1 * d1, 0)), e, a, b, tiny, mask, DT)
    out = _l2_project(x, d2, tl.sqrt_rn(total(d2 * d2, 0)), e, tiny, LAST_TINY, DT)
    tl.store(out_ptr + offs, out.to(DT), mask=mask)


@triton.jit
def _apgd_l2_tile_kernel(
    adv_ptr, old_ptr, x_ptr, grad_ptr, out_ptr,  # [N, sample_numel] in storage order
    gpart_ptr, zpart_ptr, upart_ptr,  # [N, n_tiles] fp32 partial sums of grad^2, (z-x)^2, (u-x)^2
    step_ptr, eps_ptr, step, eps, a, b, tiny,  # as in the row kernel
    sample_numel, n_tiles,
    PHASE: tl.constexpr,  # 0: sum grad^2; 1: sum (z-x)^2; 2: sum (u-x)^2; 3: write the step
    ORIGINAL: tl.constexpr,
    LAST_TINY: tl.constexpr,
    PER_SAMPLE_STEP: tl.constexpr,
    PER_SAMPLE_EPS: tl.constexpr,
    TILE: tl.constexpr,
    TILES_POW2: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tile, sample, offs, mask = sample_tile(sample_numel, TILE)
    t = tl.arange(0, TILES_POW2)
    t_mask = t < n_tiles
    g = load_f32(grad_ptr, offs, mask)
    if PHASE == 0:
        tl.store(gpart_ptr + sample * n_tiles + tile, total(g * g, 0))
    else:
        xa = load_f32(adv_ptr, offs, mask)
        x = load_f32(x_ptr, offs, mask)
        s = sample_eps(step, step_ptr, sample, PER_SAMPLE_STEP)
        # the norms: fp32 sums of the [n_tiles] partial sums
        gnorm = tl.sqrt_rn(total(tl.load(gpart_ptr + sample * n_tiles + t, mask=t_mask, other=0.0), 0))
        d1 = _l2_z(xa, x, g, s, gnorm, tiny, mask, DT, ORIGINAL)
        if PHASE == 1:
            tl.store(zpart_ptr + sample * n_tiles + tile, total(d1 * d1, 0))
        else:
            xo = load_f32(old_ptr, offs, mask)
            e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
            n1 = tl.sqrt_rn(total(tl.load(zpart_ptr + sample * n_tiles + t, mask=t_mask, other=0.0), 0))
            d2 = _l2_blend_delta(xa, xo, x, d1, n1, e, a, b, tiny, mask, DT)
            if PHASE == 2:
                tl.store(upart_ptr + sample * n_tiles + tile, total(d2 * d2, 0))
            else:
                n2 = tl.sqrt_rn(total(tl.load(upart_ptr + sample * n_tiles + t, mask=t_mask, other=0.0), 0))
                out = _l2_project(x, d2, n2, e, tiny, LAST_TINY, DT)
                tl.store(out_ptr + offs, out.to(DT), mask=mask)


@triton.jit
def _apgd_track_kernel(
    adv_ptr,  # current iterate, read where improved or fooled
    grad_ptr,  # its gradient, read where improved
    best_ptr,  # x_best, written where improved
    gbest_ptr,  # grad_best, written where improved
    best_adv_ptr,  # x_best_adv, written where fooled
    improved_ptr,  # [N] uint8: the loss rose above the best so far
    fooled_ptr,  # [N] uint8: the model misclassifies x_adv
    n_elements, sample_numel,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_elements
    sample = element_samples(start, sample_numel, BLOCK)
    imp = mask & (tl.load(improved_ptr + sample, mask=mask, other=0) != 0)
    fool = mask & (tl.load(fooled_ptr + sample, mask=mask, other=0) != 0)
    xa = tl.load(adv_ptr + offs, mask=imp | fool)
    tl.store(best_ptr + offs, xa, mask=imp)
    tl.store(best_adv_ptr + offs, xa, mask=fool)
    g = tl.load(grad_ptr + offs, mask=imp)
    tl.store(gbest_ptr + offs, g, mask=imp)


def _momentum(a):
    a = float(a)
    return a, 1.0 - a


def apgd_linf_step(x_adv, x_old, x, grad, *, step, eps, a, out=None):
    """Launch the fused APGD Linf update. step and eps are floats or [N] tensors; returns out."""
    check_images(x_adv=x_adv, x_old=x_old, x=x, grad=grad)
    x_adv, x_old, x, grad = dense_like(x_adv, x_old, x, grad)
    buf = output_buffer(out, x_adv)
    n = x_adv.numel()
    if n == 0:
        return deliver(out, buf)
    step_val, step_ptr, per_sample_step = eps_args(step, x_adv.shape[0], x_adv.device, "step")
    eps_val, eps_ptr, per_sample_eps = eps_args(eps, x_adv.shape[0], x_adv.device)
    a, b = _momentum(a)
    block, num_warps = elementwise_settings(n)
    _apgd_linf_kernel[(triton.cdiv(n, block),)](
        x_adv, x_old, x, grad, buf, step_ptr, eps_ptr, step_val, eps_val, a, b, n, n // x_adv.shape[0],
        PER_SAMPLE_STEP=per_sample_step, PER_SAMPLE_EPS=per_sample_eps, BLOCK=block,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return deliver(out, buf)


def apgd_l2_step(x_adv, x_old, x, grad, *, step, eps, a, arithmetic="torchattacks", out=None, max_row=MAX_ROW):
    """Launch the fused APGD L2 update ('torchattacks' or 'original' arithmetic); returns out.

    Samples of at most max_row elements take the one-launch row kernel, larger ones
    the four-launch tiled path.
    """
    if arithmetic not in ("torchattacks", "original"):
        raise ValueError(f"arithmetic must be 'torchattacks' or 'original', got {arithmetic!r}")
    check_images(x_adv=x_adv, x_old=x_old, x=x, grad=grad)
    x_adv, x_old, x, grad = dense_like(x_adv, x_old, x, grad)
    buf = output_buffer(out, x_adv)
    n = x_adv.shape[0]
    if x_adv.numel() == 0:
        return deliver(out, buf)
    numel = x_adv.numel() // n
    step_val, step_ptr, per_sample_step = eps_args(step, n, x_adv.device, "step")
    eps_val, eps_ptr, per_sample_eps = eps_args(eps, n, x_adv.device)
    a, b = _momentum(a)
    original = arithmetic == "original"
    flags = dict(
        ORIGINAL=original, LAST_TINY=not original, PER_SAMPLE_STEP=per_sample_step, PER_SAMPLE_EPS=per_sample_eps,
        enable_fp_fusion=False,
    )
    scalars = (step_ptr, eps_ptr, step_val, eps_val, a, b, 1e-12)
    if numel <= max_row:
        block = max(16, triton.next_power_of_2(numel))
        _apgd_l2_row_kernel[(n,)](
            x_adv, x_old, x, grad, buf, *scalars, numel,
            BLOCK=block, num_warps=min(max(block // 256, 1), 8), **flags,
        )
        return deliver(out, buf)
    n_tiles = triton.cdiv(numel, TILE)
    parts = torch.empty(3, n, n_tiles, device=x_adv.device, dtype=torch.float32)
    tiles = dict(TILE=TILE, TILES_POW2=max(2, triton.next_power_of_2(n_tiles)), num_warps=8, **flags)
    args = (x_adv, x_old, x, grad, buf, parts[0], parts[1], parts[2], *scalars, numel, n_tiles)
    for phase in range(4):
        _apgd_l2_tile_kernel[(n_tiles, n)](*args, PHASE=phase, **tiles)
    return deliver(out, buf)


def _same_dense_layout(ref, *others):
    fmt = None
    if ref.is_contiguous():
        fmt = torch.contiguous_format
    elif ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    return fmt is not None and all(t.shape == ref.shape and t.is_contiguous(memory_format=fmt) for t in others)


def apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled):
    """In place: x_best, grad_best = x_adv, grad where improved; x_best_adv = x_adv where fooled.

    The state tensors must share x_adv's dense layout (they do in the APGD loop);
    otherwise the copies are done by the PyTorch twin.
    """
    check_images(x_adv=x_adv, grad=grad, x_best=x_best, grad_best=grad_best, x_best_adv=x_best_adv)
    for name, flags in (("improved", improved), ("fooled", fooled)):
        if flags.numel() != x_adv.shape[0]:
            raise ValueError(f"{name} has {flags.numel()} values, expected one per sample ({x_adv.shape[0]})")
    if not _same_dense_layout(x_adv, grad, x_best, grad_best, x_best_adv):
        from fastadv import reference

        reference.apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled)
        return
    n = x_adv.numel()
    if n == 0:
        return
    improved = improved.to(torch.bool).contiguous().view(torch.uint8)
    fooled = fooled.to(torch.bool).contiguous().view(torch.uint8)
    block, num_warps = elementwise_settings(n)
    _apgd_track_kernel[(triton.cdiv(n, block),)](
        x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled, n, n // x_adv.shape[0],
        BLOCK=block, num_warps=num_warps,
    )
