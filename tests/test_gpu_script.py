"""`bash benchmarks/gpu.sh quick --dry-run`: the one-slot GPU run, end to end on the CPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_quick_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, FASTADV_QUICK_RESULTS=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "quick", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (results,) = tmp_path.glob("*-quick.json")
    assert results.with_suffix(".md").exists()
    rows = json.loads(results.read_text())["rows"]
    kernels = {r["op"] for r in rows if r["bench"] == "kernels"}
    assert kernels == {"linf_step", "l2_step"}
    attacks = {(r["attack"], r["model"], r["mode"], r["reference"]): r for r in rows if r["bench"] == "attacks"}
    assert set(attacks) == {
        ("PGD", "smallcnn-digits", "exact", "torchattacks"), ("PGD", "smallcnn", "exact", "torchattacks"),
        ("PGD", "smallcnn-digits", "fast", "torchattacks"), ("APGD", "smallcnn-digits", "exact", "pyautoattack"),
    }
    for key in [("PGD", "smallcnn-digits", "exact", "torchattacks"), ("PGD", "smallcnn", "exact", "torchattacks")]:
        assert attacks[key]["equal"] is True, key  # exact mode on the CPU: the reference's bits
    apgd = attacks[("APGD", "smallcnn-digits", "exact", "pyautoattack")]
    assert 0 <= apgd["success_rate"] <= 1 and 0 <= apgd["reference_success_rate"] <= 1
    assert attacks[("PGD", "smallcnn-digits", "exact", "torchattacks")]["fastadv_floor_ratio"] > 0
    assert 0 <= attacks[("PGD", "smallcnn-digits", "fast", "torchattacks")]["exact_agreement"] <= 1
    (fair,) = tmp_path.glob("*-fair.json")
    fair_rows = {r["label"]: r for r in json.loads(fair.read_text())["rows"]}
    assert set(fair_rows) == {"PGD-2 exact", "PGD-2 exact, launch-bound loop", "PGD-2 AT, one epoch"}
    for r in fair_rows.values():
        assert r["bit_exact"] is True, r["case"]  # fit's epoch and the attacks: the torchattacks bits
        assert all(v["n"] >= 2 for v in r["variants"].values())
    assert "## Kernels per step" in fair.with_suffix(".md").read_text()
    summary = proc.stdout[proc.stdout.index("== quick summary =="):]
    assert summary.count("\n") >= 7 and "in all (setup included)" in summary
