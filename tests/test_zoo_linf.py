"""MIFGSM, TPGD, EOTPGD, FFGSM and RFGSM against torchattacks 3.5.1, and the MIFGSM kernel.

- Every attack, 'torch' backend: torch.equal to torchattacks with the same seed, on
  both trained models, default and non-default configs, every targeted mode.
- TPGD, EOTPGD, FFGSM, RFGSM step through the Linf kernel: 'interpret' equals 'torch'
  bit for bit.
- MIFGSM's kernel sums |grad| in another order than torch.mean. Per step its
  momentum is within MIFGSM_RTOL[dtype] * (|grad / mean| + |momentum|) of the
  twin's, and the iterate is bit-equal wherever sign(momentum) agrees (where it
  does not, the twin's momentum is itself within that bound of 0).
"""
import math

import pytest
import torch
import torch.nn as nn
import torchattacks

import fastadv
from fastadv import kernels, reference
from fastadv.engine import CrossEntropyGradient
from fastadv.models import SmallCNN
from helpers import assert_equal, poisoned_like

# Per-step bound of the MIFGSM kernel vs its twin, relative to |grad / mean| + |momentum|:
# 8 fp32 ulps (the mean's fp32 sum in another order), 4 ulps in fp16 and bf16 (the
# mean and grad / mean may each round to the neighbouring value).
MIFGSM_RTOL = {torch.float32: 2**-20, torch.float16: 2**-8, torch.bfloat16: 2**-5}

CONFIGS = [
    ("MIFGSM", {}),
    ("MIFGSM", dict(eps=0.1, alpha=0.02, steps=5, decay=0.5)),
    ("TPGD", {}),
    ("TPGD", dict(eps=0.1, alpha=0.03, steps=4)),
    ("EOTPGD", {}),
    ("EOTPGD", dict(eps=0.1, alpha=0.02, steps=3, eot_iter=3, random_start=False)),
    ("FFGSM", {}),
    ("FFGSM", dict(eps=0.2, alpha=0.05)),
    ("RFGSM", {}),
    ("RFGSM", dict(eps=0.1, alpha=0.03, steps=4)),
]
TARGETED = ["MIFGSM", "EOTPGD", "FFGSM", "RFGSM"]
FUNCTIONS = {"MIFGSM": "mifgsm", "TPGD": "tpgd", "EOTPGD": "eotpgd", "FFGSM": "ffgsm", "RFGSM": "rfgsm"}


def config_id(c):
    return c[0] + ("-" + "-".join(f"{k}={v}" for k, v in c[1].items()) if c[1] else "-default")


def set_mode(atk, mode):
    if mode == "random":
        atk.set_mode_targeted_random(quiet=True)
    elif mode == "least_likely":
        atk.set_mode_targeted_least_likely(kth_min=2, quiet=True)
    elif mode == "label":
        atk.set_mode_targeted_by_label(quiet=True)
    elif mode == "function":
        atk.set_mode_targeted_by_function(lambda images, labels: (labels + 3) % 10, quiet=True)
    return atk


def run(lib, name, model, x, y, kwargs, mode=None, seed=1, **extra):
    atk = set_mode(getattr(lib, name)(model, **kwargs, **extra), mode)
    torch.manual_seed(seed)
    return atk(x, y)


@pytest.fixture
def small(batch):
    x, y = batch
    return x[:32], y[:32]


@pytest.fixture
def tiny(batch):
    x, y = batch
    return x[:12], y[:12]


# -- equivalence with torchattacks ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_equals_torchattacks(config, model, small):
    name, kwargs = config
    x, y = small
    expected = run(torchattacks, name, model, x, y, kwargs)
    actual = run(fastadv, name, model, x, y, kwargs, backend="torch")
    assert_equal(actual, expected, name)
    assert not torch.equal(actual, x), "the attack did nothing"


@pytest.mark.parametrize("mode", ["random", "least_likely", "label", "function"])
@pytest.mark.parametrize("name", TARGETED)
def test_targeted_equals_torchattacks(name, mode, model, small):
    x, y = small
    kwargs = dict(steps=3) if name != "FFGSM" else {}
    expected = run(torchattacks, name, model, x, y, kwargs, mode)
    actual = run(fastadv, name, model, x, y, kwargs, mode, backend="torch")
    assert_equal(actual, expected, f"{name} {mode}")


