"""No host synchronisation per iteration on the path CUDA runs, counted on the CPU.

Each attack runs with backend='triton' on CPU tensors, its kernel launchers swapped
for their PyTorch twins (``host_syncs.on_triton_path``), so the loop code is the
CUDA path's line for line. The ops that would make the host wait for the device are
counted at two step counts: an iterative attack's count must not grow with the steps.
What a call costs once (edge validation, the cascades' robust-point gathers) is pinned
to the numbers below, so a new sync shows up as a failing test. On the CPU every call adds
one that CUDA does not make: finite_or_clean's finiteness test of the result.
"""
import contextlib
import types
import warnings

import pytest
import torch

import fastadv
from fastadv import validation
from host_syncs import Recorder, on_triton_path

LINF, L2 = 0.2, 1.0
# APGDT gathers the robust points once per target class: budgets small enough that some stay
# robust at both step counts keep the number of targets run the same.
LINF_SMALL, L2_SMALL = 0.02, 0.1


@pytest.fixture
def setup(trained_models, digits):
    _, (x, y) = digits
    return trained_models["cnn"], x[:12].clone(), y[:12].clone()


def syncs_of(call):
    recorder = Recorder()
    with on_triton_path(recorder), recorder:
        call()
    return recorder.syncs


# The attacks that CUDA runs as a captured graph run their eager loop here (the graph's
# fallback); the captured step itself is checked in test_captured_step_makes_no_sync_and_no_allocation.
ITERATIVE = {
    "PGD": lambda m, s: fastadv.PGD(m, eps=LINF, alpha=0.05, steps=s, cuda_graph=False),
    "PGDL2": lambda m, s: fastadv.PGDL2(m, eps=L2, alpha=0.2, steps=s, cuda_graph=False),
    "MIFGSM": lambda m, s: fastadv.MIFGSM(m, eps=LINF, alpha=0.05, steps=s, cuda_graph=False),
    "TPGD": lambda m, s: fastadv.TPGD(m, eps=LINF, alpha=0.05, steps=s, cuda_graph=False),
    "EOTPGD": lambda m, s: fastadv.EOTPGD(m, eps=LINF, alpha=0.05, steps=s, cuda_graph=False, eot_iter=2),
    "RFGSM": lambda m, s: fastadv.RFGSM(m, eps=LINF, alpha=0.05, steps=s, cuda_graph=False),
    "APGD-Linf-ce": lambda m, s: fastadv.APGD(m, norm="Linf", eps=LINF, steps=s, loss="ce"),
    "APGD-Linf-dlr": lambda m, s: fastadv.APGD(m, norm="Linf", eps=LINF, steps=s, loss="dlr"),
    "APGD-L2-ce": lambda m, s: fastadv.APGD(m, norm="L2", eps=L2, steps=s, loss="ce"),
    "APGD-L2-dlr": lambda m, s: fastadv.APGD(m, norm="L2", eps=L2, steps=s, loss="dlr"),
    "APGDT-Linf": lambda m, s: fastadv.APGDT(m, norm="Linf", eps=LINF_SMALL, steps=s, n_classes=3),
    "APGDT-L2": lambda m, s: fastadv.APGDT(m, norm="L2", eps=L2_SMALL, steps=s, n_classes=3),
    "FAB-Linf": lambda m, s: fastadv.FAB(m, norm="Linf", eps=LINF, steps=s, n_classes=3),
    "FAB-L2": lambda m, s: fastadv.FAB(m, norm="L2", eps=L2, steps=s, n_classes=3),
    "FAB-Linf-targeted": lambda m, s: fastadv.FAB(m, norm="Linf", eps=LINF, steps=s, n_classes=3, multi_targeted=True),
}


@pytest.mark.parametrize("name", ITERATIVE)
def test_no_sync_per_iteration(setup, name):
    model, x, y = setup
    few, many = (syncs_of(lambda s=s: ITERATIVE[name](model, s)(x, y)) for s in (2, 7))
    assert len(many) == len(few), f"{name}: {len(few)} syncs at 2 steps, {len(many)} at 7: {many}"


# The per-call syncs of the cascades, with every attack at 2 and at 5 steps: the edge checks
# (images, then labels at each attack's first forward), the points still robust gathered
# before each sub-attack (nonzero / boolean index), the clean-accuracy count, and the CPU's
# finiteness test of the result.
CASCADE_SYNCS = {"MultiAttack": 11, "AutoAttack": 10}
CASCADES = {
    # a budget that leaves points robust after PGD at both step counts, so that APGD runs in both
    "MultiAttack": lambda m, s: fastadv.MultiAttack([fastadv.PGD(m, eps=0.05, alpha=0.05, steps=s, cuda_graph=False),
                                                     fastadv.APGD(m, eps=0.05, steps=s)]),
    "AutoAttack": lambda m, s: fastadv.AutoAttack(m, eps=LINF, n_classes=10, steps=s, n_queries=s),
}


@pytest.mark.parametrize("name", CASCADES)
def test_cascades_sync_once_per_call(setup, name):
    model, x, y = setup
    few, many = (syncs_of(lambda s=s: CASCADES[name](model, s)(x, y)) for s in (2, 5))
    assert few == many, f"{name}: {len(few)} syncs at 2 steps, {len(many)} at 5"
    assert len(few) == CASCADE_SYNCS[name], f"{name}: {len(few)} syncs per call: {few}"


