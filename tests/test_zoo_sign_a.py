"""BIM, UPGD, DIFGSM, TIFGSM, NIFGSM, SINIFGSM, VMIFGSM and VNIFGSM against torchattacks 3.5.1.

- 'torch' backend (the CPU default): torch.equal to torchattacks with the same seed
  (the input diversity draws from torch's CPU generator, the neighbours from the
  device's), on both trained digits models, default and non-default configs, every
  targeted mode, every UPGD loss.
- TIFGSM's reference convolves with groups=3: it is compared on 3-channel 16x16
  images that a wrapper averages and pools back to 8x8 for the trained digits model
  (the same wrapper lets DIFGSM's resize_rate > 1 enlarge the input).
- BIM steps through the Linf kernel: 'interpret' equals 'torch' bit for bit.
- Where the reference crashes (TIFGSM on 1 or 4 channels, DIFGSM with resize_rate > 1
  on a fixed-size model, non-square images, resize_rate 1), fastadv works or raises
  a clear ValueError.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

import fastadv
from fastadv.attacks.difgsm import smoothing_kernel
from fastadv.models import SmallCNN
from helpers import assert_equal
from test_zoo_linf import run, set_mode

NAMES = ["BIM", "UPGD", "DIFGSM", "TIFGSM", "NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM"]
FUNCTIONS = {name: name.lower() for name in NAMES}


class Pooled(nn.Module):
    """A trained digits model behind a channel mean and an adaptive pool to 8x8: it takes
    images of any size and channel count (the reference's TIFGSM needs 3 channels;
    DIFGSM with resize_rate > 1 enlarges the input)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(F.adaptive_avg_pool2d(z.mean(1, keepdim=True), 8))


def rgb16(x):
    """Digits as 3-channel 16x16 images (nearest upsampling), which Pooled maps back exactly."""
    return F.interpolate(x, scale_factor=2, mode="nearest").repeat(1, 3, 1, 1)


# (name, kwargs, input kind): 'digits' feeds the model 1x8x8 digits, 'pooled' and 'rgb16'
# wrap it in Pooled with 1x8x8 and 3x16x16 inputs.
CONFIGS = [
    ("BIM", {}, "digits"),
    ("BIM", dict(eps=0.1, alpha=0.02, steps=0), "digits"),  # steps=0: the paper's count (29)
    ("UPGD", {}, "digits"),
    ("UPGD", dict(eps=0.1, alpha=0.02, steps=4, random_start=True, loss="margin", decay=0.5, eot_iter=2), "digits"),
    ("UPGD", dict(eps=0.1, alpha=0.03, steps=4, random_start=True, loss="dlr"), "digits"),
    ("DIFGSM", {}, "digits"),
    ("DIFGSM", dict(eps=0.1, alpha=0.02, steps=5, decay=1.0, resize_rate=1.3, diversity_prob=0.8, random_start=True),
     "pooled"),
    ("TIFGSM", {}, "rgb16"),
    ("TIFGSM", dict(kernel_name="linear", len_kernel=5, decay=1.0, steps=5, random_start=True), "rgb16"),
    ("TIFGSM", dict(kernel_name="uniform", len_kernel=7, resize_rate=0.7, diversity_prob=1.0, steps=4), "rgb16"),
    ("TIFGSM", dict(len_kernel=9, nsig=2, steps=4), "rgb16"),
    ("NIFGSM", {}, "digits"),
    ("NIFGSM", dict(eps=0.1, alpha=0.03, steps=5, decay=0.6), "digits"),
    ("SINIFGSM", {}, "digits"),
    ("SINIFGSM", dict(eps=0.1, alpha=0.03, steps=4, decay=0.5, m=3), "digits"),
    ("VMIFGSM", {}, "digits"),
    ("VMIFGSM", dict(eps=0.1, alpha=0.03, steps=4, decay=0.5, N=3, beta=2.0), "digits"),
    ("VNIFGSM", {}, "digits"),
    ("VNIFGSM", dict(eps=0.1, alpha=0.03, steps=4, decay=0.5, N=3, beta=2.0), "digits"),
]
# Small budgets for the targeted modes; TIFGSM on the 3-channel inputs.
TARGETED = {
    "BIM": ({"steps": 3}, "digits"),
    "UPGD": ({"steps": 3, "random_start": True}, "digits"),
    "DIFGSM": ({"steps": 3, "decay": 1.0}, "digits"),
    "TIFGSM": ({"steps": 3, "len_kernel": 7}, "rgb16"),
    "NIFGSM": ({"steps": 3}, "digits"),
    "SINIFGSM": ({"steps": 3, "m": 2}, "digits"),
    "VMIFGSM": ({"steps": 3, "N": 2}, "digits"),
    "VNIFGSM": ({"steps": 3, "N": 2}, "digits"),
}


