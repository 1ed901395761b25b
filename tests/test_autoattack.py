"""AutoAttack against the original (pyautoattack 0.2.0), and MultiAttack against torchattacks 3.5.1."""
import pytest
import torch
import torchattacks
from pyautoattack import AutoAttack as OriginalAutoAttack
from pyautoattack.state import EvaluationState

import fastadv
from fastadv.attacks.autoattack import VERSION_ATTACKS
from fastadv.models import SmallCNN
from helpers import assert_equal

THREATS = {"Linf": 0.1, "L2": 0.5}


@pytest.fixture
def digits120(digits):
    _, (x, y) = digits
    return x[:120].clone(), y[:120].clone()


def run_original(model, x, y, monkeypatch, *, norm, eps, version="standard", attacks=None, steps=None,
                 n_queries=None, batch_size=250, labels=False):
    """pyautoattack's run_standard_evaluation, with the robust flags it holds after each attack.

    steps sets n_iter as if the sub-attacks had been built with it: pyautoattack derives
    APGD's checkpoint schedule in the constructor, so it is set alongside.
    """
    flags = {}
    add_run_attack = EvaluationState.add_run_attack

    def record(state, attack):
        flags[attack] = state.robust_flags.clone()
        add_run_attack(state, attack)

    monkeypatch.setattr(EvaluationState, "add_run_attack", record)
    kwargs = {"attacks": attacks} if version == "custom" else {}
    aa = OriginalAutoAttack(model, norm=norm, eps=eps, seed=0, version=version, device="cpu", **kwargs)
    if steps is not None:
        for sub in (aa.apgd, aa.apgd_targeted):
            sub.n_iter = steps
            sub.n_iter_2, sub.n_iter_min, sub.size_decr = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))
        aa.fab.n_iter = steps
    if n_queries is not None:
        aa.square.n_queries = n_queries
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return (x_adv, flags, y_adv) if labels else (x_adv, flags)


def assert_agrees(ours, x_ref, flags_ref, x, y, model):
    """Robust accuracy within 0.2 points and per-sample flags agreeing on >= 99% after every attack."""
    names = [e["attack"] for e in ours.report[1:]]
    assert names == list(flags_ref), f"attacks run: {names} vs the original's {list(flags_ref)}"
    for name, ref in flags_ref.items():
        mine = ours.robust_flags[name]
        agree = (mine == ref).float().mean().item()
        gap = abs(mine.float().mean().item() - ref.float().mean().item())
        assert agree >= 0.99, f"after {name}: per-sample robust flags agree on {agree:.2%}"
        assert gap <= 0.002, f"after {name}: robust accuracy differs by {gap:.2%}"
    with torch.no_grad():
        still = model(x_ref).argmax(1) == y
    assert abs(still.float().mean().item() - ours.robust_accuracy) <= 0.002


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_standard_matches_original(norm, model, digits120, monkeypatch):
    x, y = digits120
    eps = THREATS[norm]
    x_ref, flags = run_original(model, x, y, monkeypatch, norm=norm, eps=eps, steps=8, n_queries=100)
    atk = fastadv.AutoAttack(model, norm=norm, eps=eps, seed=0, steps=8, n_queries=100)
    adv = atk(x, y)
    assert_agrees(atk, x_ref, flags, x, y, model)
    # measured: bit-exact on CPU (torch 2.x) for both models and norms
    assert_equal(adv, x_ref, f"AutoAttack standard {norm}")


@pytest.mark.parametrize("version", ["plus", "rand"])
def test_other_versions_match_original(version, trained_models, digits120, monkeypatch):
    model = trained_models["mlp"]
    x, y = digits120[0][:80], digits120[1][:80]
    x_ref, flags = run_original(model, x, y, monkeypatch, norm="L2", eps=0.5, version=version, steps=4, n_queries=60)
    atk = fastadv.AutoAttack(model, norm="L2", eps=0.5, version=version, seed=0, steps=4, n_queries=60)
    atk(x, y)
    assert_agrees(atk, x_ref, flags, x, y, model)


