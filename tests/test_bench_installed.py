"""`fastadv bench` from an installed, non-editable copy, run outside the source tree."""
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_command_runs_from_an_installed_wheel(tmp_path):
    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fastadv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastadv/bench/bench_attacks.py" in names and "fastadv/bench/models.py" in names, names
    assert not any(n.startswith("benchmarks/") for n in names), "a bare top-level 'benchmarks' package was packaged"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import fastadv.bench; print(fastadv.bench.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    out_json = tmp_path / "row.json"
    bench = subprocess.run(
        [sys.executable, "-m", "fastadv", "bench", "--model", "linear", "--attack", "PGD", "--batch", "8",
         "--steps", "2", "--mode", "exact", "--repeats", "1", "--warmup", "0", "--device", "cpu",
         "--refs", "torchattacks", "--json", str(out_json)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-3000:]
    assert "grads/sample fastadv / ref / floor" in bench.stdout
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["equal"] is True and row["fastadv_ms"] > 0
    assert row["calls_per_sample"]["fastadv"] == {"forwards": 2.0, "grads": 2.0}
    assert row["commit"].endswith("(installed)"), row["commit"]
