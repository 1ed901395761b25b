"""Backends chosen in one place; the wheel ships the kernels as fastadv.kernels only, and py.typed."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=300)


INTERPRET_CHECK = """
import torch, fastadv
from fastadv.models import MLP
torch.manual_seed(0)
m = MLP().eval(); x = torch.rand(4, 1, 8, 8); y = torch.tensor([0, 1, 2, 3])
outs = []
for backend in ("torch", "interpret"):
    torch.manual_seed(1)
    outs.append(fastadv.PGD(m, steps=2, backend=backend)(x, y))
assert torch.equal(*outs), "interpret != torch"
print("ok")
"""


@pytest.mark.interpreter
@pytest.mark.parametrize("preimport", ["", "import triton, triton.language\n"], ids=["fresh", "triton-imported-first"])
def test_interpret_backend_in_fresh_process(preimport):
    """'interpret' works in a new process, whether or not triton was imported (compiled mode) first."""
    result = run_python(preimport + INTERPRET_CHECK)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.interpreter
def test_env_var_selects_backend():
    code = INTERPRET_CHECK.replace('("torch", "interpret")', '(None, "torch")')
    result = run_python(code, {"FASTADV_BACKEND": "interpret"})
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_python(code, {"FASTADV_BACKEND": "bogus"})
    assert result.returncode != 0 and "FASTADV_BACKEND" in result.stderr


def test_interpreted_kernels_leave_environment_alone():
    from fastadv import kernels

    before = os.environ.get("TRITON_INTERPRET")
    kernels.interpreted()
    assert os.environ.get("TRITON_INTERPRET") == before


def test_resolve():
    import torch

    from fastadv.backend import resolve

    assert resolve("auto", torch.device("cpu")) == "torch"
    assert resolve("auto", torch.device("cuda")) == "triton"
    assert resolve("interpret", "cpu") == "interpret"
    with pytest.raises(ValueError, match="CUDA"):
        resolve("triton", "cpu")
    with pytest.raises(ValueError, match="CPU"):
        resolve("interpret", "cuda")


@pytest.mark.slow
def test_wheel_contains_kernels_under_fastadv(tmp_path):
    """Build the wheel: it must hold fastadv/kernels/*.py and no top-level kernels package."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastadv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("linf", "l2", "start", "_common", "utils", "__init__"):
        assert f"fastadv/kernels/{module}.py" in names, names
    assert not any(n.startswith("kernels/") for n in names), "a bare top-level 'kernels' package was packaged"
    assert "fastadv/py.typed" in names, "the PEP 561 marker: type checkers read fastadv's annotations"


def test_bare_kernels_module_is_not_ours():
    """`import kernels` must never resolve to fastadv's kernels (that name is a PyPI package)."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    result = run_python(code, cwd="/")
    assert result.returncode == 0, result.stderr
    origin = result.stdout.strip()
    assert origin == "None" or not origin.startswith(str(ROOT)), origin
