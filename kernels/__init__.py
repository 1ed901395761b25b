"""fastadv's Triton kernels, installed as ``fastadv.kernels``.

Each public module holds ``@triton.jit`` code and its launchers (plain functions
taking and returning tensors): ``linf`` (fused sign step, eps-ball projection and
clip), ``l2`` (normalized step, L2-ball projection and clip), ``start`` (random
start finish), and one module per attack family that has its own fused step.
Modules starting with ``_`` and ``utils`` hold shared helpers.

``compiled()`` and ``interpreted()`` return every launcher by name. The
interpreted copy is a second import of these modules, decorated under
``TRITON_INTERPRET=1``: the same kernel code run by Triton's interpreter on CPU
tensors, usable in the same process as the compiled kernels.
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import pathlib
import sys

_HERE = pathlib.Path(__file__).parent
MODULES = tuple(sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "utils"))
_copies = {}


@contextlib.contextmanager
def _interpret_env():
    """TRITON_INTERPRET=1 for the duration of the block, then as it was."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


class Launchers:
    """Every public launcher of the kernel modules, found by name (``k.linf_step``)."""

    def __init__(self, modules, interpret: bool):
        self._modules = modules
        self._interpret = interpret

    def __getattr__(self, name):  # the first look-up only: the launcher is then an attribute
        for module in self._modules:
            fn = module.__dict__.get(name)
            if callable(fn) and not name.startswith("_"):
                fn = self._wrap(fn) if self._interpret else fn
                setattr(self, name, fn)
                return fn
        raise AttributeError(f"no kernel launcher named {name!r} in {MODULES}")

    @staticmethod
    def _wrap(launcher):
        # Triton reads TRITON_INTERPRET when decorating and, lazily, while interpreting.
        @functools.wraps(launcher)
        def run(*args, **kwargs):
            with _interpret_env():
                return launcher(*args, **kwargs)

        return run


def _load(interpret: bool) -> Launchers:
    name = __name__
    if interpret:
        name = __name__ + "_interpreted"
        spec = importlib.util.spec_from_file_location(name, __file__, submodule_search_locations=[str(_HERE)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    with _interpret_env() if interpret else contextlib.nullcontext():
        modules = [importlib.import_module(f"{name}.{m}") for m in MODULES]
    return Launchers(modules, interpret)


def compiled() -> Launchers:
    """The kernels as Triton compiles them for the GPU."""
    if False not in _copies:
        _copies[False] = _load(False)
    return _copies[False]


def interpreted() -> Launchers:
    """The same kernels run by Triton's CPU interpreter."""
    if True not in _copies:
        _copies[True] = _load(True)
    return _copies[True]
