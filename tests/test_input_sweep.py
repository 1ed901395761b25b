"""Every name of torchattacks.__all__ on the inputs users bring, against the real torchattacks 3.5.1.

The model is a trained digits model behind Pooled (a channel mean and an adaptive pool to
8x8), so it takes any image size and channel count. The inputs (KINDS): non-square 3x12x16
images, tiny 3x3x5 images, one channel, batch 1, channels_last images, a ``torch.compile``d
model (Inductor, CPU), an ``nn.DataParallel`` model, and an fp16 model with fp16 images.
Each name runs with its defaults at small budgets (tests/test_reference_shape.py's), the same
seeds for torch, numpy and random, once with torchattacks and once with fastadv; AutoAttack's
reference is the original (pyautoattack 0.2.0). Every (name, kind) must end one of four ways:

- both run: fastadv's output equals the reference's (``torch.equal``; DeepFool within the bound
  its docstring states), in the same dtype and memory format. Where the reference returns
  non-finite values for a sample (NAN_IN_REFERENCE), fastadv returns a finite one instead (the
  "never NaN" guarantee) and the other samples are equal;
- the reference fails and fastadv runs: listed in BETTER with its reason, each documented in
  docs/attacks.md ("Inputs the reference refuses"); the output is a valid attack output;
- both fail: fastadv raises a ValueError or TypeError that says why (never the model's own
  RuntimeError from deep inside);
- the reference runs and fastadv fails: never.

The lists are exact both ways: a listed case that starts behaving otherwise fails too.

The compiled model: one ``torch.compile(Pooled(MLP))`` shared by the sweep (recompiles kept
below a raised limit, so no call falls back to eager). Its cost on a 2-core CPU with an empty
Inductor cache: 72 s for the 39 names and the test after them (Inductor compiles a graph for
each grad mode, parameters' requires_grad and batch-size range the attacks use); marked slow. Donated buffers are switched off for the sweep:
with them, whether a retained-graph backward (DeepFool, JSMA, FAB in both libraries) is refused
depends on which backward first ran on each compiled graph, i.e. on test order; fastadv's answer
to that refusal (rerun the forward per gradient) is tested on its own below.
"""
import contextlib
import copy
import io
import pathlib
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks as real_torchattacks
from torch.utils.data import DataLoader, TensorDataset

import fastadv
from fastadv.models import MLP, train_plain
from fastadv.retained import SharedForward
from helpers import assert_equal
from test_autoattack import run_original
from test_reference_shape import SMALL, assert_matches
from test_zoo_sign_a import Pooled

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "attacks.md"
KINDS = ["non-square", "tiny", "one-channel", "batch-1", "channels-last", "compiled", "data-parallel", "fp16"]
BUDGETS = dict(SMALL, Square=dict(n_queries=100))

# (name, kind): why the reference fails where fastadv runs.
CHANNELS_LAST_VIEW = "the reference's .view() fails on channels_last tensors"
FP32_PROMOTION = "the reference turns fp16 iterates into fp32, which the fp16 model refuses"
FP32_KERNEL = "the reference's fp32 smoothing kernel fails on fp16 gradients"
BETTER = {
    ("Pixle", "non-square"): "the reference indexes non-square images out of range",
    ("Pixle", "tiny"): "the reference indexes non-square images out of range",
    ("TIFGSM", "one-channel"): "the reference's smoothing needs 3 channels",
    ("PIFGSM", "one-channel"): "the reference's projection kernel needs 3 channels",
    ("PIFGSMPP", "one-channel"): "the reference's projection kernel needs 3 channels",
    ("JSMA", "channels-last"): CHANNELS_LAST_VIEW,
    ("PGDL2", "channels-last"): CHANNELS_LAST_VIEW,
    ("SparseFool", "channels-last"): CHANNELS_LAST_VIEW,
    ("FAB", "channels-last"): CHANNELS_LAST_VIEW,
    ("AutoAttack", "channels-last"): CHANNELS_LAST_VIEW,
    ("BIM", "fp16"): FP32_PROMOTION,
    ("LGV", "fp16"): "its default attack, BIM: " + FP32_PROMOTION,
    ("APGD", "fp16"): FP32_PROMOTION,
    ("APGDT", "fp16"): FP32_PROMOTION,
    ("EADL1", "fp16"): FP32_PROMOTION,
    ("EADEN", "fp16"): FP32_PROMOTION,
    ("TIFGSM", "fp16"): FP32_KERNEL,
    ("PIFGSM", "fp16"): FP32_KERNEL,
    ("PIFGSMPP", "fp16"): FP32_KERNEL,
}
# Where the reference returns NaN for some samples (fp16 underflow or overflow in its arithmetic).
NAN_IN_REFERENCE = {("SPSA", "fp16"), ("CW", "fp16"), ("PGDL2", "fp16")}
# Their outputs may leave [0, 1], as the reference's do (its bug, kept: see their docstrings).
LEAVE_RANGE = {"EADL1", "EADEN"}
# Where the output dtype differs: torchattacks' CW returns float32 for fp16 images.
OTHER_DTYPE = {("CW", "fp16")}


