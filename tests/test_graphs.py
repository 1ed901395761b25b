"""The cache of captured steps (fastadv.graphs): keys, invalidation and the attack loop's use
of it, on the CPU.

The CUDA parts (warm-up on a side stream, capture) are replaced by a stand-in that runs the
step eagerly on every replay and counts captures, and the CUDA code path runs on CPU tensors
with the kernel launchers' PyTorch twins (host_syncs.on_triton_path). What this cannot show
(a real graph reading stale memory) is tested on a GPU in test_gpu_graphs.py.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import fastadv
from fastadv import graphs
from fastadv.calls import CallCounter
from host_syncs import Recorder, on_triton_path

EPS, ALPHA = 0.1, 0.02


class FakeCUDA:
    """graphs' two CUDA functions on the CPU: the warm-up runs the step, a capture returns a
    graph whose replay runs it (and may be told to fail)."""

    def __init__(self, fail=None):
        self.captures = 0
        self.fail = fail
        self.quiet = []  # CallCounters: a real replay runs no Python, so they must not count it

    def replay(self, step):
        marks = [c.mark() for c in self.quiet]
        step()
        for c, (f, b) in zip(self.quiet, marks):
            c.forwards, c.backwards = f, b

    def install(self, mp):
        mp.setattr(graphs, "_warm_up", lambda step: step())
        mp.setattr(graphs, "_capture", self.capture)
        mp.setattr(graphs, "cache", graphs.StepCache())

    def capture(self, step):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        return type("Graph", (), {"replay": staticmethod(lambda: self.replay(step))})()


@pytest.fixture
def fake(monkeypatch):
    cuda = FakeCUDA()
    cuda.install(monkeypatch)
    recorder = Recorder()
    with on_triton_path(recorder):
        yield cuda


@pytest.fixture
def setup(trained_models, digits):
    _, (x, y) = digits
    return trained_models["cnn"], x[:16].clone(), y[:16].clone()


def eager(model, x, y, seed=0, **kw):
    torch.manual_seed(seed)
    return fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, backend="torch", **kw)(x, y)


def graphed(atk, x, y, seed=0):
    torch.manual_seed(seed)
    return atk(x, y)


def test_one_capture_replayed_across_calls_equals_eager(fake, setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    x0, y0 = x.clone(), y.clone()
    first = graphed(atk, x, y, seed=0)
    second = graphed(atk, x.flip(0), y.flip(0), seed=1)  # new images and labels in the same buffers
    third = graphed(fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True), x, y, seed=2)
    assert fake.captures == 1, "a second call of the same shape and settings captured again"
    assert torch.equal(first, eager(model, x, y, seed=0))
    assert torch.equal(second, eager(model, x.flip(0), y.flip(0), seed=1))
    assert torch.equal(third, eager(model, x, y, seed=2))  # another attack object, the same model: shared
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert first.data_ptr() != second.data_ptr(), "the result aliases the graph's static buffer"


def test_what_a_capture_bakes_in_is_in_the_key(fake, setup):
    model, x, y = setup
    graphed(fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True), x, y)
    graphed(fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=7, cuda_graph=True), x, y)  # steps: not baked in
    assert fake.captures == 1
    for atk, xs, ys in [
        (fastadv.PGD(model, eps=2 * EPS, alpha=ALPHA, steps=4, cuda_graph=True), x, y),  # a scalar budget
        (fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True), x[:8], y[:8]),  # the shape
        (fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True, channels_last=True), x, y),
    ]:
        before = fake.captures
        out = graphed(atk, xs, ys)
        assert fake.captures == before + 1
        torch.manual_seed(0)
        assert torch.equal(out, type(atk)(model, **{k: getattr(atk, k) for k in ("eps", "alpha", "steps")},
                                          backend="torch", channels_last=atk.engine.channels_last)(xs, ys))


def test_global_numerics_settings_are_in_the_key(fake, setup):
    """A replay keeps the kernels its capture chose: cuDNN determinism or TF32 switched
    after a capture means another graph."""
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    graphed(atk, x, y)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        graphed(atk, x, y)
    assert fake.captures == 2
    graphed(atk, x, y)  # the settings back as they were: the first graph again
    assert fake.captures == 2


def test_targeted_mode_is_in_the_key(fake, setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    graphed(atk, x, y)
    atk.set_mode_targeted_by_label(quiet=True)
    target = (y + 1) % 10
    out = graphed(atk, x, target)
    assert fake.captures == 2
    ref = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, backend="torch")
    ref.set_mode_targeted_by_label(quiet=True)
    torch.manual_seed(0)
    assert torch.equal(out, ref(x, target))


def test_replaced_parameters_are_captured_again_never_replayed_stale(fake, setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    graphed(atk, x, y)
    with torch.no_grad():  # in place, as an optimizer steps: the graph reads the new values
        for p in model.parameters():
            p.mul_(1.01)
    out = graphed(atk, x, y)
    assert fake.captures == 1
    assert torch.equal(out, eager(model, x, y))
    first = next(model.parameters())
    first.data = first.data.clone()  # new storage: a graph would read the old one
    out = graphed(atk, x, y)
    assert fake.captures == 2
    assert torch.equal(out, eager(model, x, y))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    graphed(atk, x, y)
    assert fake.captures == 3


def test_attack_mode_is_in_the_state(fake, setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    graphed(atk, x, y)
    atk.set_model_training_mode(model_training=True)  # dropout/BN stay in eval, the modules' flags change
    graphed(atk, x, y)
    assert fake.captures == 2
    atk.set_model_training_mode(model_training=False)
    graphed(atk, x, y)
    assert fake.captures == 3  # back to eval: the train-mode capture is dropped, eval captured anew
    model.train()  # the caller's mode: the attack still runs in eval, on the same graph
    out = graphed(atk, x, y)
    assert fake.captures == 3 and model.training
    assert torch.equal(out, eager(model, x, y))


def test_model_state_and_keys_as_plain_functions():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    state = graphs.model_state(net)
    with torch.no_grad():
        net[0].weight.add_(1)  # values are not state
    assert graphs.model_state(net) == state
    net[0].weight.requires_grad_(False)
    assert graphs.model_state(net) != state
    net[0].weight.requires_grad_(True)
    net[1].eval()
    assert graphs.model_state(net) != state
    net[1].train()
    net[1].running_mean = torch.zeros(3)  # a replaced buffer
    assert graphs.model_state(net) != state
    assert graphs.model_state(lambda t: t) == ()

    a, b = torch.zeros(2, 3), torch.zeros(2, 3).t().contiguous().t()
    assert graphs.tensor_key(a) != graphs.tensor_key(b)  # layout
    assert graphs.tensor_key(a) != graphs.tensor_key(a.double())
    assert graphs.value_key((1, 0.5, "x", None)) == (1, 0.5, "x", None)
    with pytest.raises(graphs.Uncacheable):
        graphs.value_key(object())

    def make(alpha):
        def step(t):
            return t * alpha
        return step

    assert graphs.function_key(make(0.5)) == graphs.function_key(make(0.5))
    assert graphs.function_key(make(0.5)) != graphs.function_key(make(0.25))
    atk = fastadv.PGD(net)
    assert graphs.owner_of(atk.get_logits) is net  # the module, never the throwaway bound method
    assert graphs.owner_of(net) is net


def test_step_cache_evicts_and_drops_stale_entries():
    cache = graphs.StepCache(max_per_owner=2)
    owner = nn.Linear(2, 2)
    entries = {k: graphs.Replayable(None, {}, state=("s",)) for k in "abc"}
    for k in "abc":
        cache.put(owner, k, entries[k])
    assert cache.get(owner, "a", ("s",)) is None  # least recently used, evicted
    assert cache.get(owner, "b", ("s",)) is entries["b"]
    assert cache.get(owner, "c", ("t",)) is None  # the state changed: dropped
    assert cache.get(owner, "c", ("s",)) is None
    del owner
    import gc

    gc.collect()
    assert len(cache._by_owner) == 0  # held weakly


def test_calls_are_counted_through_replays_with_the_class_api(fake, setup):
    model, x, y = setup
    counted = CallCounter(model)
    fake.quiet.append(counted)
    for _ in range(3):
        graphed(fastadv.PGD(counted, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True), x, y)
    assert fake.captures == 1
    assert counted.per_sample(x.shape[0]) == (12.0, 12.0)


def test_bad_labels_on_a_replay_get_their_error(fake, setup):
    model, x, y = setup
    atk = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True)
    graphed(atk, x, y)
    bad = y.clone()
    bad[2] = 12
    with pytest.raises(ValueError, match="labels must lie in \\[0, 9\\]"):
        graphed(atk, x, bad)
    assert torch.equal(graphed(atk, x, y), eager(model, x, y))  # the buffers hold nothing of the bad call


def test_a_failed_capture_runs_eagerly_and_marks_the_model_unless_memory_ran_out(monkeypatch, setup):
    model, x, y = setup
    with on_triton_path(Recorder()):
        for error, marked in ((torch.OutOfMemoryError("CUDA out of memory"), False), (RuntimeError("no"), True)):
            fake = FakeCUDA(fail=error)
            fake.install(monkeypatch)
            monkeypatch.setattr(graphs, "_uncapturable", type(graphs._uncapturable)())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = graphed(fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True), x, y)
            assert [str(w.message) for w in caught if "eagerly" in str(w.message)], caught
            assert torch.equal(out, eager(model, x, y))
            assert graphs.capturable(model) is not marked


def test_slots_say_that_they_run_without_the_graph(fake, setup):
    """batch_size below the batch runs on fixed-shape slots, whose steps are not captured: a
    warning says so, and the result is the slots' eager one."""
    model, x, y = setup
    with pytest.warns(UserWarning, match="cuda_graph is not used on fixed-shape slots"):
        out = graphed(fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=4, cuda_graph=True, batch_size=5), x, y)
    assert fake.captures == 0
    assert torch.equal(out, eager(model, x, y, batch_size=5))
