"""PIFGSM, PIFGSMPP, Jitter, PGDRS, PGDRSL2, GN, VANILA and SPSA against torchattacks 3.5.1.

- Every attack: torch.equal to torchattacks with the same seed on CPU in fp32, on two
  trained architectures (a CNN and an MLP), default (small budgets where the defaults
  are slow) and non-default configs, untargeted and every targeted mode it supports.
- PIFGSM and PIFGSMPP: the reference's kernels assume 3 channels, so their models are
  trained here on a 3-channel version of digits (the digit, its mirror image, its
  negative); fastadv also runs them on 1-channel digits, where the reference crashes.
- PIFGSMPP and SPSA in targeted mode never compute targets in the reference: they use
  the labels they are given; fastadv does the same (tested for the random mode too).
- Jitter steps through the Linf kernel: 'interpret' equals 'torch' bit for bit.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torchattacks

import fastadv
from fastadv.attacks.pifgsmpp import smoothing_kernels
from fastadv.models import MLP, SmallCNN, train_plain
from helpers import assert_equal
from test_zoo_linf import run  # the seeded call of one library's attack in a targeted mode

FUNCTIONS = {"PIFGSM": "pifgsm", "PIFGSMPP": "pifgsmpp", "Jitter": "jitter", "PGDRS": "pgdrs", "PGDRSL2": "pgdrsl2",
             "GN": "gn", "VANILA": "vanila", "SPSA": "spsa"}
SMALL_SPSA = dict(nb_sample=16, max_batch_size=8)

CONFIGS = [
    ("PIFGSM", {}),
    ("PIFGSM", dict(max_epsilon=0.1, num_iter_set=4, amplification=3.0)),
    ("PIFGSMPP", {}),
    ("PIFGSMPP", dict(max_epsilon=0.1, num_iter_set=5, amplification=4.0, project_factor=0.5)),
    ("Jitter", {}),
    ("Jitter", dict(eps=0.1, alpha=0.02, steps=5, scale=3, std=0, random_start=False)),
    ("PGDRS", dict(steps=4)),
    ("PGDRS", dict(eps=0.1, alpha=0.03, steps=3, noise_type="uniform", noise_sd=0.3, noise_batch_size=3, batch_max=20)),
    ("PGDRSL2", dict(steps=4)),
    ("PGDRSL2", dict(eps=0.5, alpha=0.1, steps=3, noise_type="uniform", noise_sd=0.2, noise_batch_size=4,
                     batch_max=50, eps_for_division=1e-6)),
    ("GN", {}),
    ("GN", dict(std=0.3)),
    ("VANILA", {}),
    ("SPSA", dict(nb_sample=32, max_batch_size=16)),
    ("SPSA", dict(eps=0.1, delta=0.05, lr=0.05, nb_iter=3, nb_sample=20, max_batch_size=8)),
]
THREE_CHANNELS = {"PIFGSM", "PIFGSMPP"}
TARGETED = {"Jitter": ["random", "least_likely", "label", "function"], "PGDRS": ["random", "label", "function"],
            "PGDRSL2": ["random", "least_likely", "label"], "PIFGSMPP": ["random", "label"], "SPSA": ["random", "label"]}
TARGETED_KWARGS = {"Jitter": dict(steps=3), "PGDRS": dict(steps=2, batch_max=40), "PGDRSL2": dict(steps=2),
                   "PIFGSMPP": dict(num_iter_set=4), "SPSA": dict(nb_iter=2, **SMALL_SPSA)}
DEFAULT_ONLY = ["PIFGSM", "GN", "VANILA"]


def config_id(c):
    return c[0] + ("-" + "-".join(f"{k}={v}" for k, v in c[1].items()) if c[1] else "-default")


def three_channels(x):
    """A 3-channel digits image: the digit, its mirror image and its negative."""
    return torch.cat([x, x.flip(-1), 1 - x], dim=1)


@pytest.fixture(scope="module")
def _color_models(digits):
    (x, y), _ = digits
    x3 = three_channels(x)
    torch.manual_seed(0)
    cnn = train_plain(SmallCNN(in_channels=3, width=8), x3[:600], y[:600], epochs=3, seed=0)
    mlp = train_plain(MLP(in_features=192), x3, y, epochs=6, seed=1)
    return {"cnn": cnn, "mlp": mlp}


@pytest.fixture
def models(trained_models, _color_models):
    """(1-channel digits models, 3-channel digits models), fresh copies per test."""
    return trained_models, {k: copy.deepcopy(m).eval() for k, m in _color_models.items()}


def setup(name, arch, models, batch, n=24):
    gray, color = models
    x, y = batch
    x, y = x[:n], y[:n]
    if name in THREE_CHANNELS:
        return color[arch], three_channels(x), y
    return gray[arch], x, y


# -- equivalence with torchattacks ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_equals_torchattacks(config, arch, models, batch):
    name, kwargs = config
    model, x, y = setup(name, arch, models, batch)
    expected = run(torchattacks, name, model, x, y, kwargs)
    reference_rng = torch.get_rng_state()
    actual = run(fastadv, name, model, x, y, kwargs)
    assert_equal(actual, expected, name)
    assert torch.equal(torch.get_rng_state(), reference_rng), "the CPU generator was drawn differently"
    assert name == "VANILA" or not torch.equal(actual, x), "the attack did nothing"


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
@pytest.mark.parametrize("name,mode", [(n, m) for n, modes in TARGETED.items() for m in modes])
def test_targeted_equals_torchattacks(name, mode, arch, models, batch):
    model, x, y = setup(name, arch, models, batch)
    labels = (y + 1) % 10 if mode == "label" else y
    kwargs = TARGETED_KWARGS[name]
    expected = run(torchattacks, name, model, x, labels, kwargs, mode)
    reference_rng = torch.get_rng_state()
    actual = run(fastadv, name, model, x, labels, kwargs, mode)
    assert_equal(actual, expected, f"{name} {mode}")
    assert torch.equal(torch.get_rng_state(), reference_rng), "the CPU generator was drawn differently"


def test_reference_targeted_uses_given_labels(models, batch):
    """PIFGSMPP and SPSA, as the reference: targeted modes descend towards the labels of
    the call; the random mode draws no targets, so it equals the by-label mode."""
    for name in ("PIFGSMPP", "SPSA"):
        model, x, y = setup(name, "mlp", models, batch, n=12)
        by_label = run(fastadv, name, model, x, y, TARGETED_KWARGS[name], "label")
        random = run(fastadv, name, model, x, y, TARGETED_KWARGS[name], "random")
        assert_equal(random, by_label, name)


@pytest.mark.parametrize("name", DEFAULT_ONLY)
def test_default_only(name, trained_models):
    atk = getattr(fastadv, name)(trained_models["mlp"])
    assert atk.supported_mode == ["default"]
    with pytest.raises(ValueError, match="targeted"):
        atk.set_mode_targeted_random(quiet=True)


@pytest.mark.parametrize("name", ["PIFGSM", "PIFGSMPP"])
def test_patchwise_odd_size_and_batch_one(name):
    """Odd image sizes and a batch of 1 (3 channels, where the reference runs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(24, 10)).eval()
    for shape in ((5, 3, 7, 5), (1, 3, 9, 4)):
        x, y = torch.rand(shape), torch.randint(0, 10, (shape[0],))
        expected = run(torchattacks, name, model, x, y, dict(num_iter_set=3))
        assert_equal(run(fastadv, name, model, x, y, dict(num_iter_set=3)), expected, f"{name} {shape}")


