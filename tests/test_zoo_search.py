"""OnePixel, Pixle and LGV against torchattacks 3.5.1.

- OnePixel and Pixle draw from numpy's global RNG (and the targets from torch's):
  with the same seeds, fastadv's output is torch.equal to torchattacks' on both
  trained digits models, default and non-default configs, every targeted mode; the
  differential evolution alone equals torchattacks' copy of scipy's solver.
- LGV trains copies of the model from a loader: with the same torch and Python seeds
  and the same attack class on each side, the collected models and the outputs are
  equal (on a slice of the digits train set, one or two epochs: seconds).
- Bad images and labels: tests/test_bad_input.py's CALLS include OnePixel and Pixle.
- Where the reference fails (Pixle on non-square images and update_each_iteration
  with a batch; LGV targeted by label), fastadv works; checked here.
"""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchattacks
from torch.utils.data import DataLoader, TensorDataset
from torchattacks.attacks._differential_evolution import differential_evolution as reference_de

import fastadv
from fastadv import functional as F
from fastadv.attacks.lgv import LightEnsemble
from fastadv.evolution import differential_evolution
from fastadv.models import SmallCNN
from helpers import assert_equal
from test_zoo_linf import set_mode

MODES = ["random", "least_likely", "label", "function"]


def run(lib, name, model, x, y, kwargs, mode=None, seed=1):
    atk = set_mode(getattr(lib, name)(model, **kwargs), mode)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return atk(x, y)


def both(name, model, x, y, kwargs, mode=None):
    expected = run(torchattacks, name, model, x, y, kwargs, mode)
    actual = run(fastadv, name, model, x, y, kwargs, mode)
    assert_equal(actual, expected, f"{name} {kwargs} {mode}")
    return actual


@pytest.fixture
def small(batch):
    x, y = batch
    return x[:8], y[:8]


# -- differential evolution ---------------------------------------------------------------


