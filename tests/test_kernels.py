"""The Triton kernels, run by Triton's CPU interpreter, against their PyTorch twins.

Linf step and random start: bit-exact (torch.equal) in fp32, fp16 and bf16.
L2 step: the per-sample norms are summed in a different order than torch.norm,
so the result may differ in the last bits: bounded by L2_KERNEL_ATOL
(1e-6 in fp32, one fp16/bf16 ulp at 1.0 otherwise).
"""
import pytest
import torch

from fastadv import kernels, reference
from helpers import L2_KERNEL_ATOL, assert_close, assert_equal, poisoned_like

pytestmark = pytest.mark.interpreter

SHAPES = [(1, 1, 1, 1), (1, 3, 7, 5), (5, 3, 7, 5), (3, 1, 8, 8), (2, 3, 33, 35), (4, 2, 17, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def k():
    return kernels.interpreted()


def make_inputs(shape, dtype, eps, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    noise = (torch.rand(shape, generator=g) * 2 - 1) * 0.05
    adv = (x + noise).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[..., 0] = 0.0  # sign(0) = 0 and zero entries in the norms
    x, adv, grad = (t.to(dtype) for t in (x, adv, grad))
    if channels_last:
        x, adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, adv, grad))
    return adv, x, grad


def eps_variants(n):
    return [8 / 255, torch.linspace(0.0, 0.1, n)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_linf_step_equals_twin(k, shape, dtype, channels_last):
    adv, x, grad = make_inputs(shape, dtype, 8 / 255, channels_last)
    for eps in eps_variants(shape[0]):
        for alpha in (2 / 255, torch.linspace(0.001, 0.02, shape[0])):
            out = k.linf_step(adv, x, grad, alpha=alpha, eps=eps, out=poisoned_like(adv))
            assert_equal(out, reference.linf_step(adv, x, grad, alpha=alpha, eps=eps), f"eps={eps} alpha={alpha}")
        fgsm = k.linf_step(x, x, grad, alpha=eps, eps=eps, project=False, out=poisoned_like(x))
        assert_equal(fgsm, reference.linf_step(x, x, grad, alpha=eps, eps=eps, project=False), "fgsm")


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 40, 40)])  # 4800 > MAX_ROW: the tiled path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_l2_step_within_bound_of_twin(k, shape, dtype, channels_last):
    adv, x, grad = make_inputs(shape, dtype, 0.5, channels_last)
    for eps in (0.5, torch.linspace(0.05, 1.0, shape[0]), 1e-3):
        out = k.l2_step(adv, x, grad, alpha=0.2, eps=eps, out=poisoned_like(adv))
        expected = reference.l2_step(adv, x, grad, alpha=0.2, eps=eps)
        assert_close(out, expected, L2_KERNEL_ATOL[dtype], f"eps={eps}")


def test_l2_tiled_path_matches_row_path(k):
    """Both L2 code paths compute the same function: compare across the threshold."""
    from fastadv.kernels import l2

    adv, x, grad = make_inputs((3, 1, 64, 64), torch.float32, 0.5)  # 4096 = MAX_ROW: row path
    flat = [t.reshape(3, 1, 2, 2048) for t in (adv, x, grad)]
    row = k.l2_step(*flat, alpha=0.2, eps=0.5)
    assert l2.MAX_ROW == 4096
    padded = [torch.cat([t, t[..., :1]], dim=-1) for t in flat]  # 4098 elements: tiled path
    tiled = k.l2_step(*padded, alpha=0.2, eps=0.5)
    assert_close(tiled[..., :-1], row, 1e-3)  # the extra element changes the norms slightly


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_random_start_equals_twin(k, shape, dtype, channels_last):
    _, x, noise = make_inputs(shape, dtype, 0.0, channels_last)
    assert_equal(k.random_start(x, noise, out=poisoned_like(x)), reference.random_start(x, noise))
    for scale in (torch.rand(shape[0]).to(dtype), torch.rand(shape[0])):
        out = k.random_start(x, noise, scale, out=poisoned_like(x))
        assert_equal(out, reference.random_start(x, noise, scale), f"scale dtype {scale.dtype}")