def test_pifgsmpp_kernels_are_the_references():
    ref = torchattacks.PIFGSMPP(nn.Linear(1, 1)).gaussian_kern(3, 3)
    assert_equal(smoothing_kernels(3), ref, "3-channel smoothing kernels")
    one = smoothing_kernels(1)[0, 0]
    assert torch.allclose(one.sum(), torch.tensor(1.0)) and torch.equal(one, one.T) and one[1, 1] == one.max()


@pytest.mark.parametrize("name", ["PIFGSM", "PIFGSMPP"])
def test_patchwise_any_channel_count(name, trained_models, batch):
    """1-channel digits, where the reference's 3-channel convolution crashes."""
    x, y = batch
    model = trained_models["cnn"]
    with pytest.raises(RuntimeError):
        torchattacks.PIFGSM(model)(x, y)
    adv = getattr(fastadv, name)(model, max_epsilon=0.1, num_iter_set=4)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).sum() > (model(x).argmax(1) != y).sum()


def test_channels_last_inputs(trained_models, models, batch):
    """Noise drawn in the caller's layout (GN, Jitter) and convolutions on channels_last gradients."""
    x, y = batch
    _, color = models
    for name, model, xs, kwargs in (("GN", trained_models["cnn"], x, {}), ("Jitter", trained_models["cnn"], x, dict(steps=3)),
                                    ("PIFGSMPP", color["cnn"], three_channels(x), dict(num_iter_set=3))):
        xc = xs[:12].contiguous(memory_format=torch.channels_last)
        expected = run(torchattacks, name, model, xc, y[:12], kwargs)
        assert_equal(run(fastadv, name, model, xc, y[:12], kwargs), expected, f"{name} channels_last")


