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


# --- APGD ---
#
# APGD's update (Croce & Hein, 2020), as torchattacks 3.5.1 APGD/APGDT computes it
# ('torchattacks') and as pyautoattack 0.2.0 APGDAttack does ('original'). Each
# takes the iterate x_adv, the previous iterate x_old, the clean x, the gradient,
# per-sample step sizes `step` and budgets `eps` (floats or [N] tensors) and the
# momentum weight a (1.0 on the first iteration, then 0.75). For fp32 images every
# op is the reference's own, so the results are bit-exact with it. For fp16/bf16
# images (an extension) an op mixing in an fp32 per-sample value is done in fp32
# and rounded to the image dtype, as PyTorch applies a Python float, and the L2
# norms are fp32 throughout (no fp16 overflow, no 0/0 from an underflowing 1e-12).


def _apgd_col(v, like: torch.Tensor) -> torch.Tensor:
    """A float or an [N] tensor as an [N, 1, ..., 1] column in fp32 (fp64 for fp64 images)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(v, torch.Tensor):
        return per_sample(v.to(like.device, dtype), like)
    return torch.full((like.shape[0],) + (1,) * (like.dim() - 1), float(v), dtype=dtype, device=like.device)


def apgd_linf_step(x_adv, x_old, x, grad, *, step, eps, a):
    """APGD's Linf update (identical in both flavors):

        z   = P(x_adv + step * sign(grad))
        out = P(x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a))

    with P(v) = clamp(min(max(v, x - eps), x + eps), 0, 1).
    """
    dt = x_adv.dtype
    s, e = _apgd_col(step, x), _apgd_col(eps, x)
    lo, hi = (x - e).to(dt), (x + e).to(dt)
    grad2 = x_adv - x_old
    z = x_adv + (s * torch.sign(grad)).to(dt)
    z = torch.clamp(torch.min(torch.max(z, lo), hi), 0.0, 1.0)
    u = x_adv + (z - x_adv) * a + grad2 * (1 - a)
    return torch.clamp(torch.min(torch.max(u, lo), hi), 0.0, 1.0)


def apgd_l2_norm(v: torch.Tensor, arithmetic="torchattacks") -> torch.Tensor:
    """Per-sample sqrt(sum(v ** 2)) as an [N, 1, ..., 1] column, summed as the reference sums.

    Half-precision values are squared and summed in fp32 (the norm stays fp32).
    """
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    if arithmetic == "original":
        return (v ** 2).reshape(v.shape[0], -1).sum(-1).sqrt().reshape(-1, *([1] * (v.dim() - 1)))
    return (v ** 2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()


def apgd_l2_step(x_adv, x_old, x, grad, *, step, eps, a, arithmetic="torchattacks"):
    """APGD's L2 update, with n(v) the per-sample L2 norm:

        z   = x_adv + step * grad / (n(grad) + 1e-12)
        z   = clamp(x + (z - x) / (n(z - x) + 1e-12) * min(eps, n(z - x)), 0, 1)
        u   = x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a)
        out = clamp(x + (u - x) / (n(u - x) + 1e-12) * min(eps, n(u - x) + 1e-12), 0, 1)

    'torchattacks' evaluates the first line as (step * grad) / (...) and adds 1e-12
    inside the last min; 'original' (pyautoattack) as step * (grad / (...)) and has
    no 1e-12 there. For half-precision images the norms, the denominators and the
    mins are fp32 (so a zero norm cannot give 0/0) and each product or quotient
    with them is rounded to the image dtype.
    """
    dt = x_adv.dtype
    original = arithmetic == "original"
    s, e = _apgd_col(step, x), _apgd_col(eps, x)

    def scaled(v, n):  # v / (n + 1e-12), rounded to the image dtype
        return (v / (n + 1e-12)).to(dt)

    def project(d, n, tiny):  # clamp(x + d / (n + 1e-12) * min(eps, n [+ 1e-12]), 0, 1)
        m = torch.min(e, n + 1e-12 if tiny else n).to(dt)
        return torch.clamp(x + scaled(d, n) * m, 0.0, 1.0)

    ng = apgd_l2_norm(grad, arithmetic)
    if original:
        z = x_adv + (s * scaled(grad, ng)).to(dt)
    else:
        z = x_adv + scaled((s * grad).to(dt), ng)
    d = z - x
    z = project(d, apgd_l2_norm(d, arithmetic), False)
    d = x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a) - x
    return project(d, apgd_l2_norm(d, arithmetic), not original)


def apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled):
    """APGD's per-iteration bookkeeping, in place: where improved[i] (the loss rose),
    x_best[i] = x_adv[i] and grad_best[i] = grad[i]; where fooled[i], x_best_adv[i] = x_adv[i]."""
    imp, fool = per_sample(improved, x_adv), per_sample(fooled, x_adv)
    torch.where(imp, x_adv, x_best, out=x_best)
    torch.where(imp, grad, grad_best, out=grad_best)
    torch.where(fool, x_adv, x_best_adv, out=x_best_adv)
