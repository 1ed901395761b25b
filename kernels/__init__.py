"""fastadv's Triton kernels, installed as ``fastadv.kernels``.

Each module holds ``@triton.jit`` code and one launcher:

- ``linf``:  fused sign step + eps-ball projection + clip (FGSM, PGD, ...)
- ``l2``:    fused normalized step + L2-ball projection + clip (PGDL2)
- ``start``: random-start finish, clamp(x + noise * scale, 0, 1)

``interpreted()`` returns a second copy of these modules whose kernels were
decorated under ``TRITON_INTERPRET=1``: the same kernel code, run by Triton's
interpreter on CPU tensors. Having both copies lets one process use the compiled
and the interpreted kernels side by side, whatever the environment says.
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types

MODULES = ("linf", "l2", "start")
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


def _interpreting(launcher):
    """Run a launcher of the interpreted copy with TRITON_INTERPRET=1 set: Triton reads
    it both when decorating and, lazily, while interpreting."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        with _interpret_env():
            return launcher(*args, **kwargs)

    return run


def _load(interpret: bool) -> types.SimpleNamespace:
    if interpret:
        name = __name__ + "_interpreted"
        spec = importlib.util.spec_from_file_location(
            name, __file__, submodule_search_locations=[os.path.dirname(__file__)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    else:
        name = __name__
    with _interpret_env() if interpret else contextlib.nullcontext():
        mods = {m: importlib.import_module(f"{name}.{m}") for m in MODULES}
    wrap = _interpreting if interpret else (lambda f: f)
    return types.SimpleNamespace(
        linf_step=wrap(mods["linf"].linf_step),
        l2_step=wrap(mods["l2"].l2_step),
        random_start=wrap(mods["start"].random_start),
    )


def compiled() -> types.SimpleNamespace:
    """The kernels as Triton compiles them for the GPU."""
    if False not in _copies:
        _copies[False] = _load(False)
    return _copies[False]


def interpreted() -> types.SimpleNamespace:
    """The same kernels run by Triton's CPU interpreter."""
    if True not in _copies:
        _copies[True] = _load(True)
    return _copies[True]