def test_tpgd_is_default_only(model, small):
    atk = fastadv.TPGD(model)
    assert atk.supported_mode == ["default"]
    with pytest.raises(ValueError, match="targeted"):
        atk.set_mode_targeted_by_label(quiet=True)
    x, _ = small
    torch.manual_seed(1)
    expected = torchattacks.TPGD(model)(x)
    torch.manual_seed(1)
    assert_equal(atk(x), expected, "TPGD without labels")


def test_eotpgd_stochastic_model():
    """With dropout active the eot_iter gradients differ; the sum and the RNG use match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    outs = []
    for lib in (torchattacks, fastadv):
        atk = lib.EOTPGD(model, steps=4, eot_iter=3)
        atk.set_model_training_mode(model_training=True, dropout_training=True)
        torch.manual_seed(5)
        outs.append(atk(x, y))
    assert_equal(outs[1], outs[0], "EOTPGD with dropout")


@pytest.mark.parametrize("name", ["MIFGSM", "FFGSM", "TPGD"])
def test_channels_last_three_channels(name):
    """Noise drawn in channels_last order and the per-sample mean over a channels_last gradient."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3).eval()
    x = torch.rand(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (6,))
    expected = run(torchattacks, name, model, x, y, dict(steps=3) if name != "FFGSM" else {})
    actual = run(fastadv, name, model, x, y, dict(steps=3) if name != "FFGSM" else {}, backend="torch")
    assert_equal(actual, expected, f"{name} channels_last")


# -- plain functions, per-sample budgets -------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_function_equals_class(config, trained_models, small):
    name, kwargs = config
    model = trained_models["cnn"]
    x, y = small
    expected = run(fastadv, name, model, x, y, kwargs, backend="torch")
    fn = getattr(fastadv.functional, FUNCTIONS[name])
    torch.manual_seed(1)
    assert_equal(fn(model, x, y, **kwargs, backend="torch"), expected, name)


def test_function_targeted_equals_class_by_label(trained_models, small):
    model = trained_models["mlp"]
    x, y = small
    t = (y + 1) % 10
    for name in TARGETED:
        expected = run(fastadv, name, model, x, t, {}, "label", backend="torch")
        torch.manual_seed(1)
        assert_equal(getattr(fastadv.functional, FUNCTIONS[name])(model, x, t, targeted=True), expected, name)


def test_tpgd_function_without_labels(trained_models, small):
    x, _ = small
    model = trained_models["cnn"]
    torch.manual_seed(1)
    expected = torchattacks.TPGD(model, steps=3)(x)
    torch.manual_seed(1)
    assert_equal(fastadv.functional.tpgd(model, x, steps=3), expected, "tpgd(labels=None)")


@pytest.mark.parametrize("name", ["MIFGSM", "TPGD", "RFGSM", "EOTPGD"])
def test_per_sample_budgets_filled_equal_scalar(name, trained_models, small):
    """[N] tensors holding one value give the scalar result (draws that do not scale by eps)."""
    model = trained_models["cnn"]
    x, y = small
    kwargs = dict(steps=3, random_start=False) if name == "EOTPGD" else dict(steps=3)
    fn = getattr(fastadv.functional, FUNCTIONS[name])
    torch.manual_seed(1)
    expected = fn(model, x, y, eps=0.05, alpha=0.01, **kwargs)
    n = x.shape[0]
    torch.manual_seed(1)
    actual = fn(model, x, y, eps=torch.full((n,), 0.05), alpha=torch.full((n,), 0.01), **kwargs)
    assert_equal(actual, expected, name)


# -- invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_per_sample_eps_ball_and_range(name, model, small):
    x, y = small
    eps = torch.linspace(0.0, 0.3, x.shape[0])
    alpha = 0.05 if name != "RFGSM" else 0.001  # RFGSM's start is not projected
    kwargs = {"steps": 4} if name != "FFGSM" else {}
    torch.manual_seed(1)
    adv = getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, eps=eps, alpha=alpha, **kwargs)
    dist = (adv - x).abs().flatten(1).amax(1)
    assert (dist <= eps + 1e-6).all(), dist - eps
    assert adv.min() >= 0 and adv.max() <= 1 and not adv.isnan().any()
    assert torch.equal(adv[0], x[0]), "eps=0 must leave the sample unchanged"


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_inputs_and_model_state_untouched(name, small):
    torch.manual_seed(0)
    model = SmallCNN().train()
    model.features[0].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = small
    x0, y0 = x.clone(), y.clone()
    for call in (lambda: getattr(fastadv, name)(model, eps=0.1)(x, y),
                 lambda: getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, eps=0.1)):
        adv = call()
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


