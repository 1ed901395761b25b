"""FGSM, PGD and PGDL2 against torchattacks 3.5.1: same seed, same output, bit for bit.

Two real architectures trained on digits in the test session (a CNN with BatchNorm
in eval mode and an MLP), fp32, CPU. The 'interpret' backend runs the Triton
kernels: bit-exact for the Linf attacks, within the L2 kernel bound for PGDL2.
"""
import pytest
import torch
import torchattacks

import fastadv
from fastadv import functional as F
from helpers import assert_close, assert_equal

CONFIGS = [
    ("FGSM", {}),
    ("FGSM", {"eps": 0.1}),
    ("PGD", {}),
    ("PGD", {"eps": 0.1, "alpha": 0.02, "steps": 7, "random_start": False}),
    ("PGDL2", {}),
    ("PGDL2", {"eps": 0.5, "alpha": 0.1, "steps": 5}),
    ("PGDL2", {"eps": 0.5, "alpha": 0.1, "steps": 5, "random_start": False}),
]


def run_pair(name, kwargs, model, x, y, setup=lambda atk: None, seed=1, backend="torch"):
    ref = getattr(torchattacks, name)(model, **kwargs)
    ours = getattr(fastadv, name)(model, backend=backend, **kwargs)
    setup(ref)
    setup(ours)
    torch.manual_seed(seed)
    expected = ref(x, y)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(seed)
    actual = ours(x, y)
    assert torch.equal(torch.get_rng_state(), rng_after_ref), "RNG consumed differently from the reference"
    return actual, expected


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_matches_torchattacks(name, kwargs, model, batch):
    x, y = batch
    actual, expected = run_pair(name, kwargs, model, x, y)
    assert_equal(actual, expected, f"{name}{kwargs}")
    assert not torch.equal(actual, x), "the attack changed nothing"


@pytest.mark.parametrize(
    "mode",
    [
        lambda a: a.set_mode_targeted_random(quiet=True),
        lambda a: a.set_mode_targeted_least_likely(kth_min=2, quiet=True),
        lambda a: a.set_mode_targeted_by_label(quiet=True),
        lambda a: a.set_mode_targeted_by_function(lambda im, lb: (lb + 3) % 10, quiet=True),
    ],
    ids=["random", "least_likely", "by_label", "by_function"],
)
@pytest.mark.parametrize("name", ["FGSM", "PGD", "PGDL2"])
def test_targeted_modes_match(name, mode, model, batch):
    x, y = batch
    actual, expected = run_pair(name, {}, model, x, y, setup=mode)
    assert_equal(actual, expected)


@pytest.mark.parametrize("name", ["FGSM", "PGD", "PGDL2"])
def test_normalization_used_matches(name, trained_models, batch):
    x, y = batch
    mean, std = [0.3], [0.4]
    xn = (x - 0.3) / 0.4
    actual, expected = run_pair(name, {}, trained_models["cnn"], xn, y, setup=lambda a: a.set_normalization_used(mean, std))
    assert_equal(actual, expected)


@pytest.mark.parametrize("name", ["FGSM", "PGD", "PGDL2"])
def test_model_training_mode_matches(name, trained_models, batch):
    x, y = batch
    model = trained_models["cnn"]
    actual, expected = run_pair(name, {"steps": 3} if name != "FGSM" else {}, model, x, y,
                                setup=lambda a: a.set_model_training_mode(model_training=True))
    assert_equal(actual, expected)


def test_sequence_of_calls_reproduces_reference(model, batch):
    """The global RNG is consumed as the reference consumes it, call after call."""
    x, y = batch
    ref, ours = torchattacks.PGD(model), fastadv.PGD(model)
    torch.manual_seed(5)
    expected = [ref(x, y) for _ in range(3)]
    torch.manual_seed(5)
    for e in expected:
        assert_equal(ours(x, y), e)


@pytest.mark.interpreter
@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_interpreted_kernels_match(name, kwargs, trained_models, batch):
    x, y = batch
    actual, expected = run_pair(name, kwargs, trained_models["cnn"], x, y, backend="interpret")
    if name == "PGDL2":
        # Norms summed in another order can flip a later step's rounding; each step
        # moves at most alpha, so the final iterate stays within a few ulps in practice.
        assert_close(actual, expected, 1e-5)
    else:
        assert_equal(actual, expected)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgdl2"])
def test_functional_equals_class(name, model, batch):
    x, y = batch
    cls = {"fgsm": fastadv.FGSM, "pgd": fastadv.PGD, "pgdl2": fastadv.PGDL2}[name]
    torch.manual_seed(2)
    expected = cls(model)(x, y)
    torch.manual_seed(2)
    actual = getattr(F, name)(model, x, y, **({"eps": 8 / 255} if name != "pgdl2" else {}))
    assert_equal(actual, expected)


def test_functional_targeted_equals_class_by_label(model, batch):
    x, y = batch
    target = (y + 1) % 10
    atk = fastadv.PGD(model)
    atk.set_mode_targeted_by_label(quiet=True)
    torch.manual_seed(2)
    expected = atk(x, target)
    torch.manual_seed(2)
    assert_equal(F.pgd(model, x, target, targeted=True), expected)


def test_per_sample_eps(model, batch):
    """A per-sample eps equal for all samples gives the scalar result (no random start),
    and each sample stays within its own budget."""
    x, y = batch
    n = len(y)
    scalar = F.pgd(model, x, y, eps=0.1, alpha=0.02, steps=5, random_start=False)
    vector = F.pgd(model, x, y, eps=torch.full((n,), 0.1), alpha=0.02, steps=5, random_start=False)
    assert_equal(vector, scalar)
    eps = torch.linspace(0, 0.2, n)
    for fn in (F.pgd, F.fgsm):
        adv = fn(model, x, y, eps=eps)
        linf = (adv - x).abs().flatten(1).amax(1)
        assert (linf <= eps + 1e-6).all()
    assert_equal(F.fgsm(model, x, y, eps=torch.full((n,), 0.1)), F.fgsm(model, x, y, eps=0.1))
    adv = F.pgdl2(model, x, y, eps=eps, steps=5)
    assert ((adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


def test_attacks_are_effective(trained_models, digits):
    """On a plainly trained CNN, PGD at eps 0.2 fools nearly every digit."""
    _, (x, y) = digits
    model = trained_models["cnn"]
    clean = (model(x).argmax(1) == y).float().mean().item()
    adv = fastadv.PGD(model, eps=0.2, alpha=0.05, steps=10)(x, y)
    robust = (model(adv).argmax(1) == y).float().mean().item()
    assert clean > 0.95 and robust < 0.1, (clean, robust)
