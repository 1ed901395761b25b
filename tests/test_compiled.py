"""The kernels as a GPU compiles them, checked on the CPU (marker `compiled`; `make test-compiled`).

Every launcher, in every mode, on fp32/fp16/bf16, contiguous/channels_last/misaligned/odd-sized
inputs, on the row and the tiled path, is called on CPU tensors under fastadv.compile_check's
compile-only driver for sm_80, sm_90 and sm_100: Triton compiles exactly what the launch would
on that GPU and runs nothing. From each kernel's PTX and SASS: it compiles, it uses no local
memory, its global traffic equals the design minimum (compile_check.design), and aligned fp32
inputs move in 128-bit accesses. The same checks run again with the oldest supported triton
(pyproject's lower bound) in a subprocess. What only a GPU shows (times, the compiled
arithmetic's bits) is in tests/test_gpu.py.
"""
import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import fastadv.functional as F
from fastadv import compile_check as cc_
from fastadv import kernels

pytestmark = pytest.mark.compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_results = {}


def per_target(cc):
    """The tests of one target run on one pytest worker (xdist_group): they share its compilation
    (results()), which another worker would repeat from scratch; the targets spread over workers."""
    return pytest.param(cc, marks=pytest.mark.xdist_group(f"sm{cc}"))


def results(cc):
    """Every case compiled and checked for sm_<cc>, once per session."""
    if cc not in _results:
        _results[cc] = cc_.check_all((cc,))
    return _results[cc]


@pytest.mark.slow
@pytest.mark.parametrize("cc", [per_target(cc) for cc in cc_.TARGETS])
def test_every_launch_compiles(cc):
    rs = results(cc)
    failed = [r for r in rs if r.item is None]
    assert not failed, "\n" + cc_.report(failed)
    assert {r.case for r in rs} == set(cc_.cases())


@pytest.mark.slow
@pytest.mark.parametrize("cc", [per_target(cc) for cc in cc_.TARGETS])
def test_no_spills_design_minimum_traffic_and_128_bit_accesses(cc):
    rs = [r for r in results(cc) if r.item is not None]
    bad = cc_.report(rs)
    assert not bad, "\n" + bad
    vectorized = [r for r in rs if cc_.vector_expected(r.case, r.item)]
    # the 128-bit check really ran, on every launcher (91 of 369 launches on sm_90)
    assert {r.case.launcher for r in vectorized} == {c.launcher for c in cc_.cases()}


@pytest.mark.xdist_group("sm90")
def test_cases_cover_every_launcher_and_kernel():
    modules = [importlib.import_module(f"fastadv.kernels.{m}") for m in kernels.MODULES]
    launchers = {
        name for m in modules for name, fn in vars(m).items()
        if inspect.isfunction(fn) and fn.__module__ == m.__name__ and not name.startswith("_")
    }
    assert launchers == {c.launcher for c in cc_.cases()}
    jitted = {
        name for m in modules for name, fn in vars(m).items()
        if isinstance(fn, triton.runtime.JITFunction) and name.endswith("_kernel")
    }
    assert jitted == {r.item.name for r in results(90) if r.item is not None}


def test_the_checks_can_fail():
    """Misaligned fp32 storage compiles to scalar accesses: asked for 128-bit, the check says so;
    and a design minimum one tensor short is reported as excess traffic."""
    case = cc_.Case("linf_step", "project eps=float alpha=float", torch.float32, "misaligned", "row")
    (item,) = cc_.compile_case(case, 90)
    profile = cc_.inspect(item)
    assert any("not 128-bit" in p for p in cc_.problems(item, profile, vector_expected=True))
    item.options["PROJECT"] = False  # pretend it should read only adv and grad
    assert any("design minimum" in p for p in cc_.problems(item, profile, vector_expected=False))


@triton.jit
def _block_or_scalar(value, ptr, offs, PER_SAMPLE: tl.constexpr):
    if PER_SAMPLE:
        return tl.load(ptr + offs)
    return value


@triton.jit
def _broken_kernel(ptr, value, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + offs, _block_or_scalar(value, ptr, offs, PER_SAMPLE))


