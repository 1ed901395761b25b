"""EADL1, EADEN, JSMA and SparseFool against torchattacks 3.5.1.

- Same seed, CPU, fp32: torch.equal to torchattacks on both trained digits models,
  default (small budgets where the defaults are slow) and non-default configs, every
  targeted mode the attack supports.
- Where the reference crashes on valid input (EAD with max_iterations < 10 or bf16
  images, JSMA with fewer than 10 classes, JSMA on channels_last images) fastadv runs,
  and its answer is checked against the reference on the equivalent valid call.
- Odd image sizes, batch 1, bf16, channels_last; inputs untouched and model state
  restored; bad arguments raise errors that name them.
"""
import pytest
import torch
import torch.nn as nn
import torchattacks
from torch.utils._python_dispatch import TorchDispatchMode

import fastadv
from fastadv.models import SmallCNN
from helpers import assert_equal
from test_zoo_linf import config_id, run

SMALL_EAD = dict(binary_search_steps=3, max_iterations=20)
CONFIGS = [
    ("EADL1", SMALL_EAD),
    ("EADL1", dict(kappa=0.3, lr=0.05, binary_search_steps=10, max_iterations=12, abort_early=False,
                   initial_const=0.1, beta=0.01)),
    ("EADEN", SMALL_EAD),
    ("EADEN", dict(kappa=0.5, lr=0.02, binary_search_steps=4, max_iterations=30, initial_const=0.5, beta=0.005)),
    ("JSMA", {}),
    ("JSMA", dict(theta=0.5, gamma=0.2)),
    ("JSMA", dict(theta=-1.0, gamma=0.1)),
    ("SparseFool", dict(steps=2)),
    ("SparseFool", dict(steps=2, lam=1.5, overshoot=0.1)),
]
TARGETED = {"EADL1": dict(binary_search_steps=2, max_iterations=20, initial_const=0.5),
            "EADEN": dict(binary_search_steps=2, max_iterations=20, initial_const=0.5),
            "JSMA": dict(gamma=0.1)}
FUNCTIONS = {"EADL1": "eadl1", "EADEN": "eaden", "JSMA": "jsma", "SparseFool": "sparsefool"}
QUICK = {"EADL1": dict(binary_search_steps=2, max_iterations=10), "EADEN": dict(binary_search_steps=2, max_iterations=10),
         "JSMA": {}, "SparseFool": dict(steps=1)}


def both(name, model, x, y, kwargs, mode=None, x_reference=None):
    expected = run(torchattacks, name, model, x if x_reference is None else x_reference, y, kwargs, mode)
    return run(fastadv, name, model, x, y, kwargs, mode), expected


@pytest.fixture
def small(batch):
    x, y = batch
    return x[:8], y[:8]


def few(name, x, y):
    """SparseFool is the slowest (image by image, DeepFool inside): 3 images."""
    return (x[:3], y[:3]) if name == "SparseFool" else (x, y)


# -- equivalence with torchattacks ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_equals_torchattacks(config, model, small):
    name, kwargs = config
    x, y = small
    x, y = few(name, x, y)
    actual, expected = both(name, model, x, y, kwargs)
    assert_equal(actual, expected, name)
    if kwargs.get("theta", 1) > 0:
        assert not torch.equal(actual, x), "the attack did nothing"


@pytest.mark.parametrize("mode", ["random", "least_likely", "label", "function"])
@pytest.mark.parametrize("name", list(TARGETED))
def test_targeted_equals_torchattacks(name, mode, model, batch):
    x, y = batch
    actual, expected = both(name, model, x[:6], y[:6], TARGETED[name], mode)
    assert_equal(actual, expected, f"{name} {mode}")


def test_sparsefool_is_default_only(trained_models):
    atk = fastadv.SparseFool(trained_models["mlp"])
    assert atk.supported_mode == ["default"]
    with pytest.raises(ValueError, match="SparseFool does not support targeted"):
        atk.set_mode_targeted_random(quiet=True)


def test_sparsefool_inner_deepfool_settings(trained_models, small):
    """The deepfool attribute sets the inner DeepFool, as the reference's does."""
    x, y = small
    model = trained_models["cnn"]
    atks = [lib.SparseFool(model, steps=2) for lib in (torchattacks, fastadv)]
    for atk in atks:
        atk.deepfool.steps, atk.deepfool.overshoot = 3, 0.1
    assert_equal(atks[1](x, y), atks[0](x, y), "SparseFool with DeepFool(steps=3, overshoot=0.1)")


