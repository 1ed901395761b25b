"""Counting what a CUDA run would wait for, on CPU tensors.

``Recorder`` is a dispatch mode (plus a function mode for the calls that never reach
the dispatcher on a CPU tensor: ``.tolist()``, ``.cpu()``, ``.numpy()``) that records

- host syncs: ops that make the host wait for device data (``.item()``, ``bool()``,
  ``nonzero``, boolean-mask indexing, ``torch.equal``, device-to-host copies);
- allocations: factory ops (``empty*``, ``*_like``, ``zeros``, ``full``, ...) and
  tensors lifted from Python data (``torch.tensor(...)``, a host-to-device copy on CUDA).

Every tensor counts as device data except the ones known to live on the host on a
real run: tensors made from Python data (``torch.tensor(0.5)``), factory results
without a ``device=`` argument (``torch.rand(n)`` from the CPU generator), and
whatever is computed from host tensors alone. So ``float(torch.tensor(x))``, the
fp32 rounding of a Python number, is not a sync; ``loss.item()`` is.

``on_triton_path`` runs the Triton backend's Python code on CPU tensors with each
kernel launcher replaced by its PyTorch twin (``fastadv.reference``), at the
launcher boundary; what the twins do inside is not counted (the launchers are
checked by their own tests).
"""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from fastadv import backend, reference
from fastadv import kernels as kernel_package

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
    aten._unique2.default, aten.repeat_interleave.Tensor,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
LIFT_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
ALLOC_NAMES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
               "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "scalar_tensor",
               "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "arange")
# torch functions whose result lives on the host when no device= is given
HOST_FACTORIES = {getattr(torch, n) for n in ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
                                              "randperm", "tensor", "as_tensor")}
D2H_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class Recorder(TorchDispatchMode):
    """Records host syncs and allocations (see the module docstring) as op names."""

    def __init__(self):
        super().__init__()
        self.syncs, self.allocs = [], []
        self.host = WeakTensorKeyDictionary()  # tensors that live on the host on a real run
        self._paused = 0
        self._functions = _FunctionHook(self)

    def __enter__(self):
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._functions.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        """Nothing counted inside (a launcher's twin); host/device tracking goes on."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset(self):
        self.syncs, self.allocs = [], []

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t not in self.host

    def sync(self, what):
        if not self._paused:
            self.syncs.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if self.is_device(t)]
        if on_device and (func in SYNC_OPS or (func in INDEX_OPS and _bool_index(args))):
            self.sync(str(func))
        name = func._schema.name.split("::")[-1]
        if not self._paused and (name in ALLOC_NAMES or func in LIFT_OPS):
            self.allocs.append(str(func))
        if func in LIFT_OPS or (tensors and not on_device):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
        return out


class _FunctionHook(TorchFunctionMode):
    """Device-to-host copies that dispatch nothing on CPU, and host factories."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        r = self.recorder
        if args and r.is_device(args[0]):
            # .to("cpu") as a string only: on CPU tensors the attack's own device is a torch.device('cpu')
            to_host = func is torch.Tensor.to and "cpu" in (*args[1:], kwargs.get("device"))
            if func in D2H_METHODS or to_host:
                r.sync(f"Tensor.{func.__name__}")
        if func in HOST_FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            r.host[out] = True
        return out


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class Twins:
    """The kernel launchers' PyTorch twins with the launchers' signatures (out=, momentum_out=)."""

    def __init__(self, recorder):
        self.recorder = recorder

    def __getattr__(self, name):
        twin = getattr(reference, name)

        def launch(*args, out=None, momentum_out=None, **kwargs):
            with self.recorder.paused():
                result = twin(*args, **kwargs)
                if name == "mifgsm_step":
                    return _deliver(out, result[0]), _deliver(momentum_out, result[1])
                return _deliver(out, result)

        return launch


def _deliver(out, result):
    return result if out is None or out is result else out.copy_(result)


@contextlib.contextmanager
def on_triton_path(recorder):
    """backend='triton' (and 'auto') accept CPU tensors and launch the twins."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "KERNEL_DEVICE", "cpu")
        mp.setattr(kernel_package, "compiled", lambda: Twins(recorder))
        yield
