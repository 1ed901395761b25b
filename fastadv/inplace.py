"""The torch backend's step ops as the attack loops run them: the reference
arithmetic of fastadv.reference, op for op, but in place in the gradient's buffer.

On the CPU an eager op chain is dominated by allocating (and page-faulting) a fresh
image-sized buffer per op; reusing the gradient's storage removes that. Addition is
commutative in IEEE arithmetic, so ``alpha * sign(g) + adv`` equals the reference's
``adv + alpha * sign(g)`` bit for bit; tests/test_inplace.py checks every op here
against its twin. Each function consumes ``grad`` and returns it holding the result.
"""
import torch

from fastadv.reference import l2_norm, per_sample


def _scale_(t: torch.Tensor, factor) -> torch.Tensor:
    """t *= factor, a float or an [N] tensor applied in fp32 and rounded to t's dtype."""
    if isinstance(factor, torch.Tensor):
        return t.mul_(per_sample(factor.to(torch.float32), t))
    return t.mul_(factor)


def _clamp_eps_(d: torch.Tensor, eps) -> torch.Tensor:
    if isinstance(eps, torch.Tensor):
        e = per_sample(eps.to(torch.float32), d)
        return d.clamp_(min=-e, max=e)
    return d.clamp_(min=-eps, max=eps)


def linf_step_(adv, x, grad, *, alpha, eps, project=True):
    """reference.linf_step, computed in grad's buffer."""
    s = grad.sign_()
    if not isinstance(alpha, torch.Tensor) and s.dtype in (torch.float32, torch.float64):
        # One pass instead of two: alpha * sign is exact (+-alpha or 0) in the tensor's
        # dtype, so adv + alpha * s rounds once whether or not the kernel uses an FMA.
        # Not for fp16/bf16: there the reference rounds alpha to the dtype first.
        s = torch.add(adv, s, alpha=alpha, out=s)
    else:
        s = _scale_(s, alpha).add_(adv)
    if project:
        s = _clamp_eps_(s.sub_(x), eps).add_(x)
    return s.clamp_(min=0, max=1)


def l2_step_(adv, x, grad, *, alpha, eps, div_eps=1e-10):
    """reference.l2_step, computed in grad's buffer."""
    gn = l2_norm(grad) + div_eps
    grad.div_(per_sample(gn, grad))
    ok = per_sample((gn > 0) & torch.isfinite(gn), grad)
    # On the CPU checking first is free and skips a pass; elsewhere never sync the host.
    if grad.device.type != "cpu" or not ok.all():
        torch.where(ok, grad, grad.new_zeros(()), out=grad)
    d = grad.mul_(alpha).add_(adv).sub_(x)
    dn = l2_norm(d)
    if isinstance(eps, torch.Tensor):
        factor = (eps.to(torch.float32) / dn.float()).to(dn.dtype)
    else:
        factor = eps / dn
    factor = torch.where(dn > 0, torch.min(factor, torch.ones_like(dn)), 1.0)
    return d.mul_(per_sample(factor, d)).add_(x).clamp_(min=0, max=1)


def mifgsm_step_(adv, x, grad, momentum, *, alpha, eps, decay=1.0):
    """reference.mifgsm_step with the momentum updated in its own buffer and the
    iterate computed in grad's; returns (next iterate, momentum)."""
    grad.div_(torch.mean(torch.abs(grad), dim=tuple(range(1, grad.dim())), keepdim=True))
    momentum.mul_(decay).add_(grad)  # momentum * decay + grad == grad + momentum * decay, bit for bit
    return linf_step_(adv, x, grad.copy_(momentum), alpha=alpha, eps=eps), momentum