def test_ead_reference_habits(trained_models, small):
    """The reference's first gradient step also moves its copy of the images: its outputs
    can leave [0, 1]; fastadv returns the same tensor."""
    x, y = small
    kwargs = dict(lr=0.05, binary_search_steps=1, max_iterations=10, initial_const=1.0)
    actual, expected = both("EADL1", trained_models["mlp"], x, y, kwargs)
    assert_equal(actual, expected, "EADL1 lr=0.05")
    assert actual.min() < 0 or actual.max() > 1


# -- where the reference crashes --------------------------------------------------------------


def test_ead_few_iterations_with_abort_early(trained_models, small):
    """The reference divides by max_iterations // 10; fastadv checks every iteration, and a
    run whose loss keeps falling matches the reference without early abort."""
    x, y = small
    model = trained_models["cnn"]
    with pytest.raises(ZeroDivisionError):
        torchattacks.EADL1(model, max_iterations=5)(x, y)
    kwargs = dict(binary_search_steps=1, max_iterations=5, initial_const=1.0)
    actual = fastadv.EADL1(model, **kwargs)(x, y)
    expected = torchattacks.EADL1(model, abort_early=False, **kwargs)(x, y)
    assert_equal(actual, expected, "EADL1 max_iterations=5")
    assert not torch.equal(actual, x)


@pytest.mark.parametrize("n_classes", [7, 12])
def test_jsma_any_class_count(n_classes, digits):
    """Default mode targets (label + 1) mod C: the reference's mod 10 fails below 10 classes."""
    _, (x, y) = digits
    x, y = x[:6], (y[:6] + 4) % n_classes
    y[0] = n_classes - 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes)).eval()
    targets = (y + 1) % n_classes
    expected = run(torchattacks, "JSMA", model, x, targets, {}, "label")
    assert_equal(run(fastadv, "JSMA", model, x, y, {}), expected, f"JSMA {n_classes} classes")
    if n_classes < 10:
        with pytest.raises(IndexError):
            torchattacks.JSMA(model)(x, y)


@pytest.mark.parametrize("name", list(QUICK))
def test_channels_last_three_channels(name):
    """The reference's JSMA fails on channels_last (.view); every attack returns the
    reference's answer for the contiguous images, in the caller's layout."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3).eval()
    x = torch.rand(3, 3, 8, 8)
    y = torch.tensor([1, 2, 3])
    xc = x.contiguous(memory_format=torch.channels_last)
    actual, expected = both(name, model, xc, y, QUICK[name], x_reference=x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_equal(actual, expected, f"{name} channels_last")


# -- shapes and dtypes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUICK))
def test_batch_one_odd_size(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(35, 10)).eval()
    x, y = torch.rand(1, 1, 7, 5), torch.tensor([3])
    actual, expected = both(name, model, x, y, QUICK[name])
    assert_equal(actual, expected, f"{name} 1x1x7x5")
    assert actual.shape == x.shape


@pytest.mark.parametrize("name", list(QUICK))
def test_bf16(name):
    """JSMA and SparseFool equal the reference in bf16; the reference's EAD fails there
    (its shrinkage makes fp32 iterates), fastadv's keeps bf16 and still fools the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(35, 10)).to(torch.bfloat16).eval()
    x = torch.rand(6, 1, 7, 5).to(torch.bfloat16)
    y = model(x).argmax(1)  # classified correctly at the start
    kwargs = QUICK[name]
    if name.startswith("EAD"):
        with pytest.raises(RuntimeError, match="dtype"):
            run(torchattacks, name, model, x, y, kwargs)
        actual = run(fastadv, name, model, x, y, dict(kwargs, initial_const=1.0))
        assert actual.dtype == torch.bfloat16
        fooled = model(actual).argmax(1) != y
        changed = (actual != x).flatten(1).any(1)
        assert fooled.any() and torch.equal(fooled, changed)  # only fooling iterates are returned
    else:
        actual, expected = both(name, model, x, y, kwargs)
        assert actual.dtype == torch.bfloat16
        assert_equal(actual, expected, f"{name} bf16")


# -- plain functions, chunking ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUICK))
def test_function_equals_class(name, trained_models, small):
    model = trained_models["cnn"]
    x, y = few(name, *small)
    expected = run(fastadv, name, model, x, y, QUICK[name])
    actual = getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **QUICK[name])
    assert_equal(actual, expected, name)


