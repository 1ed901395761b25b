"""CW, DeepFool and Square against torchattacks 3.5.1 (and Square against pyautoattack 0.2.0).

Two real architectures trained on digits in the test session (a CNN with BatchNorm
in eval mode and an MLP), fp32, CPU.
- CW: bit-exact with torchattacks in every mode (targeted, normalization, training mode).
- Square: bit-exact with torchattacks (Linf and L2, margin and ce, restarts,
  targeted) and, with arithmetic='original', with pyautoattack's SquareAttack.
- DeepFool: batched, so not bit-exact; the bound asserted here is the one its
  docstring states.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torchattacks
from pyautoattack.square import SquareAttack

import fastadv
from fastadv import functional as F
from fastadv.attacks import square as square_mod
from fastadv.attacks.cw import cw_margin
from fastadv.models import SmallCNN
from helpers import assert_equal


@pytest.fixture(autouse=True)
def _one_thread():
    """The digits models are tiny: one thread avoids oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_copy(model):
    """torchattacks' CW and DeepFool fill the parameters' .grad: give them their own copy."""
    return copy.deepcopy(model)


def misclassified(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(1) != y


def label_gap(model, adv, y):
    """z_y - max_{k != y} z_k, each image on its own (as DeepFool decides)."""
    with torch.no_grad():
        z = torch.cat([model(adv[i:i + 1]) for i in range(adv.shape[0])])
    return z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).amax(1)


# -- CW --------------------------------------------------------------------------------------------

CW_CONFIGS = [
    {"steps": 20},
    {"steps": 20, "c": 5, "kappa": 0.5, "lr": 0.05},
    {"steps": 12, "c": 0.5, "lr": 0.1},
]


@pytest.mark.parametrize("kwargs", CW_CONFIGS)
def test_cw_matches_torchattacks(kwargs, model, batch):
    x, y = batch
    expected = torchattacks.CW(reference_copy(model), **kwargs)(x, y)
    actual = fastadv.CW(model, **kwargs)(x, y)
    assert_equal(actual, expected, f"CW{kwargs}")
    assert misclassified(model, actual, y).any(), "the attack fooled nothing"
    assert_equal(F.cw(model, x, y, **kwargs), actual, "plain function vs class")