def test_a_compile_error_names_kernel_specialization_and_target():
    """The pattern that broke APGD's Linf step on GPUs (a block in one constexpr branch, a
    scalar in the other) passes the interpreter but not the compiler, and is reported by name."""
    with pytest.raises(RuntimeError, match=r"_broken_kernel\[ptr:float32, PER_SAMPLE=True, BLOCK=16\] on sm_90 does not compile"):
        with cc_.compile_only(90):
            _broken_kernel[(1,)](torch.zeros(16), 1.0, PER_SAMPLE=True, BLOCK=16)


def test_compile_only_restores_triton_state():
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run, active = JITFunction.run, driver._active
    with pytest.raises(RuntimeError):
        with cc_.compile_only(80):
            _broken_kernel[(1,)](torch.zeros(16), 1.0, PER_SAMPLE=True, BLOCK=16)
    assert JITFunction.run is run and driver._active is active


# -- bad input: a clear error naming the argument or the reference path, never a compile error ------


def _step_args(dtype=torch.float32, shape=(2, 3, 4, 8)):
    adv, x, grad = (torch.rand(shape).to(dtype) for _ in range(3))
    return adv, x, grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_unsupported_dtype_is_named_before_triton_sees_it(dtype):
    adv, x, grad = _step_args(dtype)
    k = kernels.compiled()
    with cc_.compile_only(90) as found:
        with pytest.raises(TypeError, match=r"adv has dtype torch\.\w+; the kernels take float32, float16 or bfloat16"):
            k.linf_step(adv, x, grad, alpha=0.01, eps=0.03)
        with pytest.raises(TypeError, match="x_adv has dtype"):
            k.apgd_linf_step(adv, adv, x, grad, step=0.01, eps=0.03, a=0.75)
    assert not found


def test_float64_takes_the_reference_path_through_ops():
    from fastadv import ops, reference

    adv, x, grad = _step_args(torch.float64)
    expected = reference.linf_step(adv, x, grad, alpha=0.01, eps=0.03)
    with cc_.compile_only(90) as found:
        actual = ops.linf_step(adv, x, grad, alpha=0.01, eps=0.03, backend="interpret")
    assert not found and torch.equal(actual, expected)


@pytest.mark.parametrize("bad, argument", [
    (dict(grad=torch.rand(2, 3, 4, 7)), "grad has shape"),
    (dict(x=torch.rand(2, 3, 4, 8).half()), "x has dtype"),
    (dict(grad=torch.rand(2, 3, 4, 8, device="meta")), "grad is on meta"),
    (dict(eps=torch.full((3,), 0.03)), "eps has 3 values, expected one per sample"),
    (dict(alpha=torch.full((1,), 0.01)), "alpha has 1 values"),
    (dict(adv=torch.tensor(0.5)), "adv must have a batch dimension"),
])
def test_mismatched_inputs_are_named(bad, argument):
    adv, x, grad = _step_args()
    args = dict(adv=adv, x=x, grad=grad, alpha=0.01, eps=0.03) | bad
    with cc_.compile_only(90) as found:
        with pytest.raises((ValueError, TypeError), match=argument):
            kernels.compiled().linf_step(**args)
    assert not found


def test_triton_backend_on_cpu_tensors_is_a_clear_error():
    from fastadv import ops

    adv, x, grad = _step_args()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ops.linf_step(adv, x, grad, alpha=0.01, eps=0.03, backend="triton")


def test_any_layout_compiles_as_a_dense_copy():
    """Strided (non-dense) inputs are copied to a dense layout before the launch."""
    adv, x, grad = (t.transpose(2, 3) for t in _step_args(shape=(2, 3, 8, 5)))
    with cc_.compile_only(90) as found:
        kernels.compiled().linf_step(adv[:, :, ::2], x[:, :, ::2], grad[:, :, ::2], alpha=0.01, eps=0.03)
    assert [c.name for c in found] == ["_linf_step_kernel"]


# -- through the attacks: the launches the attacks make, compiled -------------------------------