# -- plain functions ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[1] or c[0] in ("GN", "VANILA")], ids=config_id)
def test_function_equals_class(config, models, batch):
    name, kwargs = config
    model, x, y = setup(name, "mlp", models, batch, n=12)
    expected = run(fastadv, name, model, x, y, kwargs)
    torch.manual_seed(1)
    assert_equal(getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **kwargs), expected, name)


def test_function_targeted_equals_class_by_label(models, batch):
    for name in ("Jitter", "PGDRS", "PGDRSL2", "PIFGSMPP", "SPSA"):
        model, x, y = setup(name, "cnn", models, batch, n=12)
        t = (y + 2) % 10
        expected = run(fastadv, name, model, x, t, TARGETED_KWARGS[name], "label")
        torch.manual_seed(1)
        fn = getattr(fastadv.functional, FUNCTIONS[name])
        assert_equal(fn(model, x, t, targeted=True, **TARGETED_KWARGS[name]), expected, name)


def test_labels_optional_for_gn_and_vanila(trained_models, batch):
    x, _ = batch
    model = trained_models["mlp"]
    torch.manual_seed(2)
    expected = torchattacks.GN(model)(x)
    torch.manual_seed(2)
    assert_equal(fastadv.GN(model)(x), expected, "GN without labels")
    torch.manual_seed(2)
    assert_equal(fastadv.functional.gn(model, x), expected, "gn without labels")
    same = fastadv.VANILA(model)(x)
    assert_equal(same, x, "VANILA")
    assert same.data_ptr() != x.data_ptr()
    assert_equal(fastadv.GN(model, std=0)(x), x, "GN std=0")


def test_jitter_per_sample_budgets_filled_equal_scalar(trained_models, batch):
    model = trained_models["cnn"]
    x, y = batch
    torch.manual_seed(1)
    expected = fastadv.functional.jitter(model, x, y, eps=0.05, alpha=0.01, steps=3)
    n = x.shape[0]
    torch.manual_seed(1)
    actual = fastadv.functional.jitter(model, x, y, eps=torch.full((n,), 0.05), alpha=torch.full((n,), 0.01), steps=3)
    assert_equal(actual, expected, "jitter per-sample budgets")


def test_pgdrs_split_matches_reference_chunks(trained_models, batch):
    """batch_max smaller than the batch's noisy copies: the reference's chunks, in order,
    each drawing its random targets and noise; an uneven last chunk."""
    model = trained_models["cnn"]
    x, y = batch
    x, y = x[:23], y[:23]
    for name in ("PGDRS", "PGDRSL2"):
        kwargs = dict(steps=2, noise_batch_size=3, batch_max=16)  # chunks of 5 images: 5, 5, 5, 5, 3
        expected = run(torchattacks, name, model, x, y, kwargs, "random")
        assert_equal(run(fastadv, name, model, x, y, kwargs, "random"), expected, f"{name} split")


# -- interpret backend, engine options ----------------------------------------------------------


