"""The attack step ops, dispatched to a backend (see fastadv.backend).

Each op takes the current iterate, the clean images and the gradient and returns
the next iterate; inputs are never modified. ``eps`` is a float or an [N] tensor.
"""
import torch

from fastadv import backend as backend_module
from fastadv import inplace, reference
from fastadv.backend import kernels, resolve

# The kernels cover these dtypes; anything else (float64) takes the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_resolved = {}  # (backend, pinned default, device type, kernel device) -> name: resolved once, used every step


def _impl(backend, like: torch.Tensor):
    key = (backend, backend_module._pinned, like.device.type, backend_module.KERNEL_DEVICE)
    name = _resolved.get(key)
    if name is None:
        name = resolve(backend, like.device)
        if backend is not None or key[1] is not None:  # else the environment decides, read every time
            _resolved[key] = name
    if name == "torch" or like.dtype not in KERNEL_DTYPES:
        return reference
    return kernels(name)


def _into(out, result):
    """Write a twin's result into out when the caller asked for it (kernels write in place)."""
    if out is None or out is result:
        return result
    return out.copy_(result)


def linf_step(adv, x, grad, *, alpha, eps, project=True, backend=None, out=None, consume_grad=False):
    """Sign step of size alpha, projection onto the Linf eps-ball around x, clip to [0, 1].

    out (optional) receives the result and may be adv itself (an in-place step).
    consume_grad: the caller owns grad and lets the torch backend compute in its
    buffer (fastadv.inplace: same numbers, no allocation per op).
    """
    impl = _impl(backend, adv)
    if impl is reference:
        step = inplace.linf_step_ if consume_grad else reference.linf_step
        return _into(out, step(adv, x, grad, alpha=alpha, eps=eps, project=project))
    return impl.linf_step(adv, x, grad, alpha=alpha, eps=eps, project=project, out=out)


def l2_step(adv, x, grad, *, alpha, eps, div_eps=1e-10, backend=None, out=None, consume_grad=False):
    """Normalized gradient step, projection onto the L2 eps-ball around x, clip to [0, 1]."""
    impl = _impl(backend, adv)
    if impl is reference:
        step = inplace.l2_step_ if consume_grad else reference.l2_step
        return _into(out, step(adv, x, grad, alpha=alpha, eps=eps, div_eps=div_eps))
    return impl.l2_step(adv, x, grad, alpha=alpha, eps=eps, div_eps=div_eps, out=out)


def random_start(x, noise, scale=None, backend=None):
    """clamp(x + noise [* scale per sample], 0, 1)."""
    return _impl(backend, x).random_start(x, noise, scale)


# --- MIFGSM ---


def mifgsm_step(adv, x, grad, momentum, *, alpha, eps, decay=1.0, backend=None, out=None, momentum_out=None,
                consume_grad=False):
    """MIFGSM's step: grad / mean(|grad|) per sample + momentum * decay, then the Linf
    sign step, projection and clip. Returns (next iterate, new momentum).

    out and momentum_out (optional) receive the results and may be adv and momentum
    themselves (an in-place step). consume_grad: as for linf_step; with momentum_out
    being momentum, the torch backend then allocates nothing.
    """
    impl = _impl(backend, adv)
    if impl is reference:
        if consume_grad and momentum_out is momentum:
            adv_next, _ = inplace.mifgsm_step_(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay)
            return _into(out, adv_next), momentum
        adv_next, mom_next = reference.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay)
        return _into(out, adv_next), _into(momentum_out, mom_next)
    return impl.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay, out=out, momentum_out=momentum_out)


# --- APGD ---


def apgd_linf_step(x_adv, x_old, x, grad, *, step, eps, a, backend=None, out=None):
    """APGD's Linf update: sign step of size step, eps-ball projection and clip, then the
    momentum blend x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a), projected again.

    step and eps are floats or [N] tensors; a is 1.0 on the first iteration, then 0.75.
    out (optional) receives the result; it must not alias an input.
    """
    impl = _impl(backend, x_adv)
    if impl is reference:
        return _into(out, reference.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a))
    return impl.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, out=out)


def apgd_l2_step(x_adv, x_old, x, grad, *, step, eps, a, arithmetic="torchattacks", backend=None, out=None):
    """APGD's L2 update (normalized step, projection, momentum blend, projection) in the
    'torchattacks' (3.5.1) or 'original' (pyautoattack 0.2.0) arithmetic; see the twin.

    out (optional) receives the result; it must not alias an input.
    """
    impl = _impl(backend, x_adv)
    if impl is reference:
        return _into(out, reference.apgd_l2_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, arithmetic=arithmetic))
    return impl.apgd_l2_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, arithmetic=arithmetic, out=out)


def apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled, backend=None):
    """APGD's bookkeeping, in place: x_best, grad_best = x_adv, grad where improved; x_best_adv =
    x_adv where fooled (improved and fooled are [N] bool tensors)."""
    _impl(backend, x_adv).apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled)