def test_cw_targeted_by_function_matches(trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    ref = torchattacks.CW(reference_copy(model), steps=15, c=3)
    ours = fastadv.CW(model, steps=15, c=3)
    for atk in (ref, ours):
        atk.set_mode_targeted_by_function(lambda im, lb: (lb + 1) % 10, quiet=True)
    assert_equal(ours(x, y), ref(x, y))


def test_cw_margin_reference_and_correct():
    logits = torch.tensor([[-1.0, -3.0, -2.0], [4.0, 1.0, 2.0]])
    labels = torch.tensor([0, 0])
    # Reference (#184): with negative logits the zeros of the one-hot products win the max.
    assert torch.equal(cw_margin(logits, labels, kappa=10), torch.tensor([0.0, 2.0]))
    assert torch.equal(cw_margin(logits, labels, kappa=10, margin="correct"), torch.tensor([1.0, 2.0]))
    assert torch.equal(cw_margin(logits, labels, kappa=0.5, margin="correct", targeted=True), torch.tensor([-0.5, -0.5]))


def test_cw_correct_margin_runs(model, batch):
    x, y = batch
    adv = fastadv.CW(model, steps=15, c=5, margin="correct")(x, y)
    assert adv.min() >= 0 and adv.max() <= 1
    assert misclassified(model, adv, y).any()
    # Where the attack failed the clean image comes back.
    failed = ~misclassified(model, adv, y) & (model(x).argmax(1) == y)
    assert torch.equal(adv[failed], x[failed])



class NaNBeyond(nn.Module):
    """model's logits, NaN (and NaN gradients) for a sample farther than r (L2) from x0."""

    def __init__(self, model, x0, r):
        super().__init__()
        self.model, self.x0, self.r = model, x0, r

    def forward(self, x):
        room = self.r - (x - self.x0).flatten(1).norm(dim=1)
        return self.model(x) + 0 * torch.sqrt(room)[:, None]  # sqrt(< 0): NaN, its gradient too


def test_cw_nan_model_output_gives_the_clean_image(trained_models, batch):
    """Where the model's output (and gradient) turns NaN the reference's best iterate becomes
    NaN for good; fastadv returns the clean image there and the reference's bits elsewhere."""
    x, y = batch
    model = trained_models["cnn"]
    kwargs = dict(steps=20, c=5, lr=0.05)
    free = fastadv.CW(model, **kwargs)(x, y)
    r = (free - x).flatten(1).norm(dim=1).median().item() / 2  # about half the samples cross it
    wrapped = NaNBeyond(model, x, r)
    expected = torchattacks.CW(reference_copy(wrapped), **kwargs)(x, y)
    actual = fastadv.CW(wrapped, **kwargs)(x, y)
    lost = expected.flatten(1).isnan().any(1)
    assert lost.any() and not lost.all(), "the reference should lose some samples to NaN, not all"
    assert_equal(actual, torch.where(lost.view(-1, 1, 1, 1), x, expected))

# -- DeepFool -----------------------------------------------------------------------------------------

DEEPFOOL_ATOL = 3e-7  # the stated bound: max |ours - torchattacks| measured 2.98e-7 (benchmarks/results/deepfool_bound_cpu.md)
TIE_GAP = 1e-4  # success may differ only where an output sits on the decision boundary


@pytest.mark.parametrize("kwargs", [{"steps": 10}, {"steps": 3, "overshoot": 0.1}])
def test_deepfool_close_to_torchattacks(kwargs, model, digits):
    _, (xt, yt) = digits
    x, y = xt[:16].clone(), yt[:16].clone()
    ref = torchattacks.DeepFool(reference_copy(model), **kwargs)
    expected, expected_targets = ref.forward_return_target_labels(x, y)
    ours = fastadv.DeepFool(model, **kwargs)
    actual, actual_targets = ours.forward_return_target_labels(x, y)
    diff = (actual - expected).abs().max().item()
    assert diff <= DEEPFOOL_ATOL, f"max abs diff {diff:.3g} > {DEEPFOOL_ATOL}"
    s_ours, s_ref = misclassified(model, actual, y), misclassified(model, expected, y)
    differ = s_ours != s_ref
    # DeepFool on [0, 1]-saturated digits creeps up to the boundary: its outputs sit
    # within ~1e-6 of a tie, where the flags are decided by rounding noise.
    ties = (label_gap(model, actual, y).abs() <= TIE_GAP) & (label_gap(model, expected, y).abs() <= TIE_GAP)
    assert (ties | ~differ).all(), f"success differs away from a tie on {int((differ & ~ties).sum())} images"
    if kwargs.get("overshoot", 0.02) >= 0.1:
        assert torch.equal(s_ours, s_ref), "with a clear overshoot the success flags must agree"
    assert torch.equal(actual_targets[~differ], expected_targets[~differ])
    assert s_ours.any()
    assert_equal(ours(x, y), actual, "forward vs forward_return_target_labels")
    assert_equal(F.deepfool(model, x, y, **kwargs), actual, "plain function vs class")


def test_deepfool_zero_steps_returns_images(trained_models, batch):
    x, y = batch
    assert_equal(fastadv.DeepFool(trained_models["mlp"], steps=0)(x, y), x)


# -- Square --------------------------------------------------------------------------------------------

SQUARE_CONFIGS = [
    {"eps": 0.1, "n_queries": 100},
    {"eps": 0.1, "n_queries": 60, "loss": "ce", "n_restarts": 2, "p_init": 0.5},
    {"norm": "L2", "eps": 0.8, "n_queries": 80},
    {"norm": "L2", "eps": 0.8, "n_queries": 50, "loss": "ce", "n_restarts": 2, "resc_schedule": False, "seed": 3},
]


@pytest.mark.parametrize("kwargs", SQUARE_CONFIGS)
def test_square_matches_torchattacks(kwargs, model, batch):
    x, y = batch
    expected = torchattacks.Square(model, **kwargs)(x, y)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    actual = fastadv.Square(model, **kwargs)(x, y)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG state changed"
    assert_equal(actual, expected, f"Square{kwargs}")
    assert misclassified(model, actual, y).any()
    assert_equal(F.square(model, x, y, **kwargs), actual, "plain function vs class")


@pytest.mark.parametrize("norm,eps,loss", [("Linf", 0.1, "margin"), ("L2", 0.8, "ce")])
def test_square_targeted_matches_torchattacks(norm, eps, loss, trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    kwargs = {"norm": norm, "eps": eps, "loss": loss, "n_queries": 60}
    ref, ours = torchattacks.Square(model, **kwargs), fastadv.Square(model, **kwargs)
    for atk in (ref, ours):
        atk.set_mode_targeted_by_function(lambda im, lb: (lb + 1) % 10, quiet=True)
    assert_equal(ours(x, y), ref(x, y))


MODES = {
    "targeted_random": lambda a: a.set_mode_targeted_random(quiet=True),
    "least_likely": lambda a: a.set_mode_targeted_least_likely(kth_min=2, quiet=True),
    "by_label": lambda a: a.set_mode_targeted_by_label(quiet=True),
    "normalization": lambda a: a.set_normalization_used([0.3], [0.4]),
    "model_training": lambda a: a.set_model_training_mode(model_training=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kwargs", [("CW", {"steps": 8}), ("Square", {"eps": 0.1, "n_queries": 40}),
                                         ("Square", {"norm": "L2", "eps": 0.8, "n_queries": 30})])
def test_modes_match_torchattacks(name, kwargs, mode, trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    if mode == "normalization":
        x = (x - 0.3) / 0.4
    ref, ours = getattr(torchattacks, name)(reference_copy(model), **kwargs), getattr(fastadv, name)(model, **kwargs)
    MODES[mode](ref)
    MODES[mode](ours)
    torch.manual_seed(5)
    expected = ref(x, y)
    torch.manual_seed(5)
    assert_equal(ours(x, y), expected)


def test_square_perturb_without_labels_matches(trained_models, batch):
    x, _ = batch
    model = trained_models["mlp"]
    kwargs = {"eps": 0.15, "n_queries": 50}
    assert_equal(fastadv.Square(model, **kwargs).perturb(x), torchattacks.Square(model, **kwargs).perturb(x))


@pytest.mark.parametrize("kwargs", [
    {"norm": "Linf", "eps": 0.1, "n_queries": 200},
    {"norm": "L2", "eps": 0.8, "n_queries": 150},
    {"norm": "Linf", "eps": 0.1, "n_queries": 100, "loss": "ce", "n_restarts": 2},
])
def test_square_original_matches_pyautoattack(kwargs, model, batch):
    """AutoAttack's Square (resc_schedule=False there): bit-exact, so the flags agree on 100%."""
    x, y = batch
    expected = SquareAttack(model, p_init=0.8, seed=0, resc_schedule=False, **kwargs).perturb(x, y)
    rng = torch.get_rng_state()
    actual, success = F.square(model, x, y, arithmetic="original", resc_schedule=False, return_success=True, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_equal(actual, expected)
    assert torch.equal(success, misclassified(model, expected, y))
    assert success.any() and not success.all()


class RowLinear(nn.Module):
    """A linear classifier whose logits do not depend on the batch they are computed in."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(10, 64))
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return (x.flatten(1)[:, None, :] * self.weight).sum(-1) + self.bias


@pytest.fixture(scope="module")
def row_linear(digits):
    """RowLinear fitted in closed form (ridge regression on one-hot targets)."""
    (x, y), _ = digits
    a = torch.cat([x.flatten(1), torch.ones(x.shape[0], 1)], 1).double()
    t = nn.functional.one_hot(y, 10).double()
    w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ t).float()
    model = RowLinear().eval()
    with torch.no_grad():
        model.weight.copy_(w[:-1].T)
        model.bias.copy_(w[-1])
    return model


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_square_masked_batches_keep_results_and_draws(eps, row_linear, batch, monkeypatch):
    """compact_every > 1 (the accelerator default) evaluates a superset of the reference's
    batches with masked updates: same results on a batch-invariant model, the generator
    left where the reference leaves it, and one gather per compact_every queries."""
    x, y = batch
    z = row_linear(x)
    assert torch.equal(row_linear(x[5:9]), z[5:9]), "precondition: batch-invariant logits"
    kwargs = {"eps": eps, "n_queries": 96, "n_restarts": 2}
    g1, g16 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with torch.no_grad():
        a1 = square_mod.square_loop(row_linear, x, y, compact_every=1, generator=g1, **kwargs)
        calls = []
        nonzero = torch.Tensor.nonzero
        monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: calls.append(1) or nonzero(self, *a, **k))
        a16 = square_mod.square_loop(row_linear, x, y, compact_every=16, generator=g16, **kwargs)
        monkeypatch.undo()
    assert_equal(a16, a1)
    assert torch.equal(g16.get_state(), g1.get_state()), "generator not where the reference leaves it"
    assert len(calls) <= kwargs["n_restarts"] * (1 + kwargs["n_queries"] // 16), f"{len(calls)} gathers"
    assert_equal(fastadv.Square(row_linear, **kwargs)(x, y), torchattacks.Square(row_linear, **kwargs)(x, y))


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_square_per_sample_eps(norm, eps, trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    kwargs = {"norm": norm, "n_queries": 60}
    same = F.square(model, x, y, eps=torch.full((x.shape[0],), eps), **kwargs)
    assert_equal(same, F.square(model, x, y, eps=eps, **kwargs), "an all-equal eps tensor is the float eps")
    eps_t = torch.linspace(0.0, 2 * eps, x.shape[0])
    adv = F.square(model, x, y, eps=eps_t, **kwargs)
    d = (adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (dist <= eps_t * (1 + 1e-5) + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv[0], x[0]), "eps = 0 leaves the image"


def test_square_zero_restarts_and_already_fooled(trained_models, batch):
    x, y = batch
    model = trained_models["mlp"]
    assert_equal(fastadv.Square(model, n_restarts=0)(x, y), x)
    wrong = (model(x).argmax(1) + 1) % 10  # every sample already misclassified w.r.t. these labels
    adv, success = F.square(model, x, wrong, n_queries=5, return_success=True)
    assert_equal(adv, x)
    assert success.all()


@pytest.mark.parametrize("norm,eps,p_init", [("Linf", 0.05, 1.0), ("L2", 0.5, 0.3)])
def test_square_color_non_square_images(norm, eps, p_init):
    """3 channels (the L2 window budget is per channel in 'original') on 16x12 images
    (a window wider than the image is capped only in 'original')."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    x = torch.rand(6, 3, 16, 12, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    kwargs = {"norm": norm, "eps": eps, "p_init": p_init, "n_queries": 40}
    expected = torchattacks.Square(model, **kwargs)(x, y)
    assert_equal(fastadv.Square(model, **kwargs)(x, y), expected, "torchattacks")
    expected = SquareAttack(model, resc_schedule=False, seed=0, **kwargs).perturb(x, y)
    assert_equal(F.square(model, x, y, arithmetic="original", resc_schedule=False, **kwargs), expected, "original")


# -- invariants --------------------------------------------------------------------------------------------

INVARIANT_ATTACKS = [
    ("CW", {"steps": 5, "c": 5}, None, None),
    ("DeepFool", {"steps": 3}, None, None),
    ("Square", {"eps": 0.2, "n_queries": 30}, "linf", 0.2),
    ("Square", {"norm": "L2", "eps": 1.0, "n_queries": 30}, "l2", 1.0),
]


@pytest.mark.parametrize("name,kwargs,norm,eps", INVARIANT_ATTACKS)
def test_invariants(name, kwargs, norm, eps, batch):
    x, y = batch
    x_before, y_before = x.clone(), y.clone()
    model = SmallCNN()
    model.train()
    model.features[1].eval()
    model.head.weight.requires_grad_(False)
    model.head.bias.grad = torch.ones_like(model.head.bias)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    torch.manual_seed(7)
    rng = torch.get_rng_state()

    adv = getattr(fastadv, name)(model, **kwargs)(x, y)

    assert torch.equal(torch.get_rng_state(), rng), "global RNG consumed or re-seeded"
    assert torch.equal(x, x_before) and torch.equal(y, y_before), "inputs modified"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g), "parameter .grad touched"
    assert adv.shape == x.shape and adv.dtype == x.dtype and torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    if norm is not None:
        d = (adv - x).flatten(1)
        dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (dist <= eps + 1e-5).all()


def test_empty_batch(trained_models):
    model = trained_models["mlp"]
    x, y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    for adv in (F.cw(model, x, y), F.deepfool(model, x, y), F.square(model, x, y)):
        assert adv.shape == x.shape


@pytest.mark.parametrize("name,kwargs", [("CW", {"steps": 5, "c": 5}), ("DeepFool", {"steps": 3}),
                                         ("Square", {"eps": 0.1, "n_queries": 20})])
def test_engine_options(name, kwargs, trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    for engine in ({"channels_last": True}, {"precision": "bf16"}, {"fast": True}, {"batch_size": 24}):
        adv = getattr(fastadv, name)(model, **kwargs, **engine)(x, y)
        assert adv.shape == x.shape and adv.dtype == x.dtype and adv.is_contiguous(), engine
        assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1, engine
        if name == "Square":
            assert ((adv - x).abs().amax() <= 0.1 + 1e-6), engine
    if name == "Square":
        # Chunks are attacked as separate calls, each seeded alike.
        chunks = torch.cat([F.square(model, x[i:i + 24], y[i:i + 24], **kwargs) for i in range(0, 64, 24)])
        adv, success = F.square(model, x, y, batch_size=24, return_success=True, **kwargs)
        assert_equal(adv, chunks)
        assert torch.equal(success, misclassified(model, adv, y))


# -- bad input --------------------------------------------------------------------------------------------

BAD = [
    ("CW", {"c": -1}, ValueError, "c"),
    ("CW", {"kappa": -0.1}, ValueError, "kappa"),
    ("CW", {"steps": -1}, ValueError, "steps"),
    ("CW", {"steps": 2.5}, TypeError, "steps"),
    ("CW", {"lr": 0}, ValueError, "lr"),
    ("CW", {"lr": -0.01}, ValueError, "lr"),
    ("CW", {"margin": "fixed"}, ValueError, "margin"),
    ("DeepFool", {"overshoot": -0.02}, ValueError, "overshoot"),
    ("DeepFool", {"steps": -3}, ValueError, "steps"),
    ("DeepFool", {"overshoot": "big"}, TypeError, "overshoot"),
    ("Square", {"n_queries": 0}, ValueError, "n_queries"),
    ("Square", {"n_queries": -5}, ValueError, "n_queries"),
    ("Square", {"n_queries": 10.0}, TypeError, "n_queries"),
    ("Square", {"p_init": 0}, ValueError, "p_init"),
    ("Square", {"p_init": 1.5}, ValueError, "p_init"),
    ("Square", {"norm": "L1"}, ValueError, "norm"),
    ("Square", {"loss": "dlr"}, ValueError, "loss"),
    ("Square", {"eps": -0.1}, ValueError, "eps"),
    ("Square", {"n_restarts": -1}, ValueError, "n_restarts"),
    ("Square", {"arithmetic": "fra31"}, ValueError, "arithmetic"),
    ("Square", {"compact_every": 0}, ValueError, "compact_every"),
]


@pytest.mark.parametrize("name,kwargs,exc,arg", BAD)
def test_bad_arguments(name, kwargs, exc, arg, trained_models, batch):
    model = trained_models["mlp"]
    with pytest.raises(exc, match=arg):
        getattr(fastadv, name)(model, **kwargs)
    x, y = batch
    with pytest.raises(exc, match=arg):
        getattr(F, name.lower())(model, x[:4], y[:4], **kwargs)


def test_bad_inputs(trained_models, batch):
    model = trained_models["mlp"]
    x, y = batch
    for name in ("CW", "DeepFool", "Square"):
        atk = getattr(fastadv, name)(model)
        with pytest.raises(ValueError, match="labels"):
            atk(x, None)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            atk(x * 2, y)
        with pytest.raises(TypeError, match="images"):
            atk((x * 255).long(), y)
    with pytest.raises(ValueError, match="per-sample|shape"):
        F.square(model, x, y, eps=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="5x5"):
        F.square(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), torch.rand(2, 1, 4, 4), y[:2], norm="L2", eps=0.5)
