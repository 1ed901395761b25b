"""AutoAttack's flags-only shortcut (early_stop): the robust flags of the original, fewer gradients.

With early_stop, APGD and APGD-T stop iterating a point once it is fooled. Every per-sample
robust flag after every stage must equal pyautoattack 0.2.0's, the returned images stay
adversarial, and the report counts fewer gradient evaluations than the run without it,
which itself counts exactly the original's.
"""
import pytest
import torch
import torchattacks
from pyautoattack.state import EvaluationState

import fastadv
from fastadv.calls import CallCounter
from helpers import assert_equal
from test_autoattack import run_original

CASES = {
    # (model, norm, eps, version, attacks, n samples, batch_size): odd sizes and chunks
    "standard-Linf": ("cnn", "Linf", 0.1, "standard", None, 83, 250),
    "standard-L2": ("mlp", "L2", 0.5, "standard", None, 61, 29),
    "custom-Linf": ("cnn", "Linf", 0.08, "custom", ["apgd-dlr", "apgd-t", "apgd-ce", "square"], 57, 33),
}
STEPS, QUERIES = 10, 40


def original_with_calls(model, x, y, monkeypatch, **kwargs):
    """run_original on a CallCounter, with the gradient evaluations of each of its stages."""
    counter = CallCounter(model)
    grads, last = {}, [0]
    add_run_attack = EvaluationState.add_run_attack

    def record(state, attack):
        grads[attack] = counter.backwards - last[0]
        last[0] = counter.backwards
        add_run_attack(state, attack)

    monkeypatch.setattr(EvaluationState, "add_run_attack", record)
    x_adv, flags = run_original(counter, x, y, monkeypatch, **kwargs)
    return x_adv, flags, grads