@pytest.mark.parametrize("recombination", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("popmul,n_params", [(3, 3), (1, 4), (2, 7)])
def test_evolution_equals_torchattacks_solver(recombination, popmul, n_params):
    """Same np.random.seed, same function: the same best member, and stop is asked at the same points."""
    rng = np.random.RandomState(n_params)
    bounds = [(0.0, float(rng.randint(1, 9))) for _ in range(n_params)]
    target = rng.rand(n_params)

    def energies(params):
        return ((params - target) ** 2).sum(1).astype(np.float32)

    asked = {"ref": [], "ours": []}
    np.random.seed(5)
    expected = reference_de(
        func=energies, bounds=bounds, maxiter=12, popsize=popmul, init="random", recombination=recombination,
        atol=-1, polish=False, callback=lambda x, convergence: asked["ref"].append(x.copy()) or len(asked["ref"]) == 9,
    ).x
    flags = []

    def stop(best, changed):
        asked["ours"].append(best.copy())
        flags.append(changed)
        return len(asked["ours"]) == 9

    np.random.seed(5)
    actual = differential_evolution(energies, bounds, maxiter=12, popmul=popmul, recombination=recombination, stop=stop)
    assert np.array_equal(actual, expected)
    assert len(asked["ours"]) == len(asked["ref"]) == 9
    assert all(np.array_equal(a, b) for a, b in zip(asked["ours"], asked["ref"]))
    # changed: whether the best member differs from the one stop was last asked about
    assert flags == [True] + [not np.array_equal(a, b) for a, b in zip(asked["ours"][1:], asked["ours"])]
    np.random.seed(5)
    reference_de(func=energies, bounds=bounds, maxiter=3, popsize=popmul, init="random",
                 recombination=recombination, atol=-1, polish=False)
    after_ref = np.random.get_state()
    np.random.seed(5)
    differential_evolution(energies, bounds, maxiter=3, popmul=popmul, recombination=recombination,
                           stop=lambda best, changed: False)
    after_ours = np.random.get_state()
    same_state = after_ours[2] == after_ref[2] and np.array_equal(after_ours[1], after_ref[1])
    assert same_state, "numpy RNG consumed differently"


# -- OnePixel -----------------------------------------------------------------------------

ONEPIXEL_CONFIGS = [{}, dict(pixels=2, steps=4, popsize=20, inf_batch=7)]


@pytest.mark.parametrize("kwargs", ONEPIXEL_CONFIGS, ids=["default", "pixels2-steps4-pop20-inf7"])
def test_onepixel_equals_torchattacks(kwargs, model, small):
    x, y = small
    adv = both("OnePixel", model, x, y, kwargs)
    assert not torch.equal(adv, x), "the attack did nothing"
    changed = (adv != x).flatten(2).any(1).sum(1)  # pixel positions changed per image
    assert (changed <= kwargs.get("pixels", 1)).all()


@pytest.mark.parametrize("mode", MODES)
def test_onepixel_targeted_equals_torchattacks(mode, model, small):
    x, y = small
    both("OnePixel", model, x[:6], y[:6], dict(steps=3), mode)


def test_onepixel_rgb_odd_size():
    """3 channels, 7x5 images, a batch of one and of three."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 5, 10)).eval()
    x = torch.rand(3, 3, 7, 5)
    y = model(x).argmax(1)
    both("OnePixel", model, x[:1], y[:1], dict(steps=3, popsize=12))
    both("OnePixel", model, x, y, dict(pixels=3, steps=2))


def test_onepixel_rechecks_in_training_mode(trained_models, small):
    """In eval mode the success test of an unchanged best member is reused; under
    set_model_training_mode it runs every generation, as the reference. On a model
    without BatchNorm or Dropout both give the same output."""
    x, y = small
    model = trained_models["mlp"]
    eval_out = run(fastadv, "OnePixel", model, x, y, dict(steps=5))
    atk = fastadv.OnePixel(model, steps=5)
    atk.set_model_training_mode(model_training=True)
    np.random.seed(1)
    assert_equal(atk(x, y), eval_out)


def test_onepixel_functional_and_chunks(model, small):
    x, y = small
    expected = run(fastadv, "OnePixel", model, x, y, dict(steps=3))
    np.random.seed(1)
    assert_equal(F.onepixel(model, x, y, steps=3), expected)
    np.random.seed(1)
    assert_equal(F.onepixel(model, x, y, steps=3, batch_size=3), expected)


# -- Pixle --------------------------------------------------------------------------------

PIXLE_CONFIGS = [
    {},
    dict(x_dimensions=(1, 3), y_dimensions=0.3, restarts=2, max_iterations=5, pixel_mapping="similarity"),
    dict(x_dimensions=0.25, restarts=2, max_iterations=4, pixel_mapping="Similarity_Random"),
    dict(restarts=2, max_iterations=4, pixel_mapping="distance"),
    dict(restarts=3, max_iterations=3, pixel_mapping="distance_random"),
]


def pixle_id(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


@pytest.mark.parametrize("kwargs", PIXLE_CONFIGS, ids=pixle_id)
def test_pixle_equals_torchattacks(kwargs, model, small):
    x, y = small
    adv = both("Pixle", model, x, y, kwargs)
    assert not torch.equal(adv, x), "the attack did nothing"


@pytest.mark.parametrize("mode", MODES)
def test_pixle_targeted_equals_torchattacks(mode, model, small):
    x, y = small
    both("Pixle", model, x, y, dict(restarts=2, max_iterations=4), mode)


@pytest.mark.parametrize("mapping", ["random", "similarity_random"])
def test_pixle_update_each_iteration(mapping, model, small):
    """The reference takes one image at a time in this mode; fastadv's batch equals its
    images attacked one after the other from the same numpy RNG stream."""
    x, y = small
    kwargs = dict(max_iterations=8, update_each_iteration=True, pixel_mapping=mapping)
    atk = torchattacks.Pixle(model, **kwargs)
    np.random.seed(1)
    expected = torch.cat([atk(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])
    np.random.seed(1)
    assert_equal(fastadv.Pixle(model, **kwargs)(x, y), expected)
    with pytest.raises(AssertionError):
        atk(x, y)  # the reference's limitation


def test_pixle_rgb_odd_square():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 7, 10)).eval()
    x = torch.rand(3, 3, 7, 7)
    y = model(x).argmax(1)
    both("Pixle", model, x, y, dict(restarts=2, max_iterations=3, pixel_mapping="similarity"))
    both("Pixle", model, x[:1], y[:1], dict(x_dimensions=(1, 7), restarts=2, max_iterations=3))


@pytest.mark.parametrize("mapping", ["random", "similarity", "distance_random"])
def test_pixle_non_square(mapping):
    """The reference indexes rows with x on non-square images (IndexError); fastadv moves
    pixels of the image to places inside it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 11, 10)).eval()
    x = torch.rand(4, 2, 4, 11)
    y = model(x).argmax(1)
    np.random.seed(0)
    with pytest.raises(IndexError):
        torchattacks.Pixle(model, restarts=3, pixel_mapping=mapping)(x, y)
    np.random.seed(0)
    adv = fastadv.Pixle(model, restarts=3, pixel_mapping=mapping)(x, y)
    assert adv.shape == x.shape and not torch.equal(adv, x)
    for a, s in zip(adv, x):  # every pixel of the output is a pixel of the source image
        src = s.flatten(1).T
        assert all((src == p).all(1).any() for p in a.flatten(1).T)


