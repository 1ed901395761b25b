"""Fused MIFGSM step, in the reference's order of operations:

    m        = mean(|grad|)                            per sample (fp32 sum / numel)
    g        = grad / m
    momentum = g + momentum * decay                    (written)
    out      = clamp(x + clamp(adv + alpha * sign(momentum) - x, -eps, eps), 0, 1)

The per-sample mean is a reduction. When a sample fits in one block
(C*H*W <= MAX_ROW) one program owns a sample and the step is a single launch that
reads adv, x, grad and momentum once. Larger samples take two launches over
(tile, sample) programs: partial sums of |grad|, then the step, which adds up the
partials of its sample.

Elementwise ops are rounded like the reference. The sum of |grad| runs in fp32 in
a tree order that differs from torch.sum's, so the mean (and the momentum) may
differ from the reference in the last bits; the sign step is exact wherever
that difference does not flip sign(momentum).

An all-zero gradient gives m = 0 and 0/0 = NaN, as in the reference: the sample's
momentum becomes NaN, sign(NaN) = 0 (the CPU convention) and the sample stops
moving. No NaN reaches the output.
"""
import torch
import triton
import triton.language as tl

from ._common import clamp, load_f32, rnd, sample_eps, sample_row, sample_tile, sign, total
from .utils import check_images, deliver, dense_like, eps_args, fp32, output_buffer

MAX_ROW = 4096  # largest sample handled by the one-launch row kernel
TILE = 2048  # tile of the two-launch path


@triton.jit
def _step(a, x, g, mo, abs_sum, numel, decay, alpha, eps, DT: tl.constexpr):
    """(next iterate, new momentum) given the fp32 sum of |grad| over the sample."""
    m = rnd(tl.div_rn(abs_sum, numel), DT)  # torch.mean on CPU: fp32 sum, / numel, cast
    g = rnd(tl.div_rn(g, m), DT)
    mo = rnd(g + rnd(mo * decay, DT), DT)
    a = rnd(a + rnd(alpha * sign(mo), DT), DT)
    d = rnd(clamp(rnd(a - x, DT), -eps, eps), DT)
    a = clamp(rnd(x + d, DT), 0.0, 1.0)
    return a, mo