def config_id(c):
    return c[0] + ("-" + "-".join(f"{k}={v}" for k, v in c[1].items()) if c[1] else "-default")


def inputs(kind, model, x):
    if kind == "digits":
        return model, x
    return Pooled(model).eval(), (rgb16(x) if kind == "rgb16" else x)


@pytest.fixture
def small(batch):
    x, y = batch
    return x[:24], y[:24]


# -- equivalence with torchattacks ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_equals_torchattacks(config, model, small):
    name, kwargs, kind = config
    net, x = inputs(kind, model, small[0])
    y = small[1]
    expected = run(torchattacks, name, net, x, y, kwargs)
    actual = run(fastadv, name, net, x, y, kwargs, backend="torch")
    assert_equal(actual, expected, name)
    assert not torch.equal(actual, x), "the attack did nothing"


@pytest.mark.parametrize("mode", ["random", "least_likely", "label", "function"])
@pytest.mark.parametrize("name", NAMES)
def test_targeted_equals_torchattacks(name, mode, model, small):
    kwargs, kind = TARGETED[name]
    net, x = inputs(kind, model, small[0])
    y = small[1]
    expected = run(torchattacks, name, net, x, y, kwargs, mode)
    actual = run(fastadv, name, net, x, y, kwargs, mode, backend="torch")
    assert_equal(actual, expected, f"{name} {mode}")


@pytest.mark.parametrize("loss", ["margin", "dlr"])
def test_upgd_targeted_losses_equal_torchattacks(loss, trained_models, small):
    """The margin and DLR losses have their own targeted forms (DLR reads the true labels too)."""
    x, y = small
    for model in trained_models.values():
        for mode in ("random", "least_likely"):
            kwargs = dict(steps=4, loss=loss, eot_iter=2, decay=0.7)
            expected = run(torchattacks, "UPGD", model, x, y, kwargs, mode)
            actual = run(fastadv, "UPGD", model, x, y, kwargs, mode, backend="torch")
            assert_equal(actual, expected, f"UPGD {loss} {mode}")
    if loss == "margin":  # the plain function: labels are the targets
        t = (y + 1) % 10
        expected = run(fastadv, "UPGD", model, x, t, dict(steps=4, loss=loss), "label")
        torch.manual_seed(1)
        assert_equal(fastadv.functional.upgd(model, x, t, steps=4, loss=loss, targeted=True), expected, "upgd()")
        torch.manual_seed(1)
        early = fastadv.functional.upgd(model, x, t, steps=4, loss=loss, targeted=True, early_stop=True)
        reached = model(early).argmax(1) == t
        assert_equal(early[~reached], expected[~reached], "upgd() early_stop")


def test_upgd_callable_loss_equals_torchattacks(trained_models, small):
    """A user loss gets (images, labels, target_labels) and calls the model, as in the reference."""
    x, y = small
    model = trained_models["cnn"]

    def loss(images, labels, target_labels):
        logits = model(images)
        return (logits.logsumexp(1) - logits.gather(1, labels[:, None])[:, 0]).sum()

    expected = run(torchattacks, "UPGD", model, x, y, dict(steps=3, loss=loss))
    actual = run(fastadv, "UPGD", model, x, y, dict(steps=3, loss=loss), backend="torch")
    assert_equal(actual, expected, "UPGD callable loss")