def test_steps_zero_returns_clean_copy(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    for name, kwargs in (("MIFGSM", dict(steps=0)), ("EOTPGD", dict(steps=0, random_start=False))):
        adv = run(fastadv, name, model, x, y, kwargs)
        assert_equal(adv, x, name)
        assert adv.data_ptr() != x.data_ptr()


# -- bad input ----------------------------------------------------------------------------------

BAD = [
    ("MIFGSM", dict(eps=-0.1), ValueError, "eps"),
    ("MIFGSM", dict(alpha=0.0), ValueError, "alpha"),
    ("MIFGSM", dict(steps=-1), ValueError, "steps"),
    ("MIFGSM", dict(steps=2.5), TypeError, "steps"),
    ("MIFGSM", dict(decay=-0.5), ValueError, "decay"),
    ("MIFGSM", dict(decay=float("nan")), ValueError, "decay"),
    ("MIFGSM", dict(decay=float("inf")), ValueError, "decay"),
    ("MIFGSM", dict(decay="1"), TypeError, "decay"),
    ("TPGD", dict(eps=-1.0), ValueError, "eps"),
    ("TPGD", dict(alpha=-0.01), ValueError, "alpha"),
    ("TPGD", dict(steps=-2), ValueError, "steps"),
    ("EOTPGD", dict(eot_iter=0), ValueError, "eot_iter"),
    ("EOTPGD", dict(eot_iter=1.5), TypeError, "eot_iter"),
    ("EOTPGD", dict(alpha=0), ValueError, "alpha"),
    ("EOTPGD", dict(eps=float("nan")), ValueError, "eps"),
    ("FFGSM", dict(eps=-0.1), ValueError, "eps"),
    ("FFGSM", dict(alpha=0.0), ValueError, "alpha"),
    ("RFGSM", dict(alpha=-1.0), ValueError, "alpha"),
    ("RFGSM", dict(steps=-1), ValueError, "steps"),
    ("RFGSM", dict(eps=None), TypeError, "eps"),
]


@pytest.mark.parametrize("name,kwargs,exc,arg", BAD, ids=[f"{b[0]}-{b[3]}-{b[1][b[3]]}" for b in BAD])
def test_bad_arguments(name, kwargs, exc, arg, trained_models, small):
    model = trained_models["mlp"]
    with pytest.raises(exc, match=arg):
        getattr(fastadv, name)(model, **kwargs)
    x, y = small
    with pytest.raises(exc, match=arg):
        getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **kwargs)


def test_bad_per_sample_eps(trained_models, small):
    model = trained_models["mlp"]
    x, y = small
    with pytest.raises(ValueError, match="eps"):
        fastadv.functional.mifgsm(model, x, y, eps=torch.full((x.shape[0],), -0.1))
    with pytest.raises(ValueError, match="eps"):
        fastadv.functional.ffgsm(model, x, y, eps=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="labels"):
        fastadv.functional.rfgsm(model, x, None)


# -- MIFGSM's all-zero-gradient behaviour --------------------------------------------------------