def test_function_targeted_equals_class_by_label(trained_models, small):
    model = trained_models["mlp"]
    x, y = small
    t = (y + 1) % 10
    for name in TARGETED:
        expected = run(fastadv, name, model, x, t, TARGETED[name], "label")
        actual = getattr(fastadv.functional, FUNCTIONS[name])(model, x, t, targeted=True, **TARGETED[name])
        assert_equal(actual, expected, name)


@pytest.mark.parametrize("name", ["JSMA", "SparseFool"])
def test_per_image_attacks_chunk_freely(name, trained_models, small):
    """JSMA and SparseFool treat images one by one: batch_size chunks give the same tensor."""
    model = trained_models["mlp"]
    x, y = small if name == "JSMA" else (small[0][:4], small[1][:4])
    expected = run(fastadv, name, model, x, y, QUICK[name])
    assert_equal(run(fastadv, name, model, x, y, dict(QUICK[name], batch_size=3)), expected, name)


class SyncCounter(TorchDispatchMode):
    """Counts host syncs: tensor -> Python scalar conversions."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_ead_loop_does_not_sync_per_iteration(trained_models, small):
    """Without abort_early, EAD's host syncs do not grow with the iterations."""
    from fastadv.attacks.ead import ead_loop

    x, y = small
    model = trained_models["mlp"]
    counts = []
    for iterations in (3, 12):
        with SyncCounter() as counter:
            ead_loop(model, x[:2], y[:2], binary_search_steps=1, max_iterations=iterations, abort_early=False)
        counts.append(counter.syncs)
    assert counts[0] == counts[1], counts


# -- invariants and bad input -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUICK))
def test_inputs_and_model_state_untouched(name, trained_models, small):
    x, y = few(name, *small)
    model = SmallCNN()
    model.load_state_dict(trained_models["cnn"].state_dict())
    model.train()
    model.features[1].eval()  # a mixed mode must come back exactly
    model.head.weight.requires_grad_(False)
    model.head.bias.grad = torch.ones_like(model.head.bias)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x0, y0 = x.clone(), y.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    getattr(fastadv, name)(model, **QUICK[name])(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.head.bias.grad, torch.ones_like(model.head.bias))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.bias")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


BAD_ARGS = [
    (lambda m: fastadv.EADL1(m, kappa=-1), ValueError, "kappa"),
    (lambda m: fastadv.EADL1(m, lr=0), ValueError, "lr"),
    (lambda m: fastadv.EADL1(m, binary_search_steps=-1), ValueError, "binary_search_steps"),
    (lambda m: fastadv.EADL1(m, max_iterations=2.5), TypeError, "max_iterations"),
    (lambda m: fastadv.EADL1(m, abort_early="yes"), TypeError, "abort_early"),
    (lambda m: fastadv.EADL1(m, initial_const=float("nan")), ValueError, "initial_const"),
    (lambda m: fastadv.EADEN(m, beta=-0.1), ValueError, "beta"),
    (lambda m: fastadv.JSMA(m, theta=0), ValueError, "theta"),
    (lambda m: fastadv.JSMA(m, theta=1.5), ValueError, "theta"),
    (lambda m: fastadv.JSMA(m, theta="1"), TypeError, "theta"),
    (lambda m: fastadv.JSMA(m, gamma=0), ValueError, "gamma"),
    (lambda m: fastadv.JSMA(m, gamma=1.2), ValueError, "gamma"),
    (lambda m: fastadv.SparseFool(m, steps=-1), ValueError, "steps"),
    (lambda m: fastadv.SparseFool(m, lam=0), ValueError, "lam"),
    (lambda m: fastadv.SparseFool(m, overshoot=-0.1), ValueError, "overshoot"),
    (lambda m: fastadv.functional.eaden(m, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), lr=-1), ValueError, "lr"),
    (lambda m: fastadv.functional.jsma(m, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), gamma=2), ValueError, "gamma"),
    (lambda m: fastadv.functional.sparsefool(m, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), lam=-1), ValueError,
     "lam"),
]


@pytest.mark.parametrize("make,exc,match", BAD_ARGS)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make(SmallCNN().eval())


@pytest.mark.parametrize("name", list(QUICK))
def test_labels_out_of_range(name):
    model = SmallCNN().eval()
    with pytest.raises(ValueError, match="labels must lie"):
        getattr(fastadv, name)(model, **QUICK[name])(torch.rand(3, 1, 8, 8), torch.tensor([0, 10, 2]))