def images(x, y, n, channels, size):
    return F.interpolate(x[:n], size=size, mode="bilinear", align_corners=False).clamp(0, 1).repeat(
        1, channels, 1, 1), y[:n]


@pytest.fixture(scope="module")
def compiled_mlp(digits):
    (x, y), _ = digits
    return torch.compile(Pooled(train_plain(MLP(), x, y, epochs=15, seed=1)).eval(), dynamic=True)


def make_case(kind, trained_models, digits, compiled):
    """(model, images, labels, loader) for one kind of input."""
    (xtr, ytr), (x, y) = digits
    net = Pooled(trained_models["cnn"]).eval()
    dtype = torch.float16 if kind == "fp16" else torch.float32
    loader = DataLoader(TensorDataset(xtr[:256].to(dtype), ytr[:256]), batch_size=64, shuffle=True)
    shape = {"non-square": (4, 3, (12, 16)), "tiny": (4, 3, (3, 5)), "one-channel": (4, 1, (12, 12)),
             "batch-1": (1, 3, (8, 8))}.get(kind, (4, 3, (8, 8)))
    xs, ys = images(x, y, *shape)
    if kind == "channels-last":
        xs = xs.contiguous(memory_format=torch.channels_last)
    if kind == "compiled":
        net = compiled
    if kind == "data-parallel":
        net = nn.DataParallel(net)
    if kind == "fp16":
        net, xs = net.half(), xs.half()
    return net, xs, ys, loader


def build(lib, name, model, loader):
    if name == "MultiAttack":
        return lib.MultiAttack([lib.FGSM(model), lib.PGD(model, steps=2)])
    args = (loader,) if name == "LGV" else ()
    return getattr(lib, name)(model, *args, **BUDGETS[name])


def attempt(run):
    """The output of run(), or the exception it raised."""
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # LGV, MultiAttack and pyautoattack print
            return run()
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return exc


@contextlib.contextmanager
def compile_settings(kind):
    if kind != "compiled":
        yield
        return
    import torch._dynamo
    import torch._functorch.config as functorch_config

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}), functorch_config.patch(donated_buffer=False):
        yield


def params(kind):
    marks = [pytest.mark.slow, pytest.mark.xdist_group("compiled")] if kind == "compiled" else []
    return [pytest.param(name, kind, marks=marks, id=f"{kind}-{name}") for name in real_torchattacks.__all__]


def assert_valid(adv, x, what, in_range=True):
    assert adv.shape == x.shape and adv.dtype == x.dtype, f"{what}: {adv.shape} {adv.dtype}"
    assert torch.isfinite(adv).all(), f"{what}: not finite"
    assert not in_range or (adv.min() >= 0 and adv.max() <= 1), f"{what}: outside [0, 1]"


def compare(name, kind, model, actual, expected, x, y):
    what = f"{name} on {kind}"
    if (name, kind) in OTHER_DTYPE:
        assert actual.dtype == x.dtype and expected.dtype == torch.float32, what
        assert torch.equal(expected.to(actual.dtype).float().nan_to_num(), expected.nan_to_num()), what
        expected = expected.to(actual.dtype)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != reference's {expected.dtype}"
    if x.dim() == 4:
        layout = [t.is_contiguous(memory_format=torch.channels_last) for t in (actual, expected)]
        assert layout[0] == layout[1], f"{what}: channels_last {layout[0]} != reference's {layout[1]}"
    bad = ~torch.isfinite(expected).flatten(1).all(1)
    assert bool(bad.any()) == ((name, kind) in NAN_IN_REFERENCE), f"{what}: NaN in the reference's output: {bad}"
    if bad.any():
        assert_valid(actual[bad], x[bad], f"{what}, where the reference returns NaN")
        actual, expected, x, y = actual[~bad], expected[~bad], x[~bad], y[~bad]
    assert_matches(name, model, actual, expected, x, y, what)