def test_custom_chunked_matches_original(trained_models, digits120, monkeypatch):
    """Chunks of batch_size robust points, each re-seeded, as the original runs them."""
    model = trained_models["cnn"]
    x, y = digits120
    attacks = ["square", "fab", "apgd-dlr"]
    x_ref, flags, y_ref = run_original(model, x, y, monkeypatch, norm="Linf", eps=0.1, version="custom",
                                       attacks=attacks, steps=5, n_queries=80, batch_size=40, labels=True)
    atk = fastadv.AutoAttack(model, norm="Linf", eps=0.1, version="custom", attacks=attacks, seed=0, steps=5,
                             n_queries=80)
    adv, y_adv = atk.run_standard_evaluation(x, y, batch_size=40)
    assert atk.batch_size == 250
    assert_agrees(atk, x_ref, flags, x, y, model)
    assert_equal(adv, x_ref, "AutoAttack custom, chunked")
    assert_equal(y_adv, y_ref, "y_adv")


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_standard_full_defaults_match_original(norm, model, digits, monkeypatch):
    """The full standard version: 100 iterations, 9 targets, 5000 Square queries."""
    _, (x, y) = digits
    x, y = x[:100].clone(), y[:100].clone()
    eps = THREATS[norm]
    x_ref, flags = run_original(model, x, y, monkeypatch, norm=norm, eps=eps)
    atk = fastadv.AutoAttack(model, norm=norm, eps=eps, seed=0)
    adv = atk(x, y)
    assert_agrees(atk, x_ref, flags, x, y, model)
    assert_equal(adv, x_ref, f"AutoAttack standard {norm}, full defaults")  # measured: bit-exact on CPU


def test_report(trained_models, digits120):
    model = trained_models["mlp"]
    x, y = digits120
    atk = fastadv.AutoAttack(model, eps=0.1, steps=3, n_queries=30)
    assert atk.robust_accuracy is None and "not run" in atk.summary()
    adv = atk(x, y)
    report = atk.get_report()
    assert [e["attack"] for e in report] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    accs = [e["robust_accuracy"] for e in report]
    assert accs == sorted(accs, reverse=True) and accs[0] > accs[-1]
    for e in report:
        assert e["time_s"] >= 0 and e["n_robust"] == int(atk.robust_flags[e["attack"]].sum())
        assert e["robust_accuracy"] == e["n_robust"] / len(y)
    with torch.no_grad():
        assert report[-1]["n_robust"] == int((model(adv).argmax(1) == y).sum())
    assert atk.robust_accuracy == report[-1]["robust_accuracy"]
    text = atk.summary()
    assert all(name.upper() in text for name in ("apgd-ce", "apgd-t", "fab-t", "square"))
    report[0]["attack"] = "changed"
    assert atk.report[0]["attack"] == "clean"  # get_report returns a copy


def test_settings_follow_the_original():
    model = SmallCNN()
    for version in ("standard", "plus", "rand"):
        ref = OriginalAutoAttack(model, version=version, device="cpu")
        ours = fastadv.AutoAttack(model, version=version)
        assert ours.attacks_to_run == ref.attacks_to_run == VERSION_ATTACKS[version]
        assert ours.apgd.n_restarts == ref.apgd.n_restarts and ours.apgd.eot_iter == ref.apgd.eot_iter
        assert ours.apgd.n_iter == ref.apgd.n_iter == 100
        assert ours.apgd_targeted.n_target_classes == ref.apgd_targeted.n_target_classes
        assert ours.apgd_targeted.n_restarts == ref.apgd_targeted.n_restarts
        assert ours.fab.n_restarts == ref.fab.n_restarts and ours.fab.n_target_classes == ref.fab.n_target_classes
        assert ours.square.n_queries == ref.square.n_queries and ours.square.rescale_schedule == ref.square.rescale_schedule
    # torchattacks' AutoAttack runs APGD, APGD-T and FAB for 10 iterations: steps=10 gives that count
    short = fastadv.AutoAttack(model, steps=10, n_queries=500)
    assert short.apgd.n_iter == short.apgd_targeted.n_iter == short.fab.n_iter == 10
    assert short.square.n_queries == 500
    assert fastadv.AutoAttack(model, n_classes=5).apgd_targeted.n_target_classes == 4


