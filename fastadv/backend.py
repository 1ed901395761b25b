"""Which implementation runs the step ops: chosen here and nowhere else.

``FASTADV_BACKEND`` sets the default; every attack and function takes ``backend=``.

- ``auto``:      Triton kernels for CUDA tensors, the PyTorch reference otherwise
- ``triton``:    the compiled Triton kernels (CUDA tensors only)
- ``torch``:     the PyTorch reference ops (``fastadv.reference``), any device
- ``interpret``: the Triton kernels through Triton's CPU interpreter (CPU tensors);
                 slow, for testing the real kernel code without a GPU
"""
import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "interpret")
KERNEL_DEVICE = "cuda"  # the device type the compiled kernels run on (the sync-count tests set "cpu")


_pinned = None  # FASTADV_BACKEND as read once for the call in progress (see pinned)


def default_backend() -> str:
    if _pinned is not None:
        return _pinned
    name = os.environ.get("FASTADV_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTADV_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def pinned():
    """Read FASTADV_BACKEND once for a whole call: the step ops resolve their backend on every
    step, and an environment read there is host time on every GPU step. Re-entrant: a nested
    call keeps the outer call's reading."""
    global _pinned
    if _pinned is not None:
        yield
        return
    _pinned = default_backend()
    try:
        yield
    finally:
        _pinned = None


def resolve(backend, device: torch.device) -> str:
    """The concrete backend ('triton', 'torch' or 'interpret') for tensors on device."""
    name = default_backend() if backend is None else str(backend).lower()
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    device = device if isinstance(device, torch.device) else torch.device(device)  # called per step: skip the copy
    if name == "auto":
        return "triton" if device.type == KERNEL_DEVICE else "torch"
    if name == "triton" and device.type != KERNEL_DEVICE:
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; use 'interpret' on the CPU")
    if name == "interpret" and device.type != "cpu":
        raise ValueError(f"backend='interpret' runs on CPU tensors, got tensors on {device}")
    return name


def kernels(name: str):
    """The kernel namespace for a resolved backend name ('triton' or 'interpret')."""
    from fastadv import kernels as k

    return k.compiled() if name == "triton" else k.interpreted()