class DeadZone(nn.Module):
    """Logits of relu(x - 0.5): an image with every pixel <= 0.5 has an all-zero gradient."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(x.flatten(1) - 0.5))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", ["torch", pytest.param("interpret", marks=pytest.mark.interpreter)])
def test_mifgsm_zero_gradient_freezes_sample(backend, small):
    torch.manual_seed(0)
    model = DeadZone().eval()
    x, y = small
    x = x[:8].clone()
    x[2] *= 0.4  # all pixels <= 0.4: zero gradient, mean 0, NaN momentum, sign 0
    y = y[:8]
    expected = torchattacks.MIFGSM(model, steps=4)(x, y)
    actual = fastadv.MIFGSM(model, steps=4, backend=backend)(x, y)
    assert not actual.isnan().any()
    assert torch.equal(actual[2], x[2]), "the zero-gradient sample must stay where it is"
    assert not torch.equal(actual[0], x[0])
    assert_equal(actual, expected, "MIFGSM zero gradient")


# -- interpret backend vs torch backend ----------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [
    ("TPGD", dict(steps=3)),
    ("EOTPGD", dict(steps=3, eot_iter=2)),
    ("FFGSM", {}),
    ("RFGSM", dict(steps=3)),
    ("RFGSM", dict(steps=3, eps=torch.linspace(0.01, 0.1, 12), alpha=torch.linspace(0.005, 0.05, 12))),
    ("EOTPGD", dict(steps=2, eps=torch.linspace(0.01, 0.1, 12))),
], ids=["TPGD", "EOTPGD", "FFGSM", "RFGSM", "RFGSM-per-sample", "EOTPGD-per-sample"])
def test_linf_attacks_interpret_equals_torch(config, model, tiny):
    name, kwargs = config
    x, y = tiny
    fn = getattr(fastadv.functional, FUNCTIONS[name])
    outs = []
    for backend in ("torch", "interpret"):
        torch.manual_seed(1)
        outs.append(fn(model, x, y, **kwargs, backend=backend))
    assert_equal(outs[1], outs[0], name)


@pytest.mark.interpreter
def test_mifgsm_interpret_steps_within_bound(model, tiny):
    """Along a real attack trajectory, each kernel step is within the stated bound of the twin's."""
    k = kernels.interpreted()
    x, y = tiny
    grad_fn = CrossEntropyGradient(model, y)
    adv, momentum = x, torch.zeros_like(x)
    for _ in range(4):
        g = grad_fn(adv)
        expected = reference.mifgsm_step(adv, x, g, momentum, alpha=2 / 255, eps=8 / 255, decay=1.0)
        actual = k.mifgsm_step(adv, x, g, momentum, alpha=2 / 255, eps=8 / 255, decay=1.0,
                               out=poisoned_like(x), momentum_out=poisoned_like(x))
        check_mifgsm_step(actual, expected, g, momentum, 1.0)
        adv, momentum = expected


@pytest.mark.interpreter
def test_mifgsm_interpret_attack(model, tiny):
    """The whole attack through the kernel. Equality here is observed on these digits;
    the guarantee is the per-step bound (a flipped sign would move one pixel by 2 alpha)."""
    x, y = tiny
    outs = [fastadv.MIFGSM(model, steps=5, backend=b)(x, y) for b in ("torch", "interpret")]
    assert_equal(outs[1], outs[0], "MIFGSM interpret vs torch")