@pytest.mark.parametrize("case", list(CASES))
def test_flags_equal_the_original_with_and_without_early_stop(case, trained_models, digits, monkeypatch):
    name, norm, eps, version, attacks, n, bs = CASES[case]
    model = trained_models[name]
    _, (x, y) = digits
    x, y = x[:n].clone(), y[:n].clone()
    x_ref, flags_ref, grads_ref = original_with_calls(
        model, x, y, monkeypatch, norm=norm, eps=eps, version=version, attacks=attacks, steps=STEPS,
        n_queries=QUERIES, batch_size=bs)

    runs = {}
    for early_stop in (False, True):
        atk = fastadv.AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks, steps=STEPS,
                                 n_queries=QUERIES, batch_size=bs, early_stop=early_stop)
        runs[early_stop] = atk, atk(x, y)
        assert list(atk.robust_flags)[1:] == list(flags_ref)
        for stage, ref in flags_ref.items():
            mine = atk.robust_flags[stage]
            assert torch.equal(mine, ref), (f"{case}, early_stop={early_stop}, after {stage}: "
                                            f"{int((mine != ref).sum())} flags differ at {(mine != ref).nonzero().flatten()[:5].tolist()}")

    (plain, adv_plain), (short, adv_short) = runs[False], runs[True]
    assert_equal(adv_plain, x_ref, f"{case}: the default returns the original's images")
    # the shortcut's images: adversarial where the flag says fooled, clean where robust, inside the ball
    with torch.no_grad():
        still = model(adv_short).argmax(1) == y
    robust = short.robust_flags[short.report[-1]["attack"]]
    assert torch.equal(still, robust), f"{case}: the returned images do not carry the flags"
    assert_equal(adv_short[robust], x[robust])
    d = (adv_short - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert dist.max() <= eps + 1e-6 and adv_short.min() >= 0 and adv_short.max() <= 1

    # calls: without the shortcut exactly the original's gradients per stage; with it fewer in APGD
    per_stage = {run: {e["attack"]: e["backwards"] for e in atk.report[1:]} for run, atk in ((0, plain), (1, short))}
    assert per_stage[0] == grads_ref, f"gradient evaluations per stage: fastadv {per_stage[0]}, original {grads_ref}"
    for stage, count in per_stage[1].items():
        if stage.startswith("apgd"):
            assert count <= per_stage[0][stage], stage
        else:
            assert count == per_stage[0][stage], f"{stage} is not shortened"
    assert sum(per_stage[1].values()) < sum(per_stage[0].values()), per_stage
    # the report's counts are every call the model received
    counter = CallCounter(model)
    fastadv.AutoAttack(counter, norm=norm, eps=eps, version=version, attacks=attacks, steps=STEPS,
                       n_queries=QUERIES, batch_size=bs, early_stop=True)(x, y)
    assert counter.backwards == sum(e["backwards"] for e in short.report)
    assert counter.forwards == sum(e["forwards"] for e in short.report)


def test_early_stop_stays_off_where_it_could_change_flags(trained_models, digits):
    """EOT (the 'rand' version) and a model run in training mode: the same calls as without it."""
    _, (x, y) = digits
    x, y = x[:23].clone(), y[:23].clone()
    model = trained_models["cnn"]
    for setup in ("rand", "training"):
        reports = []
        for early_stop in (False, True):
            if setup == "rand":
                atk = fastadv.AutoAttack(model, norm="L2", eps=0.5, version="rand", steps=3, early_stop=early_stop)
                atk.apgd.eot_iter = 2
            else:
                atk = fastadv.AutoAttack(model, eps=0.1, version="custom", attacks=["apgd-ce"], steps=5,
                                         early_stop=early_stop)
                atk.set_model_training_mode(model_training=True)  # BatchNorm stays in eval: deterministic
            adv = atk(x, y)
            reports.append(([(e["attack"], e["backwards"]) for e in atk.report], adv))
        assert reports[0][0] == reports[1][0], setup
        assert_equal(reports[1][1], reports[0][1], setup)


def test_apgd_early_stop_keeps_torchattacks_flags(trained_models, batch):
    """The engine option on the APGD classes (torchattacks' arithmetic): flags as torchattacks'."""
    model = trained_models["cnn"]
    x, y = batch[0][:45], batch[1][:45]
    for norm, eps in (("Linf", 0.1), ("L2", 0.6)):
        for cls, kw in ((("APGD"), dict(loss="ce", n_restarts=2)), ("APGDT", dict(n_classes=10))):
            ref = getattr(torchattacks, cls)(model, norm=norm, eps=eps, steps=12, seed=0, **kw)(x, y)
            counter = CallCounter(model)
            adv = getattr(fastadv, cls)(counter, norm=norm, eps=eps, steps=12, seed=0, early_stop=True, **kw)(x, y)
            with torch.no_grad():
                assert torch.equal(model(adv).argmax(1) == y, model(ref).argmax(1) == y), f"{cls} {norm}"
            if cls == "APGDT" and norm == "L2":
                # torchattacks' targeted L2 step takes the first sample's step size for all samples:
                # dropping a sample would move the others, so early_stop stays off (the same bits)
                assert_equal(adv, ref, "APGDT L2 with early_stop")
            else:
                full = CallCounter(model)
                getattr(fastadv, cls)(full, norm=norm, eps=eps, steps=12, seed=0, **kw)(x, y)
                assert counter.backwards < full.backwards, f"{cls} {norm}: {counter.backwards} vs {full.backwards}"


def test_bad_early_stop(trained_models):
    with pytest.raises(TypeError, match="early_stop"):
        fastadv.AutoAttack(trained_models["mlp"], early_stop="yes")


def test_bench_counts_each_stage_of_the_original():
    """benchmarks/bench_autoattack_calls at a tiny size: its per-stage counts of the original
    equal fastadv's (gradients; forwards after the clean stage), and the flags agree."""
    from fastadv.bench import bench_autoattack_calls

    rows = bench_autoattack_calls.main(["--models", "smallcnn-digits", "--n", "24", "--steps", "3", "--queries", "8",
                                        "--rounds", "0", "--cases", "cascade", "--no-write"])
    by_stage = {r["stage"]: r for r in rows}
    assert list(by_stage) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square", "total"]
    for stage, r in by_stage.items():
        assert r["original_grads"] == r["fastadv_grads"] >= r["fastadv_early_stop_grads"], stage
        if stage not in ("clean", "total"):
            assert r["original_forwards"] >= r["fastadv_forwards"] > 0, stage
    assert by_stage["clean"]["fastadv_forwards"] == 24 < by_stage["clean"]["original_forwards"]  # + its checks
    assert by_stage["total"]["flags_equal"] and by_stage["total"]["images_equal"]
    assert by_stage["apgd-ce"]["fastadv_early_stop_grads"] < by_stage["apgd-ce"]["fastadv_grads"]


@pytest.mark.parametrize("n,engine", [(1, {}), (13, {"channels_last": True}), (29, {"batch_size": 10})])
def test_apgd_early_stop_same_flags_batch_one_channels_last_chunks(n, engine, trained_models, digits):
    model = trained_models["cnn"]
    _, (x, y) = digits
    x, y = x[40:40 + n].clone(), y[40:40 + n].clone()
    kw = dict(eps=0.12, steps=15, n_restarts=2, **engine)
    plain = fastadv.APGD(model, **kw)(x, y)
    short = fastadv.APGD(model, early_stop=True, **kw)(x, y)
    with torch.no_grad():
        robust = model(plain).argmax(1) == y
        assert torch.equal(model(short).argmax(1) == y, robust)
    assert_equal(short[robust], x[robust])
    assert short.stride() == plain.stride()
