"""The in-place CPU step ops equal their reference twins bit for bit."""
import pytest
import torch

from fastadv import inplace, reference
from helpers import assert_close, assert_equal

CASES = [(1, 1, 1, 1), (3, 3, 7, 5), (16, 1, 8, 8), (5, 3, 33, 31)]  # the last: vectorised loops and tails


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    adv = (x + (torch.rand(shape, generator=g) * 2 - 1) * 0.05).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[0] = 0  # a degenerate sample
    if shape[0] > 1:  # non-finite and negative-zero entries in the last sample
        grad[-1].view(-1)[-3:] = torch.tensor([float("nan"), float("inf"), -0.0])
    return [t.to(dtype) for t in (adv, x, grad)]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_equals_twin(shape, dtype, channels_last):
    adv, x, grad = inputs(shape, dtype)
    if channels_last:
        adv, x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (adv, x, grad))
    n = shape[0]
    for eps, alpha in ((8 / 255, 2 / 255), (torch.linspace(0, 0.1, n), torch.linspace(0.01, 0.02, n))):
        for project in (True, False):
            expected = reference.linf_step(adv, x, grad, alpha=alpha, eps=eps, project=project)
            assert_equal(inplace.linf_step_(adv, x, grad.clone(), alpha=alpha, eps=eps, project=project), expected)
    for eps in (0.5, torch.linspace(0, 1, n), 0.0):
        expected = reference.l2_step(adv, x, grad, alpha=0.2, eps=eps)
        assert_equal(inplace.l2_step_(adv, x, grad.clone(), alpha=0.2, eps=eps), expected)


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_mifgsm_equals_twin(shape, dtype, channels_last):
    adv, x, grad = inputs(shape, dtype)
    momentum = inputs(shape, dtype, seed=1)[2]  # with a zero sample and non-finite entries too
    if channels_last:
        adv, x, grad, momentum = (t.contiguous(memory_format=torch.channels_last) for t in (adv, x, grad, momentum))
    n = shape[0]
    for eps, alpha, decay in ((8 / 255, 2 / 255, 1.0), (torch.linspace(0, 0.1, n), torch.linspace(0.01, 0.02, n), 0.5)):
        adv_ref, mom_ref = reference.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay)
        mom = momentum.clone()
        adv_in, mom_in = inplace.mifgsm_step_(adv, x, grad.clone(), mom, alpha=alpha, eps=eps, decay=decay)
        assert mom_in is mom
        assert_equal(adv_in, adv_ref)
        assert_close(mom_in, mom_ref, atol=0)  # equal, NaN (a zero-gradient sample's 0/0) where the twin's is
