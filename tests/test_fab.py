"""FAB: bit-exact with torchattacks 3.5.1 FAB and pyautoattack 0.2.0 FABAttack_PT on CPU."""
import pytest
import torch
import torchattacks
from pyautoattack.fab_pt import FABAttack_PT

import fastadv
from fastadv.attacks.fab import project_l2, project_linf
from fastadv.models import SmallCNN
from helpers import assert_equal

CONFIGS = [
    dict(eps=0.08, steps=10),
    dict(eps=0.08, steps=8, n_restarts=3),
    dict(norm="L2", eps=0.5, steps=8, n_restarts=3),
    dict(eps=0.08, steps=6, n_restarts=2, multi_targeted=True),
    dict(norm="L2", eps=0.5, steps=6, multi_targeted=True),
    dict(eps=0.15, steps=5, alpha_max=0.3, eta=1.2, beta=0.5, seed=7, n_restarts=2),
]


def _success(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(1) != y


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bit_exact_with_torchattacks(cfg, model, batch):
    x, y = batch
    expected = torchattacks.FAB(model, **cfg)(x, y)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    actual = fastadv.FAB(model, **cfg)(x, y)
    assert_equal(actual, expected, f"FAB {cfg}")
    assert torch.equal(torch.get_rng_state(), rng), "FAB changed the global RNG state"
    fooled = _success(model, actual, y)
    assert fooled.any() and not fooled.all(), "the config should fool some points and not others"


@pytest.mark.parametrize("mode", ["set_mode_targeted_random", "set_mode_targeted_least_likely", "set_mode_targeted_by_label"])
def test_targeted_modes_bit_exact(mode, model, batch):
    x, y = batch
    ref, ours = torchattacks.FAB(model, eps=0.1, steps=6, n_restarts=2), fastadv.FAB(model, eps=0.1, steps=6, n_restarts=2)
    getattr(ref, mode)(quiet=True)
    getattr(ours, mode)(quiet=True)
    labels = (y + 3) % 10 if mode == "set_mode_targeted_by_label" else y
    assert_equal(ours(x, labels), ref(x, labels), mode)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.08), ("L2", 0.5)])
@pytest.mark.parametrize("targeted", [False, True])
def test_bit_exact_with_original(norm, eps, targeted, model, batch):
    """pyautoattack's FABAttack_PT (targeted = FAB-T over 9 classes), the one AutoAttack runs."""
    x, y = batch
    ref = FABAttack_PT(model, norm=norm, eps=eps, n_iter=6, n_restarts=2, targeted=targeted, seed=3, device="cpu")
    with torch.no_grad():
        expected = ref.perturb(x, y)
    actual = fastadv.FAB(model, norm=norm, eps=eps, steps=6, n_restarts=2, multi_targeted=targeted, seed=3,
                         arithmetic="original")(x, y)
    assert_equal(actual, expected, f"FABAttack_PT {norm} targeted={targeted}")


def test_plain_function_matches_class(model, batch):
    x, y = batch
    cfg = dict(norm="L2", eps=0.5, steps=5, n_restarts=2, multi_targeted=True)
    assert_equal(fastadv.functional.fab(model, x, y, **cfg), fastadv.FAB(model, **cfg)(x, y))


def test_batch_size_chunks_are_separate_calls(trained_models, batch):
    model = trained_models["mlp"]
    x, y = batch
    cfg = dict(eps=0.1, steps=4, n_restarts=2)
    chunked = fastadv.FAB(model, batch_size=40, **cfg)(x, y)
    parts = [fastadv.FAB(model, **cfg)(x[s:s + 40], y[s:s + 40]) for s in (0, 40)]
    assert_equal(chunked, torch.cat(parts))


def test_result_within_budget(model, batch):
    x, y = batch
    for norm, eps in (("Linf", 0.08), ("L2", 0.5)):
        adv = fastadv.FAB(model, norm=norm, eps=eps, steps=8)(x, y)
        d = (adv - x).flatten(1)
        dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
        assert (dist <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
        # points that are not fooled come back clean
        assert torch.equal(adv[~_success(model, adv, y)], x[~_success(model, adv, y)])


def _random_hyperplanes(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, d, generator=g)
    w = torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) > 0.2)  # some zero normals
    b = torch.randn(n, generator=g) * 2
    return t, w, b


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projections_bit_exact(norm):
    """The sync-free projections equal the reference's, row for row, over all their cases."""
    from torchattacks.attacks.fab import projection_l2, projection_linf

    ref, ours = (projection_linf, project_linf) if norm == "Linf" else (projection_l2, project_l2)
    t, w, b = _random_hyperplanes(400, 37, 0)
    assert_equal(ours(t, w, b), ref(t, w.clone(), b.clone()), f"projection {norm}")


def test_inputs_model_state_and_rng_untouched(batch):
    x, y = batch
    model = SmallCNN()
    model.train()
    model.features[1].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    rng = torch.get_rng_state()
    fastadv.FAB(model, eps=0.1, steps=3, n_restarts=2, multi_targeted=True)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_normalization_round_trip(trained_models, batch):
    """With set_normalization_used, inputs and outputs are normalized and the attack is the same."""
    model = trained_models["mlp"]
    x, y = batch
    mean, std = [0.3], [0.4]

    class Normalized(torch.nn.Module):
        def forward(self, z):
            return model((z - mean[0]) / std[0])

    plain = fastadv.FAB(Normalized(), eps=0.1, steps=5)(x, y)
    atk = fastadv.FAB(model, eps=0.1, steps=5)
    atk.set_normalization_used(mean, std)
    out = atk((x - mean[0]) / std[0], y)
    torch.testing.assert_close(out * std[0] + mean[0], plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm="L1"), "norm"),
        (dict(norm="linf"), "norm"),
        (dict(eps=-0.1), "eps"),
        (dict(n_classes=1), "n_classes"),
        (dict(steps=-1), "steps"),
        (dict(n_restarts=-1), "n_restarts"),
        (dict(alpha_max=1.5), "alpha_max"),
        (dict(beta=2.0), "beta"),
        (dict(eta=0), "eta"),
        (dict(arithmetic="fast"), "arithmetic"),
        (dict(precision="bf16"), "exact mode"),
        (dict(early_stop=True), "exact mode"),
    ],
)
def test_bad_arguments(kwargs, match, trained_models):
    with pytest.raises(ValueError, match=match):
        fastadv.FAB(trained_models["mlp"], **kwargs)


def test_too_many_target_classes(trained_models, batch):
    x, y = batch
    with pytest.raises(ValueError, match="n_classes"):
        fastadv.FAB(trained_models["mlp"], multi_targeted=True, n_classes=11)(x, y)


def test_bad_images(trained_models, batch):
    x, y = batch
    with pytest.raises(ValueError, match="images"):
        fastadv.FAB(trained_models["mlp"])(x + 2, y)
    with pytest.raises(ValueError, match="labels"):
        fastadv.FAB(trained_models["mlp"])(x, y[:3])