# -- engine options ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_engine_channels_last_same_numbers(name):
    """channels_last=True runs on channels_last copies; the noise is still drawn in the
    caller's layout, so the result equals the default run (and torchattacks)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    kwargs = dict(steps=3) if name != "FFGSM" else {}
    expected = run(torchattacks, name, model, x, y, kwargs)
    actual = run(fastadv, name, model, x, y, kwargs, backend="torch", channels_last=True)
    assert actual.is_contiguous()
    assert_equal(actual, expected, f"{name} channels_last engine")


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_engine_early_stop_and_batch_size(name, trained_models, small):
    model = trained_models["cnn"]
    x, y = small
    kwargs = dict(steps=5) if name != "FFGSM" else {}
    for engine in (dict(early_stop=True), dict(batch_size=7)):
        torch.manual_seed(1)
        adv = getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, eps=0.1, **kwargs, **engine)
        assert adv.shape == x.shape and not adv.isnan().any()
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        if engine.get("early_stop") and name != "TPGD":
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y
            assert fooled.sum() >= 1


def test_engine_fast_precision_runs(trained_models, small):
    model = trained_models["cnn"]
    x, y = small
    for name in FUNCTIONS:
        kwargs = dict(steps=2) if name != "FFGSM" else {}
        adv = getattr(fastadv, name)(model, precision="bf16", **kwargs)(x, y)
        assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and not adv.isnan().any()


# -- MIFGSM kernel vs twin -----------------------------------------------------------------------

SHAPES = [(1, 1, 1, 1), (1, 3, 7, 5), (3, 3, 7, 5), (5, 1, 8, 8), (2, 37)]
# Samples above kernels.mifgsm.MAX_ROW = 4096 elements take the two-launch tiled path
# (slow in the interpreter, whose tl.reduce runs element by element: a few cases only).
TILED = [
    ((2, 1, 1, 4097), torch.float32, False),
    ((1, 3, 37, 41), torch.float16, True),
    ((1, 1, 1, 4099), torch.bfloat16, False),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_mifgsm_step(actual, expected, grad, momentum, decay):
    (adv_k, mom_k), (adv_t, mom_t) = actual, expected
    dtype = adv_t.dtype
    assert not adv_k.isnan().any(), "NaN or unwritten element in the iterate"
    # NaN momentum only where the twin has it too (an all-zero gradient); else unwritten.
    assert torch.equal(mom_k.isnan(), mom_t.isnan()), "NaN or unwritten element in the momentum"
    dims = tuple(range(1, grad.dim()))
    normalized = (grad.double() / grad.double().abs().mean(dim=dims, keepdim=True)).abs()
    bound = MIFGSM_RTOL[dtype] * (normalized + mom_t.double().abs())
    diff = (mom_k.double() - mom_t.double()).abs().nan_to_num(0.0)
    assert (diff <= bound.nan_to_num(0.0)).all(), f"momentum off by {(diff / bound).max().item():.3g} x the bound"
    same_sign = mom_k.sign() == mom_t.sign()
    assert (mom_t.double().abs()[~same_sign] <= bound[~same_sign]).all()
    assert_equal(torch.where(same_sign, adv_k, adv_t), adv_t, "iterate where sign(momentum) agrees")
    return int((~same_sign).sum())


def mifgsm_inputs(shape, dtype, channels_last, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x = torch.rand(shape, generator=g)
    adv = (x + (torch.rand(shape, generator=g) * 2 - 1) * 0.05).clamp(0, 1)
    scale = torch.logspace(-6, 1, n).reshape(n, *([1] * (len(shape) - 1)))
    grad = torch.randn(shape, generator=g) * scale
    if grad[0].numel() > 1:
        grad.view(n, -1)[:, 0] = 0.0  # sign(0) = 0; never the whole sample (tested separately)
    momentum = torch.randn(shape, generator=g) * 3
    ts = [t.to(dtype) for t in (adv, x, grad, momentum)]
    if channels_last:
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    return [t.to(device) for t in ts]


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,dtype,channels_last", [
    *[(s, d, c) for s in SHAPES for d in DTYPES for c in (False, True) if len(s) == 4 or not c], *TILED,
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", "")
   if not isinstance(v, bool) else ("channels_last" if v else "contiguous"))
def test_mifgsm_kernel_vs_twin(shape, dtype, channels_last):
    from fastadv.kernels import mifgsm as module

    if shape[1:] in [t[0][1:] for t in TILED]:
        assert math.prod(shape[1:]) > module.MAX_ROW, "the TILED shapes must take the tiled path"
    k = kernels.interpreted()
    adv, x, grad, momentum = mifgsm_inputs(shape, dtype, channels_last, seed=len(shape) + shape[0])
    n = shape[0]
    flips = 0
    for eps, alpha, decay in [
        (8 / 255, 2 / 255, 1.0),
        (torch.linspace(0.0, 0.1, n), torch.linspace(0.001, 0.03, n), 0.7),
        (0.03, 0.01, 0.0),
    ]:
        expected = reference.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay)
        actual = k.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay,
                               out=poisoned_like(adv), momentum_out=poisoned_like(adv))
        flips += check_mifgsm_step(actual, expected, grad, momentum, decay)
        if channels_last:
            assert actual[0].is_contiguous(memory_format=torch.channels_last)
    assert flips == 0, f"{flips} sign flips (allowed by the bound, but not expected on random data)"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mifgsm_kernel_first_step_exact(dtype):
    """With zero momentum, sign(grad / mean) = sign(grad): the first step is bit-exact."""
    k = kernels.interpreted()
    adv, x, grad, _ = mifgsm_inputs((4, 3, 7, 5), dtype, False, seed=3)
    zero = torch.zeros_like(x)
    adv_k, _ = k.mifgsm_step(adv, x, grad, zero, alpha=2 / 255, eps=8 / 255, out=poisoned_like(x))
    adv_t, _ = reference.mifgsm_step(adv, x, grad, zero, alpha=2 / 255, eps=8 / 255)
    assert_equal(adv_k, adv_t, "first step")


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mifgsm_kernel_zero_gradient(dtype):
    """An all-zero gradient: NaN momentum in both, the iterate unchanged, no NaN in it."""
    k = kernels.interpreted()
    adv, x, grad, momentum = mifgsm_inputs((3, 2, 5, 3), dtype, False, seed=4)
    grad[1] = 0
    adv_k, mom_k = k.mifgsm_step(adv, x, grad, momentum, alpha=0.02, eps=0.1,
                                 out=poisoned_like(x), momentum_out=poisoned_like(x))
    adv_t, mom_t = reference.mifgsm_step(adv, x, grad, momentum, alpha=0.02, eps=0.1)
    assert mom_k[1].isnan().all() and mom_t[1].isnan().all()
    assert not adv_k.isnan().any()
    assert_equal(adv_k[1], adv_t[1], "frozen sample")
    # adv_t[1] is adv[1] projected (already inside the ball and [0, 1]).
    assert_equal(adv_k[1], adv[1], "frozen sample moved")
    assert math.isfinite(mom_k[0].double().abs().max().item())


def test_mifgsm_twin_is_reference_arithmetic():
    """The twin, op for op, against torchattacks' expressions on one step (fp32, fp16, bf16)."""
    for dtype in DTYPES:
        adv, x, grad, momentum = mifgsm_inputs((3, 3, 7, 5), dtype, False, seed=7)
        g = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
        g = g + momentum * 0.9
        a = adv.detach() + (2 / 255) * g.sign()
        delta = torch.clamp(a - x, min=-8 / 255, max=8 / 255)
        a = torch.clamp(x + delta, min=0, max=1)
        adv_t, mom_t = reference.mifgsm_step(adv, x, grad, momentum, alpha=2 / 255, eps=8 / 255, decay=0.9)
        assert_equal(adv_t, a, f"iterate {dtype}")
        assert_equal(mom_t, g, f"momentum {dtype}")


