"""pytest-benchmark suite: small enough for a CPU, with a GPU-size variant marked gpu.

    .venv/bin/pytest benchmarks/test_bench_cpu.py --benchmark-enable
    .venv/bin/pytest benchmarks/test_bench_cpu.py --benchmark-enable -m gpu      # on a CUDA machine

Nothing here asserts anything about time: each benchmark only checks that the
output it timed equals the reference's (torch.equal; the L2 kernel within its
tolerance on CUDA). The project's test suite runs with --benchmark-disable and
lives in tests/; these files are kept out of it on purpose.

pytest-benchmark times one case after the other, not interleaved: on a machine
shared with other jobs, compare libraries with ``python -m benchmarks.bench_attacks``
(alternating runs) instead, and set FASTADV_BENCH_THREADS=1 here to avoid OpenMP
threads spin-waiting on a busy CPU.
"""
import functools
import os

import pytest
import torch

from . import models as bench_models
from .bench_kernels import make_inputs

torchattacks = pytest.importorskip("torchattacks")
fastadv = pytest.importorskip("fastadv")
from fastadv import ops, reference  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SEED = 0
PGD10 = dict(eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)


@functools.lru_cache(maxsize=None)
def case(model_name, batch, device="cpu"):
    """(model, x, y) with labels = the model's predictions, cached per process."""
    model = bench_models.build(model_name, device, seed=SEED)
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, *bench_models.MODELS[model_name].input_shape, generator=g).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def attack(lib, name, model, **kwargs):
    return getattr(torchattacks if lib == "torchattacks" else fastadv, name)(model, **kwargs)


def seeded(atk, x, y):
    def run():
        torch.manual_seed(SEED)
        out = atk(x, y)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    return run


@functools.lru_cache(maxsize=None)
def expected(lib, name, model_name, batch, device="cpu", **kwargs):
    model, x, y = case(model_name, batch, device)
    return seeded(attack(lib, name, model, **kwargs), x, y)()


OTHER = {"fastadv": "torchattacks", "torchattacks": "fastadv"}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """torch.set_num_threads(FASTADV_BENCH_THREADS) for this module, when set."""
    n = os.environ.get("FASTADV_BENCH_THREADS")
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(saved)


# -- CPU: PGD-10, fastadv vs torchattacks -----------------------------------------------------


@pytest.mark.parametrize("lib", ["fastadv", "torchattacks"])
@pytest.mark.parametrize("model_name,batch", [("smallcnn", 32), ("linear", 128)])
def test_pgd10_cpu(benchmark, lib, model_name, batch):
    benchmark.group = f"PGD-10 {model_name} batch {batch} (cpu)"
    model, x, y = case(model_name, batch)
    out = benchmark.pedantic(seeded(attack(lib, "PGD", model, **PGD10), x, y), rounds=5, warmup_rounds=1)
    assert torch.equal(out, expected(OTHER[lib], "PGD", model_name, batch, **PGD10))


# -- CPU: the kernel twins (the eager chain fastadv runs on the CPU) -------------------------------


def step_inputs(shape, dtype, device="cpu"):
    return make_inputs(shape, dtype, device, SEED)


def torchattacks_linf(adv, x, grad, alpha, eps):
    """torchattacks.PGD's update, as written there."""
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1).detach()


def torchattacks_l2(adv, x, grad, alpha, eps, eps_for_division=1e-10):
    """torchattacks.PGDL2's update, as written there."""
    n = grad.shape[0]
    grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + eps_for_division
    grad = grad / grad_norms.view(n, 1, 1, 1)
    adv = adv.detach() + alpha * grad
    delta = adv - x
    delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    return torch.clamp(x + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach()


TWINS = {
    "linf_step": (lambda a, x, g, n: reference.linf_step(a, x, g, alpha=2 / 255, eps=8 / 255),
                  lambda a, x, g, n: torchattacks_linf(a, x, g, 2 / 255, 8 / 255)),
    "l2_step": (lambda a, x, g, n: reference.l2_step(a, x, g, alpha=0.2, eps=0.5),
                lambda a, x, g, n: torchattacks_l2(a, x, g, 0.2, 0.5)),
    "random_start": (lambda a, x, g, n: reference.random_start(x, n),
                     lambda a, x, g, n: torch.clamp(x + n, min=0, max=1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(TWINS))
def test_kernel_twin_chain_cpu(benchmark, op, dtype):
    benchmark.group = f"twin {op} 128x3x32x32 (cpu)"
    adv, x, grad, noise = step_inputs((128, 3, 32, 32), dtype)
    twin, chain = TWINS[op]
    out = benchmark.pedantic(lambda: twin(adv, x, grad, noise), rounds=10, warmup_rounds=1)
    assert torch.equal(out, chain(adv, x, grad, noise))


# -- GPU sizes (marked gpu, skipped without CUDA) --------------------------------------------------


@pytest.fixture
def deterministic_cuda():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lib", ["fastadv", "torchattacks"])
@pytest.mark.parametrize("model_name,batch", [("smallcnn", 1024), ("linear", 4096), ("resnet18", 256)])
def test_pgd10_gpu(benchmark, deterministic_cuda, lib, model_name, batch):
    benchmark.group = f"PGD-10 {model_name} batch {batch} (cuda)"
    model, x, y = case(model_name, batch, "cuda")
    out = benchmark.pedantic(seeded(attack(lib, "PGD", model, **PGD10), x, y), rounds=10, warmup_rounds=2)
    assert torch.equal(out, expected(OTHER[lib], "PGD", model_name, batch, "cuda", **PGD10))


GPU_STEPS = {
    "linf_step": (lambda a, x, g, n, b: ops.linf_step(a, x, g, alpha=2 / 255, eps=8 / 255, backend=b), 0.0),
    "l2_step": (lambda a, x, g, n, b: ops.l2_step(a, x, g, alpha=0.2, eps=0.5, backend=b), None),
    "random_start": (lambda a, x, g, n, b: ops.random_start(x, n, backend=b), 0.0),
}
# The L2 kernel sums the norms in another order than torch.norm: allowed difference.
L2_ATOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (256, 3, 224, 224)], ids=["512x3x32x32", "256x3x224x224"])
@pytest.mark.parametrize("op", list(GPU_STEPS))
def test_step_gpu(benchmark, op, shape, dtype, backend):
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype)[6:]} (cuda)"
    adv, x, grad, noise = step_inputs(shape, dtype, "cuda")
    fn, atol = GPU_STEPS[op]

    def run():
        out = fn(adv, x, grad, noise, backend)
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=50, warmup_rounds=5)
    ref = fn(adv, x, grad, noise, "torch")
    if atol is None:
        assert (out.float() - ref.float()).abs().max().item() <= L2_ATOL[dtype]
    else:
        assert torch.equal(out, ref)