def test_pixle_functional(model, small):
    x, y = small
    expected = run(fastadv, "Pixle", model, x, y, dict(restarts=2, max_iterations=4))
    np.random.seed(1)
    assert_equal(F.pixle(model, x, y, restarts=2, max_iterations=4), expected)


# -- LGV ----------------------------------------------------------------------------------


@pytest.fixture
def loader(digits):
    (x, y), _ = digits
    return DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64, shuffle=True)


def lgv_run(lib, model, loader, x, y, kwargs, mode=None, calls=2):
    torch.manual_seed(1)
    random.seed(2)
    atk = set_mode(lib.LGV(model, loader, **{"verbose": False, **kwargs}), mode)
    return atk, torch.cat([atk(x, y) for _ in range(calls)])


LGV_CASES = [  # (config, targeted mode): every mode on the first config, the others untargeted
    *[(dict(epochs=1, nb_models_epoch=2, attack="PGD"), mode) for mode in (None, "random", "least_likely")],
    (dict(epochs=2, nb_models_epoch=3, lr=0.01, wd=1e-3, n_grad=2, attack="PGD", eps=0.1, steps=3,
          random_start=False), None),
    (dict(epochs=1, nb_models_epoch=2, n_grad=-1, attack="FGSM", eps=0.1), None),
]


def lgv_case_id(case):
    config, mode = case
    return "-".join(f"{k}={v}" for k, v in config.items()) + f"-{mode or 'untargeted'}"


@pytest.mark.parametrize("config,mode", LGV_CASES, ids=[lgv_case_id(c) for c in LGV_CASES])
def test_lgv_equals_torchattacks(config, mode, model, loader, small):
    x, y = small
    kwargs = {k: v for k, v in config.items() if k != "attack"}
    ref, expected = lgv_run(torchattacks, model, loader, x, y,
                            {**kwargs, "attack_class": getattr(torchattacks, config["attack"])}, mode)
    ours, actual = lgv_run(fastadv, model, loader, x, y,
                           {**kwargs, "attack_class": getattr(fastadv, config["attack"])}, mode)
    assert_equal(actual, expected, f"LGV {config} {mode}")
    assert len(ours.list_models) == len(ref.list_models) == config["epochs"] * config["nb_models_epoch"]
    for m_ours, m_ref in zip(ours.list_models, ref.list_models):
        for (k, a), b in zip(m_ours.state_dict().items(), m_ref.state_dict().values()):
            assert_equal(a, b, k)
        assert m_ours.training == m_ref.training


def test_lgv_default_attack_class(model, loader, small):
    x, y = small
    ref, expected = lgv_run(torchattacks, model, loader, x, y, dict(epochs=1, nb_models_epoch=2, steps=2))
    ours, actual = lgv_run(fastadv, model, loader, x, y, dict(epochs=1, nb_models_epoch=2, steps=2))
    assert ref.attack_class is torchattacks.BIM and ours.attack_class is fastadv.BIM
    assert_equal(actual, expected, "LGV with BIM")


@pytest.mark.parametrize("mode", ["label", "function"])
def test_lgv_targeted_by_label_and_function(mode, trained_models, loader, small):
    """The reference raises NotImplementedError in these modes; fastadv passes them to the attack."""
    x, y = small
    model = trained_models["cnn"]
    kwargs = dict(epochs=1, nb_models_epoch=2, n_grad=-1, attack_class=fastadv.PGD, steps=3)
    with pytest.raises(NotImplementedError):
        lgv_run(torchattacks, model, loader, x, y, {**kwargs, "attack_class": torchattacks.PGD}, mode, calls=1)
    atk, adv = lgv_run(fastadv, model, loader, x, y, kwargs, mode, calls=1)
    pgd = set_mode(fastadv.PGD(LightEnsemble(atk.list_models, order=None, n_grad=-1), steps=3), mode)
    torch.manual_seed(5)
    expected = pgd(x, y)
    torch.manual_seed(5)
    assert_equal(atk(x, y), expected)


