"""Fused L2 step of PGDL2, in the reference's order of operations:

    g     = grad / (||grad||_2 + 1e-10)             per sample
    delta = adv + alpha * g - x
    out   = clamp(x + delta * min(eps / ||delta||_2, 1), 0, 1)

The two per-sample norms are reductions. When a sample fits in one block
(C*H*W <= MAX_ROW, e.g. CIFAR and MNIST sizes) one program owns a sample and the
whole step is a single launch that reads adv, x and grad once. Larger samples
take three launches over (block, sample) tiles: partial sums of grad^2, partial
sums of delta^2, then the write, recomputing delta rather than storing it.

Elementwise ops are rounded like the reference; the sums run in fp32 in a tree
order that differs from torch.norm's, so norms may differ in the last bits.
Where the reference would produce NaN (a zero gradient whose 1e-10 underflows in
fp16, a non-finite gradient, eps = 0 with a zero delta) the sample takes no step.
"""
import torch
import triton
import triton.language as tl

from ._common import clamp, load_f32, minimum, rnd, sample_eps, sample_row, sample_tile, total
from .utils import check_images, deliver, dense_like, eps_args, fp32, output_buffer

MAX_ROW = 4096  # largest sample handled by the one-launch row kernel
TILE = 2048  # tile of the multi-launch path


@triton.jit
def _grad_norm(sumsq, div_eps, DT: tl.constexpr):
    """torch.norm(grad) + div_eps, rounded as the reference rounds."""
    return rnd(rnd(tl.sqrt_rn(sumsq), DT) + div_eps, DT)


@triton.jit
def _delta(a, x, g, gnorm, alpha, DT: tl.constexpr):
    """adv + alpha * grad / gnorm - x; no step where gnorm is 0 or not finite."""
    g = rnd(tl.div_rn(g, gnorm), DT)
    g = tl.where((gnorm > 0) & (gnorm < float("inf")), g, 0.0)
    a = rnd(a + rnd(alpha * g, DT), DT)
    return rnd(a - x, DT)


@triton.jit
def _finish(x, d, dsumsq, eps, DT: tl.constexpr):
    """clamp(x + delta * min(eps / ||delta||, 1), 0, 1); factor 1 for a zero delta."""
    dn = rnd(tl.sqrt_rn(dsumsq), DT)
    factor = tl.where(dn > 0, minimum(rnd(tl.div_rn(eps, dn), DT), 1.0), 1.0)
    return clamp(rnd(x + rnd(d * factor, DT), DT), 0.0, 1.0)