# Every attack with a kernel (FAB runs on PyTorch ops; AutoAttack's launches are APGD's and APGDT's).
ATTACKS = [  # (name, call, kernels its launches must compile)
    ("FGSM", lambda m, x, y: F.fgsm(m, x, y, eps=0.1), {"_linf_step_kernel"}),
    ("FFGSM", lambda m, x, y: F.ffgsm(m, x, y, eps=0.1, alpha=0.12), {"_linf_step_kernel", "_start_kernel"}),
    ("RFGSM", lambda m, x, y: F.rfgsm(m, x, y, eps=0.1, alpha=0.05, steps=2), {"_linf_step_kernel", "_start_kernel"}),
    ("PGD", lambda m, x, y: F.pgd(m, x, y, eps=0.1, alpha=0.02, steps=2), {"_linf_step_kernel", "_start_kernel"}),
    ("PGD eps=tensor", lambda m, x, y: F.pgd(m, x, y, eps=torch.full((len(x),), 0.1), alpha=0.02, steps=2),
     {"_linf_step_kernel", "_start_kernel"}),
    ("PGDL2", lambda m, x, y: F.pgdl2(m, x, y, eps=0.5, alpha=0.2, steps=2), {"_l2_row_kernel", "_start_kernel"}),
    ("EOTPGD", lambda m, x, y: F.eotpgd(m, x, y, eps=0.1, alpha=0.02, steps=2, eot_iter=2),
     {"_linf_step_kernel", "_start_kernel"}),
    ("TPGD", lambda m, x, y: F.tpgd(m, x, eps=0.1, alpha=0.02, steps=2), {"_linf_step_kernel"}),
    ("MIFGSM", lambda m, x, y: F.mifgsm(m, x, y, eps=0.1, alpha=0.02, steps=2), {"_mifgsm_row_kernel"}),
    ("APGD Linf ce", lambda m, x, y: F.apgd(m, x, y, norm="Linf", eps=0.1, steps=3), {"_apgd_linf_kernel", "_apgd_track_kernel"}),
    ("APGD L2 dlr", lambda m, x, y: F.apgd(m, x, y, norm="L2", eps=0.5, steps=3, loss="dlr"),
     {"_apgd_l2_row_kernel", "_apgd_track_kernel"}),
    ("APGDT Linf", lambda m, x, y: F.apgdt(m, x, y, norm="Linf", eps=0.1, steps=3, n_classes=3),
     {"_apgd_linf_kernel", "_apgd_track_kernel"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, call, expected", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_compile_their_launches(name, call, expected, trained_models, digits):
    """The attack runs with backend='interpret' under compile_check.twin_launches: each launch
    is compiled for sm_90 from the attack's own arguments, then run by the interpreter so the
    loop has values; the output equals the interpreter's alone."""
    _, (x, y) = digits
    x, y = x[:6].clone(), y[:6].clone()
    model = trained_models["mlp"]
    torch.manual_seed(1)
    with cc_.twin_launches(90) as compiled:
        actual = call(model, x, y)
    torch.manual_seed(1)
    plain = call(model, x, y)
    assert expected <= {c.name for c in compiled}, f"{name}: compiled {sorted({c.name for c in compiled})}"
    assert torch.equal(actual, plain), name


@pytest.fixture(autouse=True)
def _interpret_backend(monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "interpret")


# -- the oldest supported triton ------------------------------------------------------------------


# sm_90 (the lent H100/H200 machines) in `make test`; sm_80 and sm_100 with the oldest triton cost
# another ~3 minutes cold on a 2-core machine, so only `make test-compiled` adds them.
@pytest.mark.slow
@pytest.mark.parametrize("cc", [pytest.param(80, marks=pytest.mark.sweep), 90,
                                pytest.param(100, marks=pytest.mark.sweep)])
def test_oldest_triton_compiles_everything_too(cc):
    """`make test` installs pyproject's lower bound (triton 3.6, on the lent GPU machines) in its
    own folder; the same compile and checks run there in a subprocess."""
    path = os.environ.get("FASTADV_TRITON_OLDEST") or os.path.join(ROOT, ".cache", "triton-3.6.0")
    if not os.path.isdir(os.path.join(path, "triton")):
        pytest.skip(f"no oldest triton at {path}: run `make triton-oldest` (make test does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, ROOT]))
    env.pop("FASTADV_BACKEND", None)
    done = subprocess.run([sys.executable, "-m", "fastadv.compile_check", str(cc)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lower = open(os.path.join(ROOT, "pyproject.toml")).read().split('"triton>=')[1].split('"')[0]
    assert done.stdout.startswith(f"triton {lower}"), done.stdout