class Normalize(nn.Module):
    def forward(self, x):
        return (x - 0.5) / 0.25


def test_lgv_inherits_normalization(trained_models, loader, small):
    """With set_normalization_used, LGV trains and attacks as on a model that normalizes
    itself (exact here: digits are multiples of 1/16, so the round trip is exact). The
    reference's attack does not get the normalization (and fails on the second call)."""
    x, y = small
    model = trained_models["mlp"]
    kwargs = dict(epochs=1, nb_models_epoch=2, attack_class=fastadv.PGD, steps=3)
    _, expected = lgv_run(fastadv, nn.Sequential(Normalize(), model), loader, x, y, kwargs)
    torch.manual_seed(1)
    random.seed(2)
    atk = fastadv.LGV(model, loader, verbose=False, **kwargs)
    atk.set_normalization_used([0.5], [0.25])
    actual = torch.cat([atk((x - 0.5) / 0.25, y) for _ in range(2)])
    assert_equal(actual, (expected - 0.5) / 0.25, "LGV normalized")


def test_lgv_save_load_and_no_loader(model, loader, small, tmp_path):
    x, y = small
    kwargs = dict(epochs=1, nb_models_epoch=2, attack_class=fastadv.PGD, steps=2, verbose=False)
    atk = fastadv.LGV(model, loader, **kwargs)
    with pytest.raises(RuntimeError, match="collect_models"):
        atk.save_models(tmp_path)
    atk.collect_models()
    atk.save_models(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["lgv_model_00000.pt", "lgv_model_00001.pt"]

    no_loader = fastadv.LGV(model, None, **kwargs)
    with pytest.raises(ValueError, match="trainloader"):
        no_loader(x, y)
    loaded = []
    for name in files:
        m = type(model)()
        m.load_state_dict(torch.load(tmp_path / name)["state_dict"])
        loaded.append(m.eval())
    no_loader.load_models(loaded)
    random.seed(0)
    torch.manual_seed(0)
    expected = atk(x, y)
    random.seed(0)
    torch.manual_seed(0)
    assert_equal(no_loader(x, y), expected)
    _, expected = lgv_run(fastadv, model, loader, x, y, kwargs, calls=1)
    torch.manual_seed(1)
    random.seed(2)
    actual = F.lgv(model, x, y, trainloader=loader, epochs=1, nb_models_epoch=2, attack_class=fastadv.PGD, steps=2)
    assert_equal(actual, expected, "functional LGV")


# -- invariants and bad input -------------------------------------------------------------

FACTORIES = {
    "OnePixel": lambda m, loader: fastadv.OnePixel(m, steps=2),
    "Pixle": lambda m, loader: fastadv.Pixle(m, restarts=2, max_iterations=3),
    "LGV": lambda m, loader: fastadv.LGV(m, loader, epochs=1, nb_models_epoch=2, attack_class=fastadv.PGD, steps=2,
                                         verbose=False),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_inputs_and_model_state_untouched(name, loader, batch):
    """Inputs unchanged; the caller's model keeps its modes, flags, .grad and weights (LGV trains a copy)."""
    x, y = batch[0][:4], batch[1][:4]
    model = SmallCNN()
    model.train()
    model.features[1].eval()
    model.head.weight.requires_grad_(False)
    model.head.bias.grad = torch.ones_like(model.head.bias)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    rng = torch.get_rng_state()
    adv = FACTORIES[name](model, loader)(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.head.bias.grad, torch.ones_like(model.head.bias))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.bias")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    if name != "LGV":  # numpy draws only (LGV's loader and random start draw from torch, as the reference)
        assert torch.equal(torch.get_rng_state(), rng)


def test_lgv_keeps_frozen_parameters_frozen(loader, small):
    """Parameters the caller froze are not trained in the copies either (as the reference's SGD)."""
    model = SmallCNN().eval()
    model.head.weight.requires_grad_(False)
    atk = fastadv.LGV(model, loader, epochs=1, nb_models_epoch=1, attack_class=fastadv.FGSM, verbose=False)
    atk(*small)
    assert torch.equal(atk.list_models[0].head.weight, model.head.weight)
    assert not torch.equal(atk.list_models[0].head.bias, model.head.bias)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])