# -- compiled kernels on CUDA (marked gpu: skipped without a CUDA device) ----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (128, 3, 32, 32), (7, 3, 65, 67), (4, 3, 224, 224)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_mifgsm_compiled_kernel_vs_twin(shape, dtype, channels_last):
    k = kernels.compiled()
    adv, x, grad, momentum = mifgsm_inputs(shape, dtype, channels_last, seed=1, device="cuda")
    n = shape[0]
    per_sample = (torch.linspace(0.0, 0.1, n, device="cuda"), torch.linspace(0.001, 0.03, n, device="cuda"), 0.7)
    for eps, alpha, decay in [(8 / 255, 2 / 255, 1.0), per_sample]:
        expected = reference.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay)
        actual = k.mifgsm_step(adv, x, grad, momentum, alpha=alpha, eps=eps, decay=decay,
                               out=poisoned_like(adv), momentum_out=poisoned_like(adv))
        check_mifgsm_step(actual, expected, grad, momentum, decay)
    zero = grad.clone()
    zero[0] = 0
    adv_k, _ = k.mifgsm_step(adv, x, zero, momentum, alpha=0.02, eps=0.1, out=poisoned_like(adv))
    adv_t, _ = reference.mifgsm_step(adv, x, zero, momentum, alpha=0.02, eps=0.1)
    assert not adv_k.isnan().any()
    assert_equal(adv_k[0], adv_t[0], "zero-gradient sample on CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_cuda_attacks_vs_torchattacks(name, trained_models, batch, deterministic_cuda):
    """MLP on CUDA (deterministic kernels): 'triton' (with CUDA graphs) vs torchattacks on CUDA."""
    import copy

    model = copy.deepcopy(trained_models["mlp"]).cuda()
    x, y = (t.cuda() for t in batch)
    expected = run(torchattacks, name, model, x, y, {})
    if name == "MIFGSM":
        assert_equal(run(fastadv, name, model, x, y, {}, backend="torch"), expected, "MIFGSM twin on CUDA")
        actual = run(fastadv, name, model, x, y, {}, backend="triton")
        assert (actual - x).abs().max() <= 8 / 255 + 1e-6
        assert (actual == expected).float().mean() >= 0.99, "the kernel's bound allows rare sign flips only"
    else:
        assert_equal(run(fastadv, name, model, x, y, {}, backend="triton"), expected, name)