@triton.jit
def _mifgsm_row_kernel(
    adv_ptr, x_ptr, grad_ptr, mom_ptr,  # [N, sample_numel] in storage order, read
    out_ptr, mom_out_ptr,  # next iterate and new momentum, written
    eps_ptr,  # [N] fp32 budgets when PER_SAMPLE_EPS
    alpha_ptr,  # [N] fp32 step sizes when PER_SAMPLE_ALPHA
    alpha, eps,  # fp32 scalars when not per sample
    decay,  # fp32 momentum decay
    sample_numel,  # elements per sample, <= BLOCK
    numel_f,  # sample_numel as fp32 (the mean's divisor)
    PER_SAMPLE_EPS: tl.constexpr,
    PER_SAMPLE_ALPHA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    sample, offs, mask = sample_row(sample_numel, BLOCK)
    g = load_f32(grad_ptr, offs, mask)
    a = load_f32(adv_ptr, offs, mask)
    x = load_f32(x_ptr, offs, mask)
    mo = load_f32(mom_ptr, offs, mask)
    abs_sum = total(tl.abs(g), 0)
    e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
    step = sample_eps(alpha, alpha_ptr, sample, PER_SAMPLE_ALPHA)
    a, mo = _step(a, x, g, mo, abs_sum, numel_f, decay, step, e, DT)
    tl.store(out_ptr + offs, a.to(DT), mask=mask)
    tl.store(mom_out_ptr + offs, mo.to(DT), mask=mask)


@triton.jit
def _abs_sum_tile_kernel(
    grad_ptr,  # [N, sample_numel] gradient, read
    partial_ptr,  # [N, n_tiles] fp32 partial sums of |grad|, written
    sample_numel, n_tiles,
    TILE: tl.constexpr,
):
    tile, sample, offs, mask = sample_tile(sample_numel, TILE)
    g = load_f32(grad_ptr, offs, mask)
    tl.store(partial_ptr + sample * n_tiles + tile, total(tl.abs(g), 0))


@triton.jit
def _mifgsm_tile_kernel(
    adv_ptr, x_ptr, grad_ptr, mom_ptr,  # [N, sample_numel] in storage order, read
    out_ptr, mom_out_ptr,  # next iterate and new momentum, written
    partial_ptr,  # [N, n_tiles] fp32 partial sums of |grad|, read
    eps_ptr, alpha_ptr, alpha, eps, decay,  # as in _mifgsm_row_kernel
    sample_numel, numel_f, n_tiles,
    PER_SAMPLE_EPS: tl.constexpr,
    PER_SAMPLE_ALPHA: tl.constexpr,
    TILE: tl.constexpr,
    TILES_POW2: tl.constexpr,  # n_tiles rounded up to a power of two
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tile, sample, offs, mask = sample_tile(sample_numel, TILE)
    t = tl.arange(0, TILES_POW2)
    abs_sum = total(tl.load(partial_ptr + sample * n_tiles + t, mask=t < n_tiles, other=0.0), 0)
    g = load_f32(grad_ptr, offs, mask)
    a = load_f32(adv_ptr, offs, mask)
    x = load_f32(x_ptr, offs, mask)
    mo = load_f32(mom_ptr, offs, mask)
    e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
    step = sample_eps(alpha, alpha_ptr, sample, PER_SAMPLE_ALPHA)
    a, mo = _step(a, x, g, mo, abs_sum, numel_f, decay, step, e, DT)
    tl.store(out_ptr + offs, a.to(DT), mask=mask)
    tl.store(mom_out_ptr + offs, mo.to(DT), mask=mask)


def mifgsm_step(adv, x, grad, momentum, *, alpha, eps, decay=1.0, out=None, momentum_out=None):
    """Launch the fused MIFGSM step; returns (next iterate, new momentum).

    alpha and eps are floats or [N] tensors; decay is a float. out and momentum_out
    (optional) receive the results and may be adv and momentum themselves: every
    element is read and written by the same program, and the |grad| sums read grad only.
    """
    check_images(adv=adv, x=x, grad=grad, momentum=momentum)
    adv, x, grad, momentum = dense_like(adv, x, grad, momentum)
    buf, mom_buf = output_buffer(out, adv), output_buffer(momentum_out, adv)
    n = adv.shape[0]
    if adv.numel() == 0:
        return deliver(out, buf), deliver(momentum_out, mom_buf)
    numel = adv.numel() // n
    eps_val, eps_ptr, per_sample_eps = eps_args(eps, n, adv.device)
    alpha_val, alpha_ptr, per_sample_alpha = eps_args(alpha, n, adv.device, "alpha")
    scalars = (eps_ptr, alpha_ptr, alpha_val, eps_val, fp32(decay))
    modes = dict(PER_SAMPLE_EPS=per_sample_eps, PER_SAMPLE_ALPHA=per_sample_alpha, enable_fp_fusion=False)
    if numel <= MAX_ROW:
        block = max(16, triton.next_power_of_2(numel))
        _mifgsm_row_kernel[(n,)](
            adv, x, grad, momentum, buf, mom_buf, *scalars, numel, fp32(numel),
            BLOCK=block, num_warps=min(max(block // 256, 1), 8), **modes,
        )
        return deliver(out, buf), deliver(momentum_out, mom_buf)
    n_tiles = triton.cdiv(numel, TILE)
    partial = torch.empty(n, n_tiles, device=adv.device, dtype=torch.float32)
    grid = (n_tiles, n)
    _abs_sum_tile_kernel[grid](grad, partial, numel, n_tiles, TILE=TILE, num_warps=8, enable_fp_fusion=False)
    _mifgsm_tile_kernel[grid](
        adv, x, grad, momentum, buf, mom_buf, partial, *scalars, numel, fp32(numel), n_tiles,
        TILE=TILE, TILES_POW2=max(2, triton.next_power_of_2(n_tiles)), num_warps=8, **modes,
    )
    return deliver(out, buf), deliver(momentum_out, mom_buf)