BAD_ARGS = [
    (lambda m: fastadv.OnePixel(m, pixels=0), ValueError, "pixels"),
    (lambda m: fastadv.OnePixel(m, steps=0), ValueError, "steps"),
    (lambda m: fastadv.OnePixel(m, popsize=-1), ValueError, "popsize"),
    (lambda m: fastadv.OnePixel(m, popsize=2.5), TypeError, "popsize"),
    (lambda m: fastadv.OnePixel(m, inf_batch=0), ValueError, "inf_batch"),
    (lambda m: fastadv.Pixle(m, restarts=0), ValueError, "restarts"),
    (lambda m: fastadv.Pixle(m, restarts=-1), ValueError, "restarts"),
    (lambda m: fastadv.Pixle(m, max_iterations=0), ValueError, "max_iterations"),
    (lambda m: fastadv.Pixle(m, pixel_mapping="nearest"), ValueError, "pixel_mapping"),
    (lambda m: fastadv.Pixle(m, pixel_mapping=None), ValueError, "pixel_mapping"),
    (lambda m: fastadv.Pixle(m, x_dimensions=(0, 3)), ValueError, "x_dimensions"),
    (lambda m: fastadv.Pixle(m, x_dimensions=(5, 2)), ValueError, "x_dimensions"),
    (lambda m: fastadv.Pixle(m, y_dimensions=1.5), ValueError, "y_dimensions"),
    (lambda m: fastadv.Pixle(m, y_dimensions=(1, 2, 3)), ValueError, "y_dimensions"),
    (lambda m: fastadv.LGV(m, [], lr=-1.0), ValueError, "lr"),
    (lambda m: fastadv.LGV(m, [], epochs=0), ValueError, "epochs"),
    (lambda m: fastadv.LGV(m, [], nb_models_epoch=0), ValueError, "nb_models_epoch"),
    (lambda m: fastadv.LGV(m, [], n_grad=0), ValueError, "n_grad"),
    (lambda m: fastadv.LGV(m, [], attack_class=torchattacks.PGD), TypeError, "attack_class"),
    (lambda m: fastadv.LGV(m, 5), TypeError, "trainloader"),
    (lambda m: fastadv.LGV(lambda x: x, []), TypeError, "model"),
]


@pytest.mark.parametrize("make,exc,match", BAD_ARGS)
def test_bad_arguments(setup, make, exc, match):
    with pytest.raises(exc, match=match):
        make(setup[0])


def test_pixle_patch_range_too_small_for_image(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="x_dimensions"):
        fastadv.Pixle(model, x_dimensions=(20, 0.5))(x, y)  # (20, 4) pixels on 8-pixel sides


# -- dtypes, layouts, stochastic models ----------------------------------------------------

SEARCHES = [("OnePixel", dict(steps=4)), ("Pixle", dict(restarts=3, max_iterations=3)),
            ("Pixle", dict(restarts=2, max_iterations=3, pixel_mapping="similarity_random"))]


@pytest.fixture
def dropout_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    return model, torch.rand(5, 3, 4, 4), torch.randint(0, 10, (5,))


@pytest.mark.parametrize("name,kwargs", SEARCHES)
def test_search_dtypes_layouts_and_dropout(name, kwargs, dropout_model):
    """fp16 and channels_last equal the reference; with dropout active (set_model_training_mode)
    every model call the reference makes is made, in its order; bf16, where the reference
    fails (numpy has no bf16), runs."""
    base, x, y = dropout_model

    def both_libs(model, xs, setup=lambda atk: atk):
        outs = []
        for lib in (torchattacks, fastadv):
            atk = setup(getattr(lib, name)(model, **kwargs))
            np.random.seed(0)
            torch.manual_seed(0)
            outs.append(atk(xs if lib is torchattacks else xs.contiguous(memory_format=torch.channels_last), y))
        return outs

    assert_equal(*both_libs(base.eval(), x), f"{name} channels_last")
    def dropout_on(atk):
        atk.set_model_training_mode(model_training=True, dropout_training=True)
        return atk

    train = both_libs(base, x, dropout_on)
    assert_equal(*train, f"{name} dropout")
    half = both_libs(base.half().eval(), x.half())
    assert half[1].dtype == torch.float16
    assert_equal(*half, f"{name} fp16")
    np.random.seed(0)
    adv = getattr(fastadv, name)(base.bfloat16(), **kwargs)(x.bfloat16(), y)
    assert adv.dtype == torch.bfloat16 and adv.shape == x.shape
