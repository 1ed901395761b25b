"""Captured steps replayed across calls on CUDA (fastadv.graphs): the same bits as eager, never
a replay on stale weights, fit's batches on one graph (marked gpu: skipped without CUDA).
The keys and the invalidation rules are tested on the CPU in test_graphs.py."""
import copy
import warnings

import pytest
import torch

import fastadv
from fastadv import graphs
from fastadv.models import SmallCNN
from helpers import assert_equal

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_case(deterministic_cuda):
    torch.manual_seed(0)
    model = SmallCNN().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.rand(64, 1, 8, 8, device="cuda", generator=g)
    y = torch.randint(0, 10, (64,), device="cuda", generator=g)
    return model, x, y


def pgd(model, x, y, seed, **kw):
    torch.manual_seed(seed)
    return fastadv.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, **kw)(x, y)


def test_one_capture_serves_every_call(cuda_case):
    model, x, y = cuda_case
    atk = fastadv.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, cuda_graph=True)
    before = graphs.cache.captures
    outs = []
    for seed, (xs, ys) in enumerate([(x, y), (x.flip(0), y.flip(0)), (x, (y + 1) % 10)]):
        torch.manual_seed(seed)
        outs.append(atk(xs, ys))
        assert_equal(outs[-1], pgd(model, xs, ys, seed), f"call {seed}")
    assert graphs.cache.captures == before + 1
    assert len({o.data_ptr() for o in outs}) == 3  # each call owns its result


def test_replaced_weights_are_never_replayed_stale(cuda_case):
    model, x, y = cuda_case
    atk = fastadv.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, cuda_graph=True)
    torch.manual_seed(0)
    atk(x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # in place: read by the replay
    torch.manual_seed(0)
    assert_equal(atk(x, y), pgd(model, x, y, 0), "after an in-place update")
    for p in model.parameters():
        p.data = p.data * 1.1  # new storage: the old graph would read the old weights
    torch.manual_seed(0)
    assert_equal(atk(x, y), pgd(model, x, y, 0), "after the parameters were replaced")
    model.load_state_dict(SmallCNN().cuda().state_dict(), assign=True)
    torch.manual_seed(0)
    assert_equal(atk(x, y), pgd(model, x, y, 0), "after load_state_dict(assign=True)")


def test_calls_of_two_shapes_replay_one_graph_each(cuda_case):
    """Chunks of 16, 16, 16 and 2 called one by one (as a loader's batches come): two captures.
    A call with batch_size below its batch runs on fixed-shape slots, whose steps are not
    captured (a warning; tests/test_graphs.py)."""
    model, x, y = cuda_case
    before = graphs.cache.captures
    for lo, hi in ((0, 16), (16, 32), (32, 48), (48, 50)):
        assert_equal(pgd(model, x[lo:hi], y[lo:hi], lo, cuda_graph=True), pgd(model, x[lo:hi], y[lo:hi], lo))
    assert graphs.cache.captures == before + 2


def test_fit_replays_one_graph_on_every_batch(deterministic_cuda, digits):
    from fastadv.train import TrainConfig, fit

    (x, y), _ = digits
    x, y = x[:200].cuda(), y[:200].cuda()  # batches of 64, 64, 64 and 8: the last on its own graph
    models = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        net = SmallCNN().cuda()
        torch.manual_seed(1)
        fit(net, x, y, TrainConfig(method="pgd", eps=0.1, steps=5, cuda_graph=cuda_graph), epochs=2, batch_size=64,
            optimizer="sgd", lr=0.05, schedule="constant", seed=0)
        models.append(net)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert_equal(b, a, name)


def test_an_uncapturable_model_warns_once_and_runs_eagerly(cuda_case):
    model, x, y = cuda_case

    class Syncing(torch.nn.Module):  # .item() inside forward cannot be captured
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(model)

        def forward(self, inp):
            return self.inner(inp) * (1.0 + 0.0 * float(inp.sum().item()))

    bad = Syncing().cuda().eval()
    atk = fastadv.PGD(bad, eps=8 / 255, alpha=2 / 255, steps=5, cuda_graph=True)
    with pytest.warns(UserWarning, match="capture failed"):
        torch.manual_seed(0)
        first = atk(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        second = atk(x, y)  # not tried again
    assert_equal(first, pgd(bad, x, y, 0))
    assert_equal(second, first)
    assert not graphs.capturable(bad)