@pytest.mark.interpreter
def test_jitter_interpret_equals_torch(trained_models, batch):
    x, y = batch
    outs = []
    for backend in ("torch", "interpret"):
        torch.manual_seed(1)
        outs.append(fastadv.Jitter(trained_models["cnn"], steps=3, backend=backend)(x[:12], y[:12]))
    assert_equal(outs[1], outs[0], "Jitter interpret vs torch")


@pytest.mark.parametrize("name", ["PIFGSM", "PIFGSMPP", "Jitter"])
def test_engine_channels_last_same_numbers(name, models, batch):
    model, x, y = setup(name, "cnn", models, batch, n=12)
    kwargs = dict(steps=3) if name == "Jitter" else dict(num_iter_set=3)
    expected = run(torchattacks, name, model, x, y, kwargs)
    actual = run(fastadv, name, model, x, y, kwargs, channels_last=True)
    assert actual.is_contiguous()
    assert_equal(actual, expected, f"{name} channels_last engine")


@pytest.mark.parametrize("name", ["PIFGSM", "PIFGSMPP", "Jitter", "PGDRS", "PGDRSL2", "SPSA"])
def test_engine_options_run(name, trained_models, batch):
    """early_stop (where it applies), batch_size and bf16 keep the threat model; early
    stopping returns a fooling iterate for some sample."""
    model = trained_models["cnn"]
    x, y = batch
    x, y = x[:16], y[:16]
    budget = {"PIFGSM": ("max_epsilon", 0.1), "PIFGSMPP": ("max_epsilon", 0.1), "PGDRSL2": ("eps", 1.0)}.get(name, ("eps", 0.1))
    kwargs = {budget[0]: budget[1], **({"num_iter_set": 4} if name.startswith("PIFGSM") else
                                       SMALL_SPSA if name == "SPSA" else {"steps": 3})}
    for engine in (dict(early_stop=True), dict(batch_size=5), dict(precision="bf16")):
        torch.manual_seed(1)
        adv = getattr(fastadv, name)(model, **kwargs, **engine)(x, y)
        d = (adv - x).flatten(1)
        dist = d.norm(dim=1) if name == "PGDRSL2" else d.abs().amax(1)
        assert adv.shape == x.shape and torch.isfinite(adv).all() and (dist <= budget[1] + 1e-5).all()
        if engine.get("early_stop") and name in ("PIFGSM", "PIFGSMPP", "Jitter"):
            with torch.no_grad():
                assert (model(adv).argmax(1) != y).sum() >= 1


# -- invariants, bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_inputs_and_model_state_untouched(name, batch):
    """No mutation of the inputs; modes, requires_grad and .grad restored (the reference's
    PIFGSM and PIFGSMPP fill the parameters' .grad; fastadv does not)."""
    torch.manual_seed(0)
    model = SmallCNN().train()
    model.features[0].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = batch
    x, y = x[:8], y[:8]
    x0, y0 = x.clone(), y.clone()
    kwargs = {"PIFGSM": dict(num_iter_set=2), "PIFGSMPP": dict(num_iter_set=2), "SPSA": SMALL_SPSA}.get(name, {})
    kwargs = {**kwargs, **({"steps": 2} if name in ("Jitter", "PGDRS", "PGDRSL2") else {})}
    for call in (lambda: getattr(fastadv, name)(model, **kwargs)(x, y),
                 lambda: getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **kwargs)):
        adv = call()
        assert adv.shape == x.shape and torch.isfinite(adv).all()
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


