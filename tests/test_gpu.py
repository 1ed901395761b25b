"""Compiled Triton kernels on CUDA (marked gpu: skipped without a CUDA device)."""
import pytest
import torch

from fastadv import kernels, reference
from helpers import L2_KERNEL_ATOL, assert_close, assert_equal, poisoned_like

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 3, 7, 5), (128, 3, 32, 32), (7, 3, 65, 67), (4, 3, 224, 224)]


def inputs(shape, dtype, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(shape, device="cuda", generator=g)
    adv = (x + (torch.rand(shape, device="cuda", generator=g) * 2 - 1) * 0.05).clamp(0, 1)
    grad = torch.randn(shape, device="cuda", generator=g)
    out = [t.to(dtype) for t in (adv, x, grad)]
    if channels_last:
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_kernels_match_twin(shape, dtype, channels_last):
    k = kernels.compiled()
    adv, x, grad = inputs(shape, dtype, channels_last)
    for eps in (8 / 255, torch.linspace(0, 0.1, shape[0], device="cuda")):
        out = k.linf_step(adv, x, grad, alpha=2 / 255, eps=eps, out=poisoned_like(adv))
        assert_equal(out, reference.linf_step(adv, x, grad, alpha=2 / 255, eps=eps))
        out = k.l2_step(adv, x, grad, alpha=0.2, eps=eps if isinstance(eps, torch.Tensor) else 0.5, out=poisoned_like(adv))
        expected = reference.l2_step(adv, x, grad, alpha=0.2, eps=eps if isinstance(eps, torch.Tensor) else 0.5)
        assert_close(out, expected, L2_KERNEL_ATOL[dtype])
    assert_equal(k.random_start(x, grad, out=poisoned_like(x)), reference.random_start(x, grad))


def test_int64_indexing_at_full_scale():
    """More than 2**31 elements: offsets and sample indices must not overflow int32."""
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 2**20
    if free < 4 * n * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for the 2**31-element check")
    k = kernels.compiled()
    x = torch.full((n // 1024, 1, 32, 32), 0.5, device="cuda", dtype=torch.float16)
    grad = torch.ones_like(x)
    grad[-1] = -1
    out = k.linf_step(x, x, grad, alpha=0.25, eps=0.125)
    assert out[0].unique().item() == 0.625 and out[-1].unique().item() == 0.375


def test_attacks_match_torchattacks_on_cuda(deterministic_cuda):
    torchattacks = pytest.importorskip("torchattacks")
    import fastadv
    from fastadv.models import SmallCNN

    model = SmallCNN().cuda().eval()
    x = torch.rand(256, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    for name in ("FGSM", "PGD", "PGDL2"):
        torch.manual_seed(0)
        expected = getattr(torchattacks, name)(model)(x, y)
        torch.manual_seed(0)
        actual = getattr(fastadv, name)(model)(x, y)
        if name == "PGDL2":
            assert_close(actual, expected, 1e-5)
        else:
            assert_equal(actual, expected, name)
