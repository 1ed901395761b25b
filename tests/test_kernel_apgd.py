"""APGD's kernels (kernels/apgd.py), run by Triton's CPU interpreter, against their twins.

Linf update and bookkeeping: bit-exact (torch.equal) in fp32, fp16 and bf16, for
scalar and per-sample step sizes and budgets, both momentum weights, contiguous
and channels_last. L2 update: the three per-sample norms are summed in another
order than torch's, so the result is bounded by L2_KERNEL_ATOL (1e-6 in fp32,
one fp16/bf16 ulp at 1.0) for both arithmetics and for the row and tiled paths.
"""
import pytest
import torch

from fastadv import kernels, ops, reference
from helpers import L2_KERNEL_ATOL, assert_close, assert_equal, poisoned_like

pytestmark = pytest.mark.interpreter

SHAPES = [(1, 1, 1, 1), (3, 1, 8, 8), (4, 3, 7, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def k():
    return kernels.interpreted()


def make_state(shape, dtype, channels_last=False, seed=0):
    """(x_adv, x_old, x, grad): iterates near x, a gradient with zero entries and one zero sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x_adv = (x + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    x_old = (x + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[..., 0] = 0.0
    grad[0] = 0.0  # a sample with a zero gradient: sign 0, norm 0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=fmt) for t in (x_adv, x_old, x, grad)]


def budgets(n, scale):
    g = torch.Generator().manual_seed(1)
    per_sample = torch.rand(n, generator=g) * scale
    per_sample[-1] = 0.0  # eps = 0: the iterate collapses onto x
    return [(2 * scale, scale), (2 * per_sample, per_sample), (2 * scale, per_sample)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_linf_update_equals_twin(k, shape, dtype, channels_last):
    x_adv, x_old, x, grad = make_state(shape, dtype, channels_last)
    for step, eps in budgets(shape[0], 0.05):
        for a in (1.0, 0.75):
            out = k.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, out=poisoned_like(x_adv))
            expected = reference.apgd_linf_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a)
            assert expected.dtype == dtype
            assert_equal(out, expected, f"step={step} eps={eps} a={a}")


@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 40, 40)])  # 4800 > MAX_ROW: the tiled path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arithmetic", ["torchattacks", "original"])
def test_l2_update_within_bound_of_twin(k, shape, dtype, arithmetic):
    x_adv, x_old, x, grad = make_state(shape, dtype)
    cases = list(zip(budgets(shape[0], 0.5), (1.0, 0.75, 0.75)))
    for (step, eps), a in cases if shape[-1] < 40 else cases[1:2]:
        expected = reference.apgd_l2_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, arithmetic=arithmetic)
        assert not expected.isnan().any()
        out = k.apgd_l2_step(x_adv, x_old, x, grad, step=step, eps=eps, a=a, arithmetic=arithmetic,
                             out=poisoned_like(x_adv))
        assert_close(out, expected, L2_KERNEL_ATOL[dtype], f"step={step} eps={eps} a={a}")


@pytest.mark.parametrize("arithmetic", ["torchattacks", "original"])
def test_l2_tiled_path_equals_row_path_bound(k, arithmetic):
    """The tiled path (forced with a tiny max_row) on small samples agrees with the row kernel."""
    x_adv, x_old, x, grad = make_state((3, 3, 7, 5), torch.float32)
    kw = dict(step=1.0, eps=0.5, a=0.75, arithmetic=arithmetic)
    row = k.apgd_l2_step(x_adv, x_old, x, grad, **kw)
    tiled = k.apgd_l2_step(x_adv, x_old, x, grad, max_row=16, out=poisoned_like(x_adv), **kw)
    assert_close(tiled, row, L2_KERNEL_ATOL[torch.float32])


def test_l2_update_stays_in_the_ball(k):
    x_adv, x_old, x, grad = make_state((4, 3, 7, 5), torch.float32)
    eps = torch.tensor([0.5, 0.1, 1.0, 0.0])
    out = k.apgd_l2_step(x_adv, x_old, x, grad, step=2 * eps, eps=eps, a=0.75)
    assert ((out - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_track_equals_twin(k, dtype, channels_last):
    x_adv, grad, x_best, grad_best = make_state((5, 3, 7, 5), dtype, channels_last, seed=2)
    x_best_adv = x_best.flip(0).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    improved = torch.tensor([True, False, True, False, False])
    fooled = torch.tensor([False, False, True, True, False])
    expected = [t.clone() for t in (x_best, grad_best, x_best_adv)]
    reference.apgd_track_(x_adv, grad, *expected, improved, fooled)
    actual = [t.clone() for t in (x_best, grad_best, x_best_adv)]
    k.apgd_track_(x_adv, grad, *actual, improved, fooled)
    for a, e, name in zip(actual, expected, ("x_best", "grad_best", "x_best_adv")):
        assert_equal(a, e, name)
    assert_equal(actual[0][improved], x_adv[improved])
    assert_equal(actual[0][~improved], x_best[~improved])
    assert_equal(actual[2][fooled], x_adv[fooled])
    assert_equal(actual[2][~fooled], x_best_adv[~fooled])


def test_track_mixed_layouts_fall_back(k):
    x_adv, grad, x_best, grad_best = make_state((2, 3, 4, 4), torch.float32)
    x_best_adv = x_best.contiguous(memory_format=torch.channels_last)
    improved, fooled = torch.tensor([True, False]), torch.tensor([False, True])
    expected = [t.clone() for t in (x_best, grad_best, x_best_adv)]
    reference.apgd_track_(x_adv, grad, *expected, improved, fooled)
    k.apgd_track_(x_adv, grad, x_best, grad_best, x_best_adv, improved, fooled)
    for a, e in zip((x_best, grad_best, x_best_adv), expected):
        assert_equal(a, e)


def test_ops_dispatch_and_out(k):
    x_adv, x_old, x, grad = make_state((3, 1, 8, 8), torch.float32)
    kw = dict(step=0.1, eps=0.05, a=0.75)
    expected = reference.apgd_linf_step(x_adv, x_old, x, grad, **kw)
    for backend in ("torch", "interpret"):
        out = poisoned_like(x_adv)
        assert ops.apgd_linf_step(x_adv, x_old, x, grad, backend=backend, out=out, **kw) is out
        assert_equal(out, expected, backend)
    # float64 always takes the twin
    d = [t.double() for t in (x_adv, x_old, x, grad)]
    assert ops.apgd_l2_step(*d, step=1.0, eps=0.5, a=1.0, backend="interpret").dtype == torch.float64
