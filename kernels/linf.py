"""Fused Linf sign step: one read of adv, clean and grad, one write of adv.

    out = clamp(x + clamp(adv + alpha * sign(grad) - x, -eps, eps), 0, 1)   (PROJECT)
    out = clamp(adv + alpha * sign(grad), 0, 1)                             (not PROJECT, FGSM)

Each op is rounded to the tensor's dtype where the reference rounds, so the
result equals torchattacks' chain of eager ops bit for bit.
"""
import triton
import triton.language as tl

from ._common import clamp, element_eps, element_samples, rnd, sign
from .utils import check_images, deliver, dense_like, output_buffer, elementwise_settings, eps_args


@triton.jit
def _linf_step_kernel(
    adv_ptr,  # current iterate, read
    x_ptr,  # clean images, read (unused when not PROJECT)
    grad_ptr,  # loss gradient w.r.t. adv, read
    out_ptr,  # next iterate, written (may alias adv_ptr)
    eps_ptr,  # [N] fp32 budgets when PER_SAMPLE_EPS
    alpha_ptr,  # [N] fp32 step sizes when PER_SAMPLE_ALPHA
    alpha,  # fp32 step size when not PER_SAMPLE_ALPHA
    eps,  # fp32 budget when not PER_SAMPLE_EPS
    n_elements,  # elements in the batch
    sample_numel,  # elements per sample (C*H*W)
    PROJECT: tl.constexpr,  # project onto the eps-ball around x
    PER_SAMPLE_EPS: tl.constexpr,
    PER_SAMPLE_ALPHA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_elements
    sample = element_samples(start, sample_numel, BLOCK)
    a = tl.load(adv_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    step = element_eps(alpha, alpha_ptr, sample, mask, PER_SAMPLE_ALPHA)
    a = rnd(a + rnd(step * sign(g), DT), DT)
    if PROJECT:
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        e = element_eps(eps, eps_ptr, sample, mask, PER_SAMPLE_EPS)
        d = rnd(clamp(rnd(a - x, DT), -e, e), DT)
        a = rnd(x + d, DT)
    a = clamp(a, 0.0, 1.0)
    tl.store(out_ptr + offs, a.to(DT), mask=mask)


def linf_step(adv, x, grad, *, alpha, eps, project=True, out=None):
    """Launch the fused Linf step. alpha and eps are floats or [N] tensors; returns the next iterate (in out if given)."""
    check_images(adv=adv, x=x, grad=grad)
    adv, x, grad = dense_like(adv, x, grad)
    buf = output_buffer(out, adv)
    n = adv.numel()
    if n == 0:
        return deliver(out, buf)
    eps_val, eps_ptr, per_sample_eps = eps_args(eps, adv.shape[0], adv.device)
    alpha_val, alpha_ptr, per_sample_alpha = eps_args(alpha, adv.shape[0], adv.device, "alpha")
    block, num_warps = elementwise_settings(n)
    _linf_step_kernel[(triton.cdiv(n, block),)](
        adv, x, grad, buf, eps_ptr, alpha_ptr, alpha_val, eps_val, n, n // adv.shape[0],
        PROJECT=project, PER_SAMPLE_EPS=per_sample_eps, PER_SAMPLE_ALPHA=per_sample_alpha, BLOCK=block,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return deliver(out, buf)