def test_kernels_write_in_place_and_handle_empty(k):
    adv, x, grad = make_inputs((4, 3, 5, 5), torch.float32, 0.1)
    expected = reference.linf_step(adv, x, grad, alpha=0.01, eps=0.03)
    k.linf_step(adv, x, grad, alpha=0.01, eps=0.03, out=adv)
    assert_equal(adv, expected)
    empty = torch.empty(0, 3, 5, 5)
    assert k.linf_step(empty, empty, empty, alpha=0.1, eps=0.1).shape == empty.shape
    assert k.l2_step(empty, empty, empty, alpha=0.1, eps=0.1).shape == empty.shape


def test_non_contiguous_inputs(k):
    adv, x, grad = make_inputs((4, 3, 10, 12), torch.float32, 0.1)
    sl = (slice(None), slice(None), slice(None, None, 2), slice(1, None, 2))
    a, xx, g = adv[sl], x[sl], grad[sl]
    assert not a.is_contiguous()
    assert_equal(k.linf_step(a, xx, g, alpha=0.01, eps=0.03), reference.linf_step(a, xx, g, alpha=0.01, eps=0.03))
    assert_close(k.l2_step(a, xx, g, alpha=0.2, eps=0.3), reference.l2_step(a, xx, g, alpha=0.2, eps=0.3), 1e-6)


def test_fp16_near_clip_bounds(k):
    """fp16 values at the edges of [0, 1]: the step overshoots and the clip must hold."""
    x = torch.tensor([0.0, 1.0, 0.999, 0.001, 0.5], dtype=torch.float16).reshape(1, 1, 1, 5)
    grad = torch.tensor([-1.0, 1.0, 1.0, -1.0, 65504.0], dtype=torch.float16).reshape(1, 1, 1, 5)
    out = k.linf_step(x, x, grad, alpha=0.25, eps=0.5)
    assert_equal(out, reference.linf_step(x, x, grad, alpha=0.25, eps=0.5))
    assert out.min() >= 0 and out.max() <= 1


def test_int64_offsets_logic(k):
    """Offsets are computed in int64: a launch whose sample index arithmetic would
    overflow int32 (n // sample_numel with n > 2**31) is exercised at full scale on GPU
    only (tests/test_gpu.py); here the per-sample indexing is checked on many samples."""
    adv, x, grad = make_inputs((257, 1, 1, 3), torch.float32, 0.0)
    eps = torch.rand(257) * 0.1
    assert_equal(k.linf_step(adv, x, grad, alpha=0.05, eps=eps), reference.linf_step(adv, x, grad, alpha=0.05, eps=eps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_degenerate_gradients_take_no_step(k, dtype):
    """Zero, NaN and inf gradients, and eps = 0: the reference gives NaN; the twin and the
    kernel leave such a sample where it is, and never output NaN."""
    adv, x, grad = make_inputs((4, 3, 5, 7), dtype, 0.5)
    grad[0] = 0
    grad[1, 0, 0, 0] = float("nan")
    grad[2, 1, 2, 3] = float("inf")
    for eps in (0.5, 0.0):
        expected = reference.l2_step(adv, x, grad, alpha=0.2, eps=eps)
        assert not expected.isnan().any()
        assert_close(k.l2_step(adv, x, grad, alpha=0.2, eps=eps, out=poisoned_like(adv)), expected, L2_KERNEL_ATOL[dtype])
    moved = reference.l2_step(x, x, grad, alpha=0.2, eps=0.5)
    assert_equal(moved[:3], x[:3])  # no step where the gradient is degenerate


def test_misaligned_storage_offsets(k):
    """Views that start at an odd element of their storage (unaligned pointers)."""
    adv, x, grad = (t.flatten()[1:].reshape(3, 1, 5, 7) for t in make_inputs((106, 1, 1, 1), torch.float32, 0.1))
    assert adv.storage_offset() == 1 and adv.is_contiguous()
    for eps in (0.03, torch.tensor([0.0, 0.05, 0.1])):
        assert_equal(k.linf_step(adv, x, grad, alpha=0.01, eps=eps, out=poisoned_like(adv)),
                     reference.linf_step(adv, x, grad, alpha=0.01, eps=eps))
        assert_close(k.l2_step(adv, x, grad, alpha=0.2, eps=eps, out=poisoned_like(adv)),
                     reference.l2_step(adv, x, grad, alpha=0.2, eps=eps), L2_KERNEL_ATOL[torch.float32])
    assert_equal(k.random_start(x, grad, out=poisoned_like(x)), reference.random_start(x, grad))
