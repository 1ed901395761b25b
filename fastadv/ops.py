"""The attack step ops, dispatched to a backend (see fastadv.backend).

Each op takes the current iterate, the clean images and the gradient and returns
the next iterate; inputs are never modified. ``eps`` is a float or an [N] tensor.
"""
import torch

from fastadv import reference
from fastadv.backend import kernels, resolve

# The kernels cover these dtypes; anything else (float64) takes the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _impl(backend, like: torch.Tensor):
    name = resolve(backend, like.device)
    if name == "torch" or like.dtype not in KERNEL_DTYPES:
        return reference
    return kernels(name)


def linf_step(adv, x, grad, *, alpha, eps, project=True, backend=None):
    """Sign step of size alpha, projection onto the Linf eps-ball around x, clip to [0, 1]."""
    return _impl(backend, adv).linf_step(adv, x, grad, alpha=alpha, eps=eps, project=project)


def l2_step(adv, x, grad, *, alpha, eps, div_eps=1e-10, backend=None):
    """Normalized gradient step, projection onto the L2 eps-ball around x, clip to [0, 1]."""
    return _impl(backend, adv).l2_step(adv, x, grad, alpha=alpha, eps=eps, div_eps=div_eps)


def random_start(x, noise, scale=None, backend=None):
    """clamp(x + noise [* scale per sample], 0, 1)."""
    return _impl(backend, x).random_start(x, noise, scale)