@pytest.mark.parametrize("name,kind", [p for kind in KINDS for p in params(kind)])
def test_input_sweep(name, kind, trained_models, digits, request, monkeypatch):
    assert name in fastadv.__all__ and name in BUDGETS, f"{name}: in torchattacks.__all__, not covered here"
    compiled_model = request.getfixturevalue("compiled_mlp") if kind == "compiled" else None
    model, x, y, loader = make_case(kind, trained_models, digits, compiled_model)
    with compile_settings(kind):
        if name == "AutoAttack":
            expected = attempt(lambda: run_original(copy.deepcopy(model), x, y, monkeypatch, norm="Linf", eps=8 / 255,
                                                    steps=2, n_queries=20)[0])
            atk = fastadv.AutoAttack(copy.deepcopy(model), steps=2, n_queries=20)
            actual = attempt(lambda: atk(x, y))
        else:
            expected = attempt(lambda: build(real_torchattacks, name, copy.deepcopy(model), loader)(x, y))
            actual = attempt(lambda: build(fastadv, name, copy.deepcopy(model), loader)(x, y))

    what = f"{name} on {kind}"
    if isinstance(actual, Exception):
        assert isinstance(expected, Exception), f"{what}: the reference runs, fastadv raised {actual!r}"
        assert isinstance(actual, (ValueError, TypeError)), f"{what}: both fail, fastadv not clearly: {actual!r}"
        assert (name, kind) not in BETTER, f"{what}: listed as working in fastadv"
    elif isinstance(expected, Exception):
        assert (name, kind) in BETTER, f"{what}: the reference raised {expected!r}, fastadv runs: list and document it"
        assert_valid(actual, x, what, in_range=name not in LEAVE_RANGE)
    else:
        assert (name, kind) not in BETTER, f"{what}: listed as a reference failure, but the reference runs"
        compare(name, kind, model, actual, expected, x, y)


def test_better_answers_are_documented():
    """Each case where fastadv runs and the reference fails is in docs/attacks.md's table."""
    text = DOCS.read_text()
    section = text.split("## Inputs the reference refuses", 1)[1].split("\n## ", 1)[0]
    rows = {tuple(cell.strip(" `") for cell in line.strip("|").split("|")[:2])
            for line in section.splitlines() if line.startswith("|")}
    missing = [case for case in BETTER if case not in rows]
    assert not missing, f"not documented in {DOCS.name}: {missing}"


# -- a compiled model that refuses a retained graph ---------------------------------------------


class _DonatedLike(torch.autograd.Function):
    """Identity whose backward refuses a retained graph, as a compiled model with donated buffers."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if torch._C._autograd._get_current_graph_task_keep_graph():
            raise RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                               "create_graph=False and retain_graph=False.")
        return g


class Refusing(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_DonatedLike.apply(x))


@pytest.mark.parametrize("name", ["DeepFool", "JSMA", "FAB", "SparseFool"])
def test_refused_retained_graph_reruns_the_forward(name, trained_models, batch):
    """The references crash; fastadv reruns the forward per gradient: the same output as on the model."""
    model, (x, y) = trained_models["cnn"], (batch[0][:6], batch[1][:6])
    kwargs = {"JSMA": {}, "SparseFool": dict(steps=1)}.get(name, dict(steps=3))
    with pytest.raises(RuntimeError, match="donated buffers"):
        getattr(real_torchattacks, name)(Refusing(model), **kwargs)(x, y)
    torch.manual_seed(0)
    actual = getattr(fastadv, name)(Refusing(model), **kwargs)(x, y)
    torch.manual_seed(0)
    assert_equal(actual, getattr(fastadv, name)(model, **kwargs)(x, y), name)


def test_other_errors_in_a_retained_backward_propagate():
    x = torch.rand(3, requires_grad=True)
    shared = SharedForward(lambda t: t * 2, x)
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        shared.grad(lambda z: z)


@pytest.mark.slow
@pytest.mark.xdist_group("compiled")
def test_compiled_model_with_donated_buffers(digits):
    """A real torch.compile'd model whose backward was first compiled for a single use: DeepFool's
    retained graph is refused, fastadv reruns the forward and returns what the eager model gives."""
    (x, y), (xt, yt) = digits
    mlp = train_plain(MLP(), x, y, epochs=15, seed=1).requires_grad_(False)

    class OwnGraph(nn.Module):  # its own code object: graphs not shared with the sweep's
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, z):
            return self.mlp(z)

    compiled = torch.compile(OwnGraph().eval())
    xg = xt[:8].clone().requires_grad_(True)
    torch.autograd.grad(compiled(xg).sum(), xg)  # the first backward, single use: buffers donated
    with pytest.raises(RuntimeError, match="donated buffers"):
        out = compiled(xg)
        torch.autograd.grad(out[:, 0].sum(), xg, retain_graph=True)
    assert_equal(fastadv.DeepFool(compiled)(xt[:8], yt[:8]), fastadv.DeepFool(mlp)(xt[:8], yt[:8]), "DeepFool")