def test_inputs_model_state_rng_and_budget(digits120):
    x, y = digits120
    x, y = x[:40], y[:40]
    model = SmallCNN()
    model.train()
    model.features[1].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    adv = fastadv.AutoAttack(model, eps=0.05, steps=2, n_queries=10)(x, y)
    assert torch.equal(torch.get_rng_state(), rng), "AutoAttack changed the global RNG state"
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().max() <= 0.05 + 1e-6


def test_functional_and_seed_none(trained_models, digits120):
    model = trained_models["mlp"]
    x, y = digits120[0][:30], digits120[1][:30]
    cfg = dict(eps=0.1, steps=3, n_queries=20)
    assert_equal(fastadv.functional.autoattack(model, x, y, **cfg), fastadv.AutoAttack(model, **cfg)(x, y))
    adv = fastadv.AutoAttack(model, seed=None, **cfg)(x, y)  # the clock's seed, as the original
    assert adv.shape == x.shape


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(version="fast"), "version"),
        (dict(norm="L1"), "norm"),
        (dict(norm="l2"), "norm"),
        (dict(n_classes=1), "n_classes"),
        (dict(eps=-0.1), "eps"),
        (dict(version="custom"), "attacks"),
        (dict(version="custom", attacks=["apgd-ce", "pgd"]), "attacks"),
        (dict(attacks=["apgd-ce"]), "attacks"),
        (dict(steps=-1), "steps"),
        (dict(n_queries=0), "n_queries"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match, trained_models):
    with pytest.raises(ValueError, match=match):
        fastadv.AutoAttack(trained_models["mlp"], **kwargs)


def test_more_classes_than_the_model(trained_models, digits120):
    x, y = digits120
    with pytest.raises(ValueError, match="n_classes"):
        fastadv.AutoAttack(trained_models["mlp"], n_classes=11, steps=1)(x, y)


# -- MultiAttack ---------------------------------------------------------------------------------


def test_multiattack_bit_exact_with_torchattacks(model, batch):
    x, y = batch
    # FAB goes last: torchattacks' FAB re-seeds the global RNG, fastadv's leaves it alone,
    # so an attack after it would draw different numbers (by design).

    def build(lib):
        return lib.MultiAttack([
            lib.PGD(model, eps=0.05, alpha=0.01, steps=3),
            lib.PGD(model, eps=0.08, alpha=0.02, steps=5),
            lib.FAB(model, eps=0.1, steps=5, multi_targeted=True),
        ])

    torch.manual_seed(3)
    expected = build(torchattacks)(x, y)
    torch.manual_seed(3)
    atk = build(fastadv)
    actual = atk(x, y)
    assert_equal(actual, expected, "MultiAttack")
    with torch.no_grad():
        fooled = model(actual).argmax(1) != y
    records = atk.records
    assert records[0] == len(y) and records == sorted(records, reverse=True)
    assert records[-1] == int((~fooled).sum()) and len(atk.success_rates()) == len(records) - 1


def test_multiattack_keeps_first_success_and_stops(trained_models, batch, capsys):
    model = trained_models["mlp"]
    x, y = batch
    first = fastadv.FGSM(model, eps=0.3)
    atk = fastadv.MultiAttack([first, fastadv.PGD(model, eps=0.3, steps=3)], verbose=True)
    adv = atk(x, y)
    with torch.no_grad():
        first_fooled = model(first(x, y)).argmax(1) != y
    assert_equal(adv[first_fooled], first(x, y)[first_fooled])
    assert "Attack success rate" in capsys.readouterr().out
    if first_fooled.all():
        assert len(atk.records) == 2  # stopped: nothing left for the second attack


def test_multiattack_bad_input(trained_models):
    cnn, mlp = trained_models["cnn"], trained_models["mlp"]
    with pytest.raises(ValueError, match="at least 2"):
        fastadv.MultiAttack([fastadv.PGD(cnn)])
    with pytest.raises(ValueError, match="same model"):
        fastadv.MultiAttack([fastadv.PGD(cnn), fastadv.PGD(mlp)])
    with pytest.raises(TypeError, match="list"):
        fastadv.MultiAttack(fastadv.PGD(cnn))
    with pytest.raises(TypeError, match="Attack"):
        fastadv.MultiAttack([fastadv.PGD(cnn), lambda x, y: x])
