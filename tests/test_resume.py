"""Resumable evaluation: a real process killed mid-run and restarted ends with exactly the
numbers of an uninterrupted run; corrupt or foreign state files are refused untouched."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastadv.evaluate import AttackSpec, StateFileError, evaluate
from fastadv.models import SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.2


def run_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def eval_cmd(ckpt, state, report, *extra, eps=EPS):
    return [sys.executable, "-m", "fastadv", "eval", "--checkpoint", str(ckpt), "--eps", str(eps), "--quiet",
            "--state", str(state), "--report", str(report), *extra]


def done_in_last_stage(path):
    """How many samples the last stage has finished (-1 before the state file is written)."""
    try:
        return int(torch.load(path, weights_only=True)["done"][-1].sum())
    except Exception:  # not written yet
        return -1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, _trained_once):
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    torch.save(_trained_once["cnn"].state_dict(), path)
    return path


def test_killed_evaluation_resumes_to_the_same_numbers(tmp_path, checkpoint):
    # units of 8: clean and fgsm are quick; at eps 0.05 about 100 points survive fgsm, and each
    # pgd-200 unit of them takes a while (no exits: every step).
    args = ["--limit", "128", "--batch-size", "8", "--attack", "fgsm,pgd-200", "--no-exits"]
    eps = 0.05
    state, report = tmp_path / "state.pt", tmp_path / "report.json"
    proc = subprocess.Popen(eval_cmd(checkpoint, state, report, *args, eps=eps), env=run_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while done_in_last_stage(state) < 24 and proc.poll() is None:  # 3 units of pgd-200
            assert time.monotonic() < deadline, "the evaluation made no progress"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed: {err.decode()[-2000:]}"
    killed_at = done_in_last_stage(state)
    assert 24 <= killed_at < 96, killed_at  # killed inside the last stage, with units left
    assert not report.exists()

    resumed = subprocess.run(eval_cmd(checkpoint, state, report, *args, eps=eps), env=run_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" not in resumed.stderr  # --quiet
    # The uninterrupted run, in this process with the same thread count as the CLI's.
    from fastadv.data import load_digits

    _, (x, y) = load_digits(seed=0)
    model = SmallCNN()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = evaluate(model.eval(), x[:128], y[:128], ["fgsm", "pgd-200"], eps=eps, batch_size=8)  # with exits
    finally:
        torch.set_num_threads(threads)

    a = json.loads(report.read_text())
    assert a["resumed"] and not b["resumed"]
    assert a["fingerprint"] == b["fingerprint"]
    assert a["clean"]["correct"] == b["clean"]["correct"]
    assert [(x["name"], x["robust"]) for x in a["attacks"]] == [(x["name"], x["robust"]) for x in b["attacks"]]
    assert a["robust_accuracy"] == b["robust_accuracy"]
    final = torch.load(state, weights_only=True)
    assert bool(final["done"].all()) and torch.equal(final["flags"][-1], b["robust_flags"])
    assert b["attacks"][-1]["robust"] < b["clean"]["correct"]  # the attacks did something


# -- in-process: interruption, completed state, corrupt and foreign state files -------------

class Interrupt(BaseException):
    pass


def counting_pgd(calls, fail_after=None):
    """fastadv PGD-10 as an AttackSpec that counts its calls and can 'crash' after some."""
    from fastadv.attacks.pgd import PGD

    def build(model, eps, n_classes):
        atk = PGD(model, eps=eps, alpha=eps / 4, steps=10)

        def run(x, y):
            if fail_after is not None and len(calls) >= fail_after:
                raise Interrupt
            calls.append(len(x))
            return atk(x, y)

        return run

    return AttackSpec("pgd-10-test", "Linf", build, {"steps": 10})


@pytest.fixture
def small(digits, trained_models):
    _, (x, y) = digits
    return trained_models["cnn"], x[:96], y[:96]


def test_interrupted_in_process_resumes_exactly(tmp_path, small):
    model, x, y = small
    state = tmp_path / "s.pt"
    with pytest.raises(Interrupt):
        evaluate(model, x, y, ["fgsm", counting_pgd([], fail_after=2)], eps=0.05, batch_size=8, state_path=state)
    partial = torch.load(state, weights_only=True)
    assert 0 < int(partial["done"].sum()) < partial["done"].numel()
    calls, full_calls = [], []
    resumed = evaluate(model, x, y, ["fgsm", counting_pgd(calls)], eps=0.05, batch_size=8, state_path=state)
    full = evaluate(model, x, y, ["fgsm", counting_pgd(full_calls)], eps=0.05, batch_size=8, state_path=tmp_path / "t.pt")
    assert len(calls) + 2 == len(full_calls) > 3  # the 2 units attacked before the interruption are not redone
    assert resumed["resumed"] and not full["resumed"]
    assert resumed["clean"]["correct"] == full["clean"]["correct"]
    assert [a["robust"] for a in resumed["attacks"]] == [a["robust"] for a in full["attacks"]]
    assert resumed["robust"] == full["robust"] and full["robust"] < full["clean"]["correct"]
    assert torch.equal(resumed["robust_flags"], full["robust_flags"])

    calls.clear()  # a finished state: the same report, no attack run again
    again = evaluate(model, x, y, ["fgsm", counting_pgd(calls)], eps=0.05, batch_size=8, state_path=state)
    assert calls == [] and again["robust"] == full["robust"]


@pytest.fixture
def state_file(tmp_path, small):
    model, x, y = small
    path = tmp_path / "state.pt"
    evaluate(model, x, y, ["fgsm"], eps=EPS, batch_size=32, state_path=path)
    return path


def refused(path, small, match, **kw):
    model, x, y = small
    before = path.read_bytes()
    args = dict(attacks=["fgsm"], eps=EPS, batch_size=32)
    args.update(kw)
    x_, y_ = args.pop("x", x), args.pop("y", y)
    model_ = args.pop("model", model)
    with pytest.raises(StateFileError, match=match) as info:
        evaluate(model_, x_, y_, args.pop("attacks"), state_path=path, **args)
    assert path.read_bytes() == before, "the state file was modified"
    return str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_state_file_is_a_clear_error(state_file, small, damage):
    data = state_file.read_bytes()
    state_file.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a state file" * 10, "empty": b""}[damage])
    msg = refused(state_file, small, "corrupt or truncated")
    assert str(state_file) in msg and "delete" in msg


def test_tampered_state_fails_its_checksum(state_file, small):
    state = torch.load(state_file, weights_only=True)
    state["flags"][-1] = ~state["flags"][-1]
    torch.save(state, state_file)
    refused(state_file, small, "checksum")


def test_other_file_is_not_taken_for_a_state(state_file, small):
    torch.save(SmallCNN().state_dict(), state_file)
    refused(state_file, small, "not a fastadv evaluation state file")


@pytest.mark.parametrize("change", ["eps", "attacks", "data", "model", "batch_size", "seed"])
def test_state_of_another_evaluation_is_refused(state_file, small, change):
    model, x, y = small
    other = SmallCNN()
    kw = {
        "eps": dict(eps=0.1), "attacks": dict(attacks=["fgsm", "pgd-5"]), "data": dict(x=x[:80], y=y[:80]),
        "model": dict(model=other), "batch_size": dict(batch_size=16), "seed": dict(seed=1),
    }[change]
    msg = refused(state_file, small, "belongs to another evaluation", **kw)
    assert {"eps": "eps", "attacks": "attacks", "data": "data_sha256", "model": "model_sha256",
            "batch_size": "batch_size", "seed": "seed"}[change] in msg
