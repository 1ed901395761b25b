"""Random-start finish: adv = clamp(x + noise * scale, 0, 1).

The noise comes from torch's RNG (so a seed gives the reference's start); this
kernel fuses the scale, the add and the clip. With SCALE the noise is multiplied
by a per-sample factor first (PGDL2: delta *= r / ||delta|| * eps).
"""
import triton
import triton.language as tl

from ._common import clamp, element_samples, rnd
from .utils import check_images, deliver, dense_like, output_buffer, elementwise_settings


@triton.jit
def _start_kernel(
    x_ptr,  # clean images, read
    noise_ptr,  # noise, read
    out_ptr,  # start point, written
    scale_ptr,  # [N] per-sample factors in the noise dtype, read when SCALE
    n_elements, sample_numel,
    SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(noise_ptr + offs, mask=mask).to(tl.float32)
    if SCALE:
        d = rnd(d * tl.load(scale_ptr + element_samples(start, sample_numel, BLOCK), mask=mask).to(tl.float32), DT)
    tl.store(out_ptr + offs, clamp(rnd(x + d, DT), 0.0, 1.0).to(DT), mask=mask)


def random_start(x, noise, scale=None, out=None):
    """clamp(x + noise [* scale[:, None, None, None]], 0, 1) in one pass."""
    check_images(x=x, noise=noise)
    if scale is not None and scale.numel() != x.shape[0]:
        raise ValueError(f"scale has {scale.numel()} values, expected one per sample ({x.shape[0]})")
    x, noise = dense_like(x, noise)
    buf = output_buffer(out, x)
    n = x.numel()
    if n == 0:
        return deliver(out, buf)
    block, num_warps = elementwise_settings(n)
    scale_arg = None if scale is None else scale.contiguous()  # None: a constexpr, never read
    _start_kernel[(triton.cdiv(n, block),)](
        x, noise, buf, scale_arg, n, n // x.shape[0],
        SCALE=scale is not None, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
    )
    return deliver(out, buf)
