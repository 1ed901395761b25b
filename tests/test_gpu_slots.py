"""Fixed-shape slots on CUDA (marked gpu: skipped without a CUDA device).

The exits are exact where a sample's logits and input gradient depend on the batch's shape
and not on what the other rows hold. These tests measure that on the GPU, for a small CNN
and for pyautoattack's robust ResNet-18 (when pyautoattack is installed), with
deterministic algorithms on and off, and check that evaluate's flags with and without
exits are identical there. Every global setting a test changes is restored.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastadv
from fastadv.models import SmallCNN

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def deterministic(on):
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.use_deterministic_algorithms(on, warn_only=True)
        torch.backends.cudnn.deterministic = on
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def numbers(model, x, y):
    a = x.detach().clone().requires_grad_(True)
    logits = model(a)
    g, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), a)
    return logits.detach(), g


def models():
    out = {"smallcnn": (SmallCNN(in_channels=3, n_classes=10, width=16, image_size=32), (3, 32, 32))}
    try:
        from benchmarks.models import robust_resnet18

        out["robust-resnet18"] = (robust_resnet18(), (3, 32, 32))
    except (ImportError, FileNotFoundError):
        pass
    return out


@pytest.mark.parametrize("det", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("name", ["smallcnn", "robust-resnet18"])
def test_a_sample_depends_on_the_shape_not_on_the_other_rows(name, det):
    available = models()
    if name not in available:
        pytest.skip(f"{name} needs pyautoattack's example model")
    torch.manual_seed(0)
    model, shape = available[name]
    model = model.cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    size = 64
    x = torch.rand((size, *shape), device="cuda", generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    others = torch.rand((size, *shape), device="cuda", generator=g)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(size - 1)]).cuda()
    with deterministic(det):
        base = numbers(model, x, y)
        again = numbers(model, x, y)
        mixed = numbers(model, torch.cat([x[:8], others[8:]]), y)
        permuted = numbers(model, x[perm], y[perm])
    assert all(torch.equal(u, v) for u, v in zip(again, base)), "the same batch again"
    assert all(torch.equal(u[:8], v[:8]) for u, v in zip(mixed, base)), "other rows replaced"
    assert all(torch.equal(u[0], v[0]) for u, v in zip(permuted, base)), "rows permuted"


@pytest.mark.parametrize("det", [False, True], ids=["default", "deterministic"])
def test_evaluate_flags_with_and_without_exits_on_cuda(det):
    """The product's promise under the user's settings (default) and with deterministic cuDNN:
    if only the second holds, evaluate must set it for its slot stages."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, n_classes=10, width=16, image_size=32).cuda().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand((300, 3, 32, 32), generator=g)
    with torch.no_grad():
        y = model(x.cuda()).argmax(1).cpu()
    with deterministic(det):
        reports = {e: fastadv.evaluate(model, x, y, ["pgd-50", "apgd-ce-20"], eps=8 / 255, batch_size=64, exits=e)
                   for e in (True, False)}
    assert torch.equal(reports[True]["robust_flags"], reports[False]["robust_flags"])
    assert sum(a["backwards"] for a in reports[True]["attacks"]) <= sum(a["backwards"] for a in reports[False]["attacks"])
