"""fastadv demo, eval --plots and bench: they run, print their tables and write valid
JSON and PNG files (small, CPU-only configurations)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastadv.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_png(path, min_w=200, min_h=200):
    from PIL import Image

    assert path.exists(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_w and im.size[1] >= min_h, im.size
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50  # not a blank canvas


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FASTADV_CACHE", str(d))
    return d


def test_demo_quick_prints_the_table_writes_json_and_caches(tmp_path, capsys, cache):
    out_json = tmp_path / "demo.json"
    rc, out, _ = run(capsys, "demo", "--quick", "--quiet", "--device", "cpu", "--json", out_json)
    assert rc == 0
    assert "| model | epochs | train s | clean | PGD-20 | AutoAttack |" in out
    assert "| PGD-AT |" in out and "| plain |" in out and "bit-identical" in out
    r = json.loads(out_json.read_text())
    assert {"quick", "device", "eps", "n_test", "models", "timing", "seconds", "table"} <= set(r)
    assert r["quick"] is True and r["eps"] == 0.2 and r["n_test"] == 64 and r["device"] == "cpu"
    assert set(r["models"]) == {"plain", "pgd"}
    for m in r["models"].values():
        assert {"clean", "pgd-20", "autoattack", "epochs", "train_seconds", "cached"} <= set(m)
        assert 0 <= m["autoattack"] <= m["pgd-20"] <= m["clean"] <= 1
        assert m["cached"] is False
    assert r["models"]["plain"]["clean"] > 0.8
    assert r["models"]["pgd"]["autoattack"] > r["models"]["plain"]["autoattack"]
    t = r["timing"]
    assert {"fastadv_ms", "torchattacks_ms", "speedup", "bit_identical", "max_abs_diff"} <= set(t)
    assert t["bit_identical"] is True and t["fastadv_ms"] > 0 and t["torchattacks_ms"] > 0
    assert sorted(p.name for p in cache.iterdir()) == [
        "demo-digits-smallcnn-pgd-eps0.2-e3-seed0.pt", "demo-digits-smallcnn-plain-eps0.2-e3-seed0.pt"]

    # second run: the checkpoints come from the cache, the numbers are the same
    rc, out, _ = run(capsys, "demo", "--quick", "--quiet", "--device", "cpu")
    assert rc == 0 and "| cached |" in out
    # an existing --json is not replaced without --overwrite
    rc, _, err = run(capsys, "demo", "--quick", "--quiet", "--json", out_json)
    assert rc == 1 and "already exists" in err


def test_python_m_fastadv_demo_quick_quiet_exits_0(tmp_path):
    env = dict(os.environ, FASTADV_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "fastadv", "demo", "--quick", "--quiet", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # past 120 s once on a loaded machine
    assert proc.returncode == 0, proc.stderr
    assert "AutoAttack" in proc.stdout and proc.stderr == ""


def test_eval_plots_writes_curve_and_examples(tmp_path, capsys, trained_models):
    ckpt = tmp_path / "cnn.pt"
    torch.save(trained_models["cnn"].state_dict(), ckpt)
    plots, report = tmp_path / "plots", tmp_path / "r.json"
    rc, out, _ = run(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm,pgd-5", "--eps", "0.2", "--limit", "48",
                     "--report", report, "--plots", plots, "--quiet")
    assert rc == 0 and "Robust accuracy" in out and "plots:" in out
    assert_png(plots / "robust_vs_eps.png", 400, 300)
    assert_png(plots / "adversarial_examples.png", 300, 600)
    curve = json.loads(report.read_text())["robust_curve"]
    assert curve["eps"] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    assert set(curve["curves"]) == {"fgsm", "pgd-5"}
    pgd = curve["curves"]["pgd-5"]
    assert pgd[0] == curve["curves"]["fgsm"][0] and pgd[-1] <= pgd[0]
    # the PNGs exist now: refused without --overwrite, replaced with it
    rc, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--eps", "0.2", "--limit", "16",
                     "--plots", plots, "--quiet")
    assert rc == 1 and "already exists" in err
    rc, _, _ = run(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--eps", "0.2", "--limit", "16",
                   "--plots", plots, "--quiet", "--overwrite")
    assert rc == 0


def test_bench_tiny_config_writes_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out_json, plot_dir = tmp_path / "bench.json", tmp_path / "png"
    rc, out, _ = run(capsys, "bench", "--model", "linear", "--attack", "PGD", "--batch", "16", "--steps", "2",
                     "--mode", "exact", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                     "--json", out_json, "--plot", plot_dir)
    assert rc == 0 and "PGD" in out and "torchattacks" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["attack"] == "PGD" and rows[0]["model"] == "linear"
    assert rows[0]["batch"] == 16 and rows[0]["steps"] == 2 and rows[0]["mode"] == "exact"
    assert rows[0]["reference"] == "torchattacks" and rows[0]["equal"] is True
    assert rows[0]["fastadv_ms"] > 0 and rows[0]["reference_ms"] > 0 and rows[0]["floor_ms"] > 0
    assert 0 <= rows[0]["success_rate"] <= 1 and rows[0]["reference_success_rate"] == rows[0]["success_rate"]
    assert "exact_agreement" not in rows[0]  # an exact-mode row has nothing to agree with
    # calls counted by wrapping the model: PGD-2 is 2 forwards and 2 gradients per sample everywhere
    calls = rows[0]["calls_per_sample"]
    assert calls == {who: {"forwards": 2.0, "grads": 2.0} for who in ("fastadv", "torchattacks", "floor")}
    assert "grads/sample fastadv / ref / floor" in out and "| 2 / 2 / 2 |" in out
    assert_png(plot_dir / "bench-attacks.png", 300, 200)


def test_bench_fast_mode_reports_agreement_with_exact(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out_json = tmp_path / "bench.json"
    rc, out, _ = run(capsys, "bench", "--model", "linear", "--attack", "PGD", "--batch", "64", "--steps", "3",
                     "--mode", "fast", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--refs", "torchattacks",
                     "--json", out_json)
    assert rc == 0 and "agreement w/ exact" in out
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["mode"] == "fast" and row["params"]["precision"] == "bf16"
    agreement, fast, exact = row["exact_agreement"], row["success_rate"], row["exact_success_rate"]
    assert 0 <= agreement <= 1 and 0 <= fast <= 1 and 0 <= exact <= 1
    # the success rates can differ by no more than the fraction of samples whose outcome differs
    assert abs(fast - exact) <= 1 - agreement + 1e-9
    assert exact > 0  # PGD fools some points of the random linear model: the agreement is not vacuous


def test_bench_bad_input(capsys):
    rc, _, err = run(capsys, "bench", "--model", "nope", "--batch", "2")
    assert rc == 1 and "unknown --model" in err