@pytest.mark.parametrize("name", ["UPGD", "DIFGSM", "NIFGSM", "VMIFGSM"])
def test_bf16_model_equals_torchattacks(name, trained_models, small):
    """bf16 images and model: the reference's ops in bf16, and fastadv's the same. (The
    reference's BIM turns the iterate into fp32 with its .float() masks, and its TIFGSM
    convolves with an fp32 kernel: both crash on a bf16 model; fastadv keeps the images' dtype.)"""
    kwargs, kind = TARGETED[name]
    net, x = inputs(kind, trained_models["mlp"], small[0])
    net, x = net.to(torch.bfloat16), x.to(torch.bfloat16)
    expected = run(torchattacks, name, net, x, small[1], kwargs)
    actual = run(fastadv, name, net, x, small[1], kwargs, backend="torch")
    assert actual.dtype == torch.bfloat16
    assert_equal(actual, expected, f"{name} bf16")


@pytest.mark.parametrize("name", ["TIFGSM", "VMIFGSM", "DIFGSM"])
def test_channels_last_and_batch_one(name, trained_models, small):
    """Noise drawn in the images' layout (channels_last), and a batch of one."""
    kwargs, _ = TARGETED[name]
    net, x = inputs("rgb16", trained_models["cnn"], small[0])
    y = small[1]
    for xs, ys in ((x.contiguous(memory_format=torch.channels_last), y), (x[:1], y[:1])):
        expected = run(torchattacks, name, net, xs, ys, kwargs)
        actual = run(fastadv, name, net, xs, ys, kwargs, backend="torch")
        assert_equal(actual, expected, f"{name} {tuple(xs.shape)}")
        assert actual.is_contiguous(memory_format=torch.channels_last) == xs.is_contiguous(
            memory_format=torch.channels_last) or xs.shape[0] == 1


@pytest.mark.parametrize("kernel_name", ["gaussian", "linear", "uniform"])
@pytest.mark.parametrize("length,nsig", [(15, 3), (5, 1), (9, 2.5), (1, 3)])
def test_tifgsm_kernels_equal_reference(kernel_name, length, nsig, trained_models):
    ref = torchattacks.TIFGSM(trained_models["mlp"], kernel_name=kernel_name, len_kernel=length, nsig=nsig)
    ours = fastadv.TIFGSM(trained_models["mlp"], kernel_name=kernel_name, len_kernel=length, nsig=nsig)
    assert_equal(ours.stacked_kernel, ref.stacked_kernel, kernel_name)
    assert_equal(smoothing_kernel(kernel_name, length, nsig)[0], ref.stacked_kernel[0], kernel_name)


# -- plain functions, the Linf kernel -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_function_equals_class(name, trained_models, small):
    kwargs, kind = TARGETED[name]
    net, x = inputs(kind, trained_models["cnn"], small[0])
    y = small[1]
    t = (y + 1) % 10
    fn = getattr(fastadv.functional, FUNCTIONS[name])
    for labels, mode, extra in ((y, None, {}), (t, "label", {"targeted": True})):
        expected = run(fastadv, name, net, x, labels, kwargs, mode)
        torch.manual_seed(1)
        assert_equal(fn(net, x, labels, **kwargs, **extra), expected, f"{name} {mode}")


