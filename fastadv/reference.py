"""Pure-PyTorch twins of every kernel: torchattacks 3.5.1's arithmetic, op for op.

These run on the CPU (backend 'torch') and are what the kernels are tested
against. Each keeps the reference's order of operations and rounding, so for a
scalar eps the result is bit-identical to torchattacks' chain of eager ops. A
per-sample eps (a tensor of shape [N]) is an extension: it is applied in fp32
and rounded to the image dtype, exactly as PyTorch applies a Python float.
"""
import torch


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An [N] tensor viewed to broadcast over the sample dimensions of like."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def clamp_eps(delta: torch.Tensor, eps) -> torch.Tensor:
    """torch.clamp(delta, -eps, eps) for a float or an [N] tensor eps."""
    if isinstance(eps, torch.Tensor):
        e = per_sample(eps.to(torch.float32), delta)
        return torch.minimum(torch.maximum(delta, -e), e).to(delta.dtype)
    return torch.clamp(delta, min=-eps, max=eps)


def linf_step(adv, x, grad, *, alpha, eps, project=True):
    """clamp(x + clamp(adv + alpha * sign(grad) - x, -eps, eps), 0, 1); FGSM when not project."""
    if isinstance(alpha, torch.Tensor):
        adv = adv + (per_sample(alpha.to(torch.float32), grad) * grad.sign()).to(adv.dtype)
    else:
        adv = adv + alpha * grad.sign()
    if project:
        adv = x + clamp_eps(adv - x, eps)
    return torch.clamp(adv, min=0, max=1)


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm exactly as the reference takes it (torch.norm over a flat view)."""
    return torch.norm(v.reshape(v.shape[0], -1), p=2, dim=1)


def l2_step(adv, x, grad, *, alpha, eps, div_eps=1e-10):
    """PGDL2's step: normalized gradient step, then projection onto the L2 ball and [0, 1].

    Where torchattacks produces NaN, a sample takes no step instead: a gradient norm
    of 0 (div_eps underflows in fp16) or not finite, or eps = 0 with a zero delta.
    Everywhere else the result is bit-identical to torchattacks'.
    """
    gn = per_sample(l2_norm(grad) + div_eps, grad)
    grad = torch.where((gn > 0) & torch.isfinite(gn), grad / gn, 0.0)
    adv = adv + alpha * grad
    delta = adv - x
    dn = l2_norm(delta)
    if isinstance(eps, torch.Tensor):
        factor = (eps.to(torch.float32) / dn.float()).to(dn.dtype)
    else:
        factor = eps / dn
    factor = torch.where(dn > 0, torch.min(factor, torch.ones_like(dn)), 1.0)
    return torch.clamp(x + delta * per_sample(factor, delta), min=0, max=1)


def random_start(x, noise, scale=None):
    """clamp(x + noise [* scale per sample], 0, 1), the last op of every random start."""
    if scale is not None:
        noise = (noise * per_sample(scale, noise)).to(noise.dtype)
    return torch.clamp(x + noise, min=0, max=1)


# --- MIFGSM ---


def mifgsm_step(adv, x, grad, momentum, *, alpha, eps, decay=1.0):
    """MIFGSM's step; returns (next iterate, new momentum).

    grad / mean(|grad|) per sample, plus momentum * decay, then the Linf sign step,
    projection and clip. An all-zero gradient gives NaN momentum and, since
    sign(NaN) = 0 on the CPU, a frozen sample, as in the reference.
    """
    grad = grad / torch.mean(torch.abs(grad), dim=tuple(range(1, grad.dim())), keepdim=True)
    momentum = grad + momentum * decay
    return linf_step(adv, x, momentum, alpha=alpha, eps=eps), momentum