BAD = [
    ("PIFGSM", dict(num_iter_set=0), ValueError, "num_iter_set"),
    ("PIFGSM", dict(num_iter_set=2.5), TypeError, "num_iter_set"),
    ("PIFGSM", dict(max_epsilon=-0.1), ValueError, "max_epsilon"),
    ("PIFGSM", dict(amplification=float("nan")), ValueError, "amplification"),
    ("PIFGSM", dict(prob=1.5), ValueError, "prob"),
    ("PIFGSMPP", dict(project_factor=-1.0), ValueError, "project_factor"),
    ("PIFGSMPP", dict(momentum="1"), TypeError, "momentum"),
    ("Jitter", dict(steps=-1), ValueError, "steps"),
    ("Jitter", dict(alpha=0), ValueError, "alpha"),
    ("Jitter", dict(scale=0), ValueError, "scale"),
    ("Jitter", dict(std=-0.1), ValueError, "std"),
    ("PGDRS", dict(noise_type="laplace"), ValueError, "noise_type"),
    ("PGDRS", dict(noise_batch_size=0), ValueError, "noise_batch_size"),
    ("PGDRS", dict(noise_batch_size=8, batch_max=4), ValueError, "batch_max"),
    ("PGDRS", dict(noise_sd=-1.0), ValueError, "noise_sd"),
    ("PGDRSL2", dict(eps=-1.0), ValueError, "eps"),
    ("PGDRSL2", dict(eps_for_division=-1e-10), ValueError, "eps_for_division"),
    ("PGDRSL2", dict(steps=1.5), TypeError, "steps"),
    ("GN", dict(std=-0.1), ValueError, "std"),
    ("GN", dict(std=None), TypeError, "std"),
    ("SPSA", dict(nb_sample=0), ValueError, "nb_sample"),
    ("SPSA", dict(max_batch_size=0), ValueError, "max_batch_size"),
    ("SPSA", dict(nb_iter=-1), ValueError, "nb_iter"),
    ("SPSA", dict(delta=0), ValueError, "delta"),
    ("SPSA", dict(lr=-0.01), ValueError, "lr"),
]


@pytest.mark.parametrize("name,kwargs,exc,arg", BAD, ids=[f"{b[0]}-{b[3]}-{b[1][b[3]]}" for b in BAD])
def test_bad_arguments(name, kwargs, exc, arg, trained_models, batch):
    model = trained_models["mlp"]
    with pytest.raises(exc, match=arg):
        getattr(fastadv, name)(model, **kwargs)
    x, y = batch
    with pytest.raises(exc, match=arg):
        getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **kwargs)


def test_patchwise_needs_4d_images(trained_models):
    model = trained_models["mlp"]
    x, y = torch.rand(4, 64), torch.randint(0, 10, (4,))
    for name in ("PIFGSM", "PIFGSMPP"):
        with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
            getattr(fastadv, name)(model)(x, y)


def test_spsa_needs_two_classes(batch):
    x, y = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with pytest.raises(ValueError, match="at least 2"):
        fastadv.SPSA(model, **SMALL_SPSA)(x[:4], torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ["Jitter", "PGDRS", "PGDRSL2", "GN", "SPSA"])
def test_batch_one_equals_torchattacks(name, trained_models, batch):
    x, y = batch
    kwargs = {"Jitter": dict(steps=3), "PGDRS": dict(steps=2), "PGDRSL2": dict(steps=2), "SPSA": SMALL_SPSA}.get(name, {})
    model = trained_models["cnn"]
    expected = run(torchattacks, name, model, x[5:6], y[5:6], kwargs)
    assert_equal(run(fastadv, name, model, x[5:6], y[5:6], kwargs), expected, f"{name} batch 1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images(dtype, trained_models, batch):
    """bf16/fp16 images with a model of the same dtype: Jitter and GN equal the reference;
    the patch-wise attacks run (the reference's fp32 kernels crash on such gradients)."""
    x, y = batch
    x, y = x[:8].to(dtype), y[:8]
    model = SmallCNN().to(dtype).eval()
    model.load_state_dict(trained_models["cnn"].state_dict())
    for name, kwargs in (("Jitter", dict(steps=2)), ("GN", {})):
        expected = run(torchattacks, name, model, x, y, kwargs)
        actual = run(fastadv, name, model, x, y, kwargs)
        assert actual.dtype == dtype
        assert_equal(actual, expected, f"{name} {dtype}")
    for name in ("PIFGSM", "PIFGSMPP"):
        adv = getattr(fastadv, name)(model, max_epsilon=0.1, num_iter_set=2)(x, y)
        assert adv.dtype == dtype and torch.isfinite(adv).all()
        assert (adv.float() - x.float()).abs().max() <= 0.1 + 1e-2 and adv.min() >= 0 and adv.max() <= 1