def test_per_sample_eps_filled_equals_scalar(trained_models, small):
    model = trained_models["cnn"]
    x, y = small
    n = x.shape[0]
    for name in ("BIM", "UPGD", "DIFGSM", "NIFGSM"):
        fn = getattr(fastadv.functional, FUNCTIONS[name])
        torch.manual_seed(1)
        expected = fn(model, x, y, eps=0.05, steps=3)
        torch.manual_seed(1)
        assert_equal(fn(model, x, y, eps=torch.full((n,), 0.05), steps=3), expected, name)
    eps = torch.linspace(0, 0.2, n)
    adv = fastadv.functional.bim(model, x, y, eps=eps, alpha=0.05, steps=4)
    assert ((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all() and torch.equal(adv[0], x[0])


@pytest.mark.interpreter
def test_bim_interpret_equals_torch(trained_models, small):
    x, y = small
    for model in trained_models.values():
        expected = run(fastadv, "BIM", model, x, y, dict(steps=4, eps=0.1, alpha=0.03), backend="torch")
        actual = run(fastadv, "BIM", model, x, y, dict(steps=4, eps=0.1, alpha=0.03), backend="interpret")
        assert_equal(actual, expected, "BIM interpret")


# -- early stopping -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("BIM", {}), ("UPGD", {}), ("UPGD", {"loss": "margin"})])
def test_early_stop_keeps_first_fooling_iterate(name, kwargs, trained_models, small):
    """Samples that never fool end where the full run ends (the full batch's loss scale);
    the others return an iterate that fools the model."""
    model = trained_models["cnn"]
    x, y = small
    kwargs = dict(kwargs, eps=0.05, alpha=0.01, steps=6)
    full = run(fastadv, name, model, x, y, kwargs)
    early = run(fastadv, name, model, x, y, kwargs, early_stop=True)
    fooled = model(early).argmax(1) != y
    assert 0 < int(fooled.sum()) < x.shape[0]
    assert_equal(early[~fooled], full[~fooled], f"{name} early stop")


@pytest.mark.parametrize("name", ["DIFGSM", "TIFGSM", "NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM"])
def test_early_stop_refused(name, trained_models, small):
    x, y = small
    kwargs = {"len_kernel": 5} if name == "TIFGSM" else {}
    with pytest.raises(ValueError, match=f"{name} does not support early_stop"):
        getattr(fastadv, name)(trained_models["cnn"], early_stop=True, **kwargs)(x, y)


# -- where the reference crashes ------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 4])
def test_tifgsm_any_channel_count(channels, trained_models, small):
    """The reference's groups=3 convolution crashes; here each channel is smoothed alike:
    with identical channels the result equals the 3-channel run's first channel."""
    net = Pooled(trained_models["cnn"]).eval()
    x3, y = rgb16(small[0]), small[1]
    x = x3[:, :1].repeat(1, channels, 1, 1)
    kwargs = dict(steps=3, len_kernel=7, diversity_prob=0.0)
    with pytest.raises(RuntimeError):
        run(torchattacks, "TIFGSM", net, x, y, kwargs)
    adv = run(fastadv, "TIFGSM", net, x, y, kwargs)
    adv3 = run(fastadv, "TIFGSM", net, x3, y, kwargs)
    # The channel mean's gradient is the same for every channel; only its scale (1/C) differs,
    # which the mean(|g|) normalization removes up to rounding: compare the signs of the steps.
    assert torch.equal(torch.sign(adv - x)[:, :1], torch.sign(adv3 - x3)[:, :1])


def test_difgsm_fixed_size_model_error(trained_models, small):
    x, y = small
    with pytest.raises(RuntimeError):
        run(torchattacks, "DIFGSM", trained_models["cnn"], x, y, dict(resize_rate=1.5, diversity_prob=1.0, steps=2))
    with pytest.raises(ValueError, match="fixed input size"):
        run(fastadv, "DIFGSM", trained_models["cnn"], x, y, dict(resize_rate=1.5, diversity_prob=1.0, steps=2))


@pytest.mark.parametrize("make,match", [
    (lambda m: fastadv.DIFGSM(m, resize_rate=1.0), "resize_rate"),
    (lambda m: fastadv.DIFGSM(m, resize_rate=0.0), "resize_rate"),
    (lambda m: fastadv.DIFGSM(m, diversity_prob=1.5), "diversity_prob"),
    (lambda m: fastadv.DIFGSM(m, decay=-1.0), "decay"),
    (lambda m: fastadv.TIFGSM(m, kernel_name="box"), "kernel_name"),
    (lambda m: fastadv.TIFGSM(m, len_kernel=4), "len_kernel"),
    (lambda m: fastadv.TIFGSM(m, len_kernel=0), "len_kernel"),
    (lambda m: fastadv.TIFGSM(m, nsig=0), "nsig"),
    (lambda m: fastadv.SINIFGSM(m, m=0), "m"),
    (lambda m: fastadv.VMIFGSM(m, N=0), "N"),
    (lambda m: fastadv.VNIFGSM(m, N=-2), "N"),
    (lambda m: fastadv.VMIFGSM(m, beta=-1.0), "beta"),
    (lambda m: fastadv.UPGD(m, loss="hinge"), "loss"),
    (lambda m: fastadv.UPGD(m, eot_iter=0), "eot_iter"),
    (lambda m: fastadv.BIM(m, steps=-1), "steps"),
    (lambda m: fastadv.BIM(m, alpha=0), "alpha"),
    (lambda m: fastadv.NIFGSM(m, eps=-0.1), "eps"),
])
def test_bad_arguments(make, match, trained_models):
    with pytest.raises(ValueError, match=match):
        make(trained_models["mlp"])


@pytest.mark.parametrize("make,x,match", [
    (lambda m: fastadv.DIFGSM(m, resize_rate=1.05), torch.rand(2, 1, 8, 8), "resize_rate"),
    (lambda m: fastadv.DIFGSM(m, resize_rate=0.1), torch.rand(2, 1, 8, 8), "resize_rate"),
    (lambda m: fastadv.DIFGSM(m), torch.rand(2, 64), "N, C, H, W"),
])
def test_bad_images_for_diversity(make, x, match, trained_models):
    with pytest.raises(ValueError, match=match):
        make(Pooled(trained_models["mlp"]) if x.dim() == 4 else trained_models["mlp"])(x, torch.zeros(2).long())


def test_type_errors(trained_models):
    model = trained_models["mlp"]
    for make, arg in ((lambda: fastadv.TIFGSM(model, len_kernel=5.0), "len_kernel"),
                      (lambda: fastadv.VMIFGSM(model, N=2.5), "N"),
                      (lambda: fastadv.SINIFGSM(model, m=True), "m")):
        with pytest.raises(TypeError, match=arg):
            make()
    with pytest.raises(TypeError, match="callable"):
        fastadv.functional.upgd(model, torch.rand(2, 1, 8, 8), torch.zeros(2).long(), loss=lambda *a: 0)
    with pytest.raises(ValueError, match="dlr"):
        fastadv.functional.upgd(model, torch.rand(2, 1, 8, 8), torch.zeros(2).long(), loss="dlr", targeted=True)
    with pytest.raises(ValueError, match="steps=0"):
        fastadv.functional.bim(model, torch.rand(2, 1, 8, 8), torch.zeros(2).long(), eps=torch.full((2,), 0.1), steps=0)


def test_upgd_dlr_needs_three_classes(small):
    x, y = small
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match="at least 3"):
        fastadv.UPGD(model, loss="dlr", steps=1)(x, y % 2)


# -- invariants ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inputs_and_model_state_untouched(name, small):
    torch.manual_seed(0)
    model = Pooled(SmallCNN()).train()
    model.model.features[0].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = small
    x0, y0 = x.clone(), y.clone()
    kwargs = dict(TARGETED[name][0], eps=0.1)
    kwargs = dict(kwargs, len_kernel=5) if name == "TIFGSM" else kwargs
    for call in (lambda: getattr(fastadv, name)(model, **kwargs)(x, y),
                 lambda: getattr(fastadv.functional, FUNCTIONS[name])(model, x, y, **kwargs)):
        adv = call()
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


def test_numpy_rng_untouched(trained_models, small):
    """The kernels come from numpy without drawing from its generator."""
    np.random.seed(3)
    before = np.random.get_state()[1].copy()
    fastadv.TIFGSM(Pooled(trained_models["mlp"]), len_kernel=5)(rgb16(small[0]), small[1])
    assert np.array_equal(np.random.get_state()[1], before)


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that would block the host on a device tensor."""

    SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_per_step(name, trained_models, small):
    """The loops never read a tensor on the host per step; the input diversity reads its
    four CPU-generator draws (3 sizes, 1 coin), which stay on the CPU whatever the device."""
    net, x = inputs("pooled", trained_models["cnn"], small[0])
    kwargs = {"len_kernel": 5} if name == "TIFGSM" else {}
    counts = []
    for steps in (2, 5):
        with SyncCounter() as counter:
            getattr(fastadv, name)(net, steps=steps, **kwargs)(x, small[1])
        counts.append(counter.count)
    per_step = 4 if name in ("DIFGSM", "TIFGSM") else 0
    assert counts[1] - counts[0] == 3 * per_step, counts


@pytest.mark.parametrize("name", ["DIFGSM", "TIFGSM"])
def test_odd_image_size_equals_torchattacks(name, trained_models, small):
    """11x11 images: the drawn side lies in [9, 11), the padding fills the rest."""
    net = Pooled(trained_models["mlp"]).eval()
    x = F.interpolate(small[0], size=(11, 11), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    kwargs = dict(steps=3, decay=1.0, diversity_prob=0.9, len_kernel=5) if name == "TIFGSM" else dict(steps=3)
    expected = run(torchattacks, name, net, x, small[1], kwargs)
    assert_equal(run(fastadv, name, net, x, small[1], kwargs, backend="torch"), expected, f"{name} 11x11")


@pytest.mark.parametrize("name", ["DIFGSM", "TIFGSM"])
@pytest.mark.parametrize("size", [(12, 16), (16, 12)], ids=["wide", "tall"])
@pytest.mark.parametrize("rate", [0.9, 1.2])
def test_non_square_equals_torchattacks(name, size, rate, trained_models, small):
    """The reference draws every size from the width and resizes to squares: a model that pools
    adaptively takes them, and fastadv answers the same bits."""
    net = Pooled(trained_models["cnn"]).eval()
    x = F.interpolate(small[0], size=size, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    kwargs = dict(steps=3, decay=1.0, resize_rate=rate, diversity_prob=0.8)
    if name == "TIFGSM":
        kwargs["len_kernel"] = 5
    expected = run(torchattacks, name, net, x, small[1], kwargs)
    assert_equal(run(fastadv, name, net, x, small[1], kwargs, backend="torch"), expected, f"{name} {size}")


def test_tifgsm_kernel_larger_than_image_equals_torchattacks(trained_models, small):
    """The default 15-tap kernel on 5x7 images: 'same' zero padding, as the reference's conv2d."""
    net = Pooled(trained_models["mlp"]).eval()
    x = F.interpolate(small[0], size=(5, 7), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    expected = run(torchattacks, "TIFGSM", net, x, small[1], dict(steps=3))
    assert_equal(run(fastadv, "TIFGSM", net, x, small[1], dict(steps=3), backend="torch"), expected, "TIFGSM 5x7")


def test_non_square_fixed_size_model_error(trained_models, small):
    """A model with a fixed 8x6 input gets squares from the diversity: the reference crashes
    inside the model, fastadv says why."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    x, y = F.interpolate(small[0], size=(8, 6), mode="bilinear", align_corners=False).clamp(0, 1), small[1]
    with pytest.raises(RuntimeError):
        run(torchattacks, "DIFGSM", net, x, y, dict(diversity_prob=1.0, steps=2))
    with pytest.raises(ValueError, match="squares of their width"):
        run(fastadv, "DIFGSM", net, x, y, dict(diversity_prob=1.0, steps=2))