@triton.jit
def _l2_row_kernel(
    adv_ptr, x_ptr, grad_ptr, out_ptr,  # [N, sample_numel] in storage order
    eps_ptr,  # [N] fp32 budgets when PER_SAMPLE_EPS
    alpha, eps,  # fp32 step size and scalar budget
    div_eps,  # fp32 added to the gradient norm before dividing
    sample_numel,  # elements per sample, <= BLOCK
    PER_SAMPLE_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    sample, offs, mask = sample_row(sample_numel, BLOCK)
    g = load_f32(grad_ptr, offs, mask)
    a = load_f32(adv_ptr, offs, mask)
    x = load_f32(x_ptr, offs, mask)
    d = _delta(a, x, g, _grad_norm(total(g * g, axis=0), div_eps, DT), alpha, DT)
    d = tl.where(mask, d, 0.0)
    e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
    out = _finish(x, d, total(d * d, axis=0), e, DT)
    tl.store(out_ptr + offs, out.to(DT), mask=mask)


@triton.jit
def _sumsq_tile_kernel(
    v_ptr,  # [N, sample_numel] values
    partial_ptr,  # [N, n_tiles] fp32 partial sums, written
    sample_numel, n_tiles,
    TILE: tl.constexpr,
):
    tile, sample, offs, mask = sample_tile(sample_numel, TILE)
    v = load_f32(v_ptr, offs, mask)
    tl.store(partial_ptr + sample * n_tiles + tile, total(v * v, axis=0))


@triton.jit
def _row_sum(partial_ptr, sample, n_tiles, TILES_POW2: tl.constexpr):
    t = tl.arange(0, TILES_POW2)
    return total(tl.load(partial_ptr + sample * n_tiles + t, mask=t < n_tiles, other=0.0), axis=0)


@triton.jit
def _l2_tile_kernel(
    adv_ptr, x_ptr, grad_ptr, out_ptr,  # [N, sample_numel] in storage order
    gpart_ptr,  # [N, n_tiles] partial sums of grad^2, read
    dpart_ptr,  # [N, n_tiles] partial sums of delta^2, written (FINISH=False) or read
    eps_ptr, alpha, eps, div_eps,
    sample_numel, n_tiles,
    FINISH: tl.constexpr,  # False: accumulate ||delta||^2; True: write the step
    PER_SAMPLE_EPS: tl.constexpr,
    TILE: tl.constexpr,
    TILES_POW2: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tile, sample, offs, mask = sample_tile(sample_numel, TILE)
    g = load_f32(grad_ptr, offs, mask)
    a = load_f32(adv_ptr, offs, mask)
    x = load_f32(x_ptr, offs, mask)
    gnorm = _grad_norm(_row_sum(gpart_ptr, sample, n_tiles, TILES_POW2), div_eps, DT)
    d = tl.where(mask, _delta(a, x, g, gnorm, alpha, DT), 0.0)
    if FINISH:
        e = sample_eps(eps, eps_ptr, sample, PER_SAMPLE_EPS)
        out = _finish(x, d, _row_sum(dpart_ptr, sample, n_tiles, TILES_POW2), e, DT)
        tl.store(out_ptr + offs, out.to(DT), mask=mask)
    else:
        tl.store(dpart_ptr + sample * n_tiles + tile, total(d * d, axis=0))


def l2_step(adv, x, grad, *, alpha, eps, div_eps=1e-10, out=None):
    """Launch the fused L2 step. eps is a float or an [N] tensor; returns the next iterate (in out if given)."""
    check_images(adv=adv, x=x, grad=grad)
    adv, x, grad = dense_like(adv, x, grad)
    buf = output_buffer(out, adv)
    n = adv.shape[0]
    if adv.numel() == 0:
        return deliver(out, buf)
    numel = adv.numel() // n
    eps_val, eps_ptr, per_sample = eps_args(eps, n, adv.device)
    common = dict(enable_fp_fusion=False)
    if numel <= MAX_ROW:
        block = max(16, triton.next_power_of_2(numel))
        _l2_row_kernel[(n,)](
            adv, x, grad, buf, eps_ptr, fp32(alpha), eps_val, fp32(div_eps), numel,
            PER_SAMPLE_EPS=per_sample, BLOCK=block, num_warps=min(max(block // 256, 1), 8), **common,
        )
        return deliver(out, buf)
    n_tiles = triton.cdiv(numel, TILE)
    gpart = torch.empty(n, n_tiles, device=adv.device, dtype=torch.float32)
    dpart = torch.empty_like(gpart)
    grid = (n_tiles, n)
    _sumsq_tile_kernel[grid](grad, gpart, numel, n_tiles, TILE=TILE, num_warps=8, **common)
    tiles = dict(TILE=TILE, TILES_POW2=max(2, triton.next_power_of_2(n_tiles)), num_warps=8, **common)
    args = (adv, x, grad, buf, gpart, dpart, eps_ptr, fp32(alpha), eps_val, fp32(div_eps), numel, n_tiles)
    _l2_tile_kernel[grid](*args, FINISH=False, PER_SAMPLE_EPS=per_sample, **tiles)
    _l2_tile_kernel[grid](*args, FINISH=True, PER_SAMPLE_EPS=per_sample, **tiles)
    return deliver(out, buf)