def test_edge_validation_syncs_once_per_check(setup):
    model, x, y = setup
    assert syncs_of(lambda: validation.check_images(x)) == ["Tensor.tolist"]  # range and finiteness: one read
    assert syncs_of(lambda: validation.check_labels(y, x.shape[0])) == []
    logits = model(x)
    assert syncs_of(lambda: validation.check_logits(logits, y)) == ["Tensor.tolist"]  # the label range
    # a whole PGD call: those two, and the CPU-only finiteness test of the result
    assert len(syncs_of(lambda: fastadv.PGD(model, steps=2, cuda_graph=False)(x, y))) == 3


def test_recorder_counts_device_syncs_and_not_host_scalars():
    """The counter itself: device reads count, Python-number scalars do not."""
    x = torch.rand(5)
    cases = {
        lambda: x.sum().item(): 1, lambda: bool((x > 0.5).any()): 1, lambda: x[x > 0.5]: 1,
        lambda: x.nonzero(): 1, lambda: x.tolist(): 1, lambda: x.cpu(): 1, lambda: x.to("cpu"): 1, lambda: torch.equal(x, x): 1,
        lambda: float(torch.tensor(0.3, dtype=torch.float32)): 0, lambda: torch.rand(3).sum().item(): 0,
        lambda: torch.where(x > 0.5, x, 0.0): 0, lambda: x[torch.tensor([0, 2])]: 0,
    }
    for call, expected in cases.items():
        recorder = Recorder()
        with recorder:
            call()
        assert len(recorder.syncs) == expected, recorder.syncs


# -- CUDA-graph readiness ----------------------------------------------------------------------


class _CapturedOnCPU:
    """Stands in for torch.cuda's stream and graph API on the CPU: the captured block runs
    once under the recorder, and what it did is kept. On CUDA, capture records the step
    without running it and the warm-up step runs before it; here capture runs it, so after
    2 steps (warm-up + capture, no replay) the result is the real 2-step iterate."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.captures = []

    def install(self, mp):
        cuda = torch.cuda
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        mp.setattr(cuda, "Stream", stream)
        mp.setattr(cuda, "current_stream", lambda *a: stream())
        mp.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
        mp.setattr(cuda, "synchronize", lambda *a: None)
        mp.setattr(cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
        mp.setattr(cuda, "graph", self.graph)

    @contextlib.contextmanager
    def graph(self, graph):
        self.recorder.reset()
        yield
        self.captures.append((list(self.recorder.syncs), list(self.recorder.allocs)))


# cuda_graph is opt-in (each call captures its own graph); these attacks take it when asked.
GRAPHED = {
    "PGD": lambda m, b: fastadv.PGD(m, eps=LINF, alpha=0.05, steps=2, backend=b, cuda_graph=True),
    "PGDL2": lambda m, b: fastadv.PGDL2(m, eps=L2, alpha=0.2, steps=2, backend=b, cuda_graph=True),
    "MIFGSM": lambda m, b: fastadv.MIFGSM(m, eps=LINF, alpha=0.05, steps=2, backend=b, cuda_graph=True),
    "TPGD": lambda m, b: fastadv.TPGD(m, eps=LINF, alpha=0.05, steps=2, backend=b, cuda_graph=True),
    "EOTPGD": lambda m, b: fastadv.EOTPGD(m, eps=LINF, alpha=0.05, steps=2, eot_iter=2, backend=b, cuda_graph=True),
    "RFGSM": lambda m, b: fastadv.RFGSM(m, eps=LINF, alpha=0.05, steps=2, backend=b, cuda_graph=True),
}


class _Uncounted(torch.nn.Module):
    """The model, its own ops not counted: what it allocates (BatchNorm's saved statistics) is
    the model's, and lands in the graph's memory pool at capture like every activation."""

    def __init__(self, model, recorder):
        super().__init__()
        self.model, self.recorder = model, recorder

    def forward(self, x):
        with self.recorder.paused():
            return self.model(x)


# The factory ops left in a captured step: the seed of each backward (torch.autograd.grad's
# ones_like of the loss) and EOTPGD's gradient sum (zeros_like). Captured, they are fill kernels
# into the graph's memory pool: a replay allocates nothing (an eager step allocates them).
CAPTURED_FILLS = {"EOTPGD": ["aten.zeros_like.default", "aten.ones_like.default", "aten.ones_like.default"]}


@pytest.mark.parametrize("name", GRAPHED)
def test_captured_step_makes_no_sync_and_no_allocation(setup, name):
    model, x, y = setup
    recorder = Recorder()
    model = _Uncounted(model, recorder)
    capture = _CapturedOnCPU(recorder)
    torch.manual_seed(1)
    eager = GRAPHED[name](model, "torch")(x, y)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture falls back with a warning
        capture.install(mp)
        with on_triton_path(recorder), recorder:
            torch.manual_seed(1)
            graphed = GRAPHED[name](model, "triton")(x, y)
    assert len(capture.captures) == 1, f"{name} did not take the CUDA-graph path"
    syncs, allocs = capture.captures[0]
    assert syncs == [], f"{name}: the captured step syncs: {syncs}"
    assert allocs == CAPTURED_FILLS.get(name, ["aten.ones_like.default"]), f"{name}: the captured step allocates {allocs}"
    assert torch.equal(graphed, eager), f"{name}: the in-place graphed step differs from the eager loop"
