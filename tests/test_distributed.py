"""torchrun with 2 CPU processes over gloo: distributed evaluation equals a single process
exactly; one DDP adversarial-training step equals the single-process step on the same
global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastadv.data import load_digits
from fastadv.evaluate import evaluate
from fastadv.models import MLP, SmallCNN
from fastadv.train import TrainConfig, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.2


def torchrun(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastadv", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def single_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_distributed_eval_equals_single_process(tmp_path, trained_models):
    ckpt = tmp_path / "cnn.pt"
    torch.save(trained_models["cnn"].state_dict(), ckpt)
    # 200 samples in units of 6 on 6 slots: 34 clean units, then the points still robust (about
    # 120 after fgsm at eps 0.1): each rank streams its ~10 units of each stage through its own
    # slots in two rounds of flag exchanges, with the exits on.
    attacks = ["fgsm", "pgd-30", "apgd-ce-10"]
    torchrun("eval", "--checkpoint", str(ckpt), "--limit", "200", "--batch-size", "6", "--attack", ",".join(attacks),
             "--eps", "0.1", "--report", "report.json", "--state", "state.pt", "--quiet", cwd=tmp_path)
    dist_report = json.loads((tmp_path / "report.json").read_text())
    dist_state = torch.load(tmp_path / "state.pt", weights_only=True)

    _, (x, y) = load_digits(seed=0)
    model = SmallCNN()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    single = single_thread(lambda: evaluate(model.eval(), x[:200], y[:200], attacks, eps=0.1, batch_size=6))

    assert dist_report["world_size"] == 2 and single["world_size"] == 1
    assert dist_report["n"] == single["n"] == 200  # exact counts: no padded duplicates
    assert dist_report["fingerprint"] == single["fingerprint"]
    assert dist_report["clean"]["correct"] == single["clean"]["correct"]
    assert [a["robust"] for a in dist_report["attacks"]] == [a["robust"] for a in single["attacks"]]
    assert dist_report["robust_accuracy"] == single["robust_accuracy"]
    assert torch.equal(dist_state["flags"][-1], single["robust_flags"])
    assert single["robust"] < single["clean"]["correct"]
    # the calls are summed over the ranks: each point was attacked once, somewhere
    assert [a["attacked"] for a in dist_report["attacks"]] == [a["attacked"] for a in single["attacks"]]

    # The state is independent of the world size: a single process resumes the finished one.
    again = single_thread(lambda: evaluate(model, x[:200], y[:200], attacks, eps=0.1, batch_size=6,
                                           state_path=tmp_path / "state.pt"))
    assert again["resumed"] and again["robust"] == single["robust"]


@pytest.mark.parametrize("method", ["pgd", "free"])
def test_ddp_training_step_equals_single_process_step(tmp_path, method):
    # One global batch of 64 (32 per rank), one epoch: exactly one step (m replays for free).
    args = ["train", "--method", method, "--eps", str(EPS), "--limit", "64", "--batch-size", "64", "--epochs", "1",
            "--model", "fastadv.models:MLP", "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant",
            "--replays", "2", "--no-random-start", "--out", "ddp.pt", "--quiet"]
    proc = torchrun(*args, cwd=tmp_path)
    assert "world size 2" in proc.stdout
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["train"]["world_size"] == 2

    (x, y), _ = load_digits(seed=0)
    torch.manual_seed(0)  # as the CLI: the model is built right after seeding
    model = MLP()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(method=method, eps=EPS, replays=2, random_start=False)
    single_thread(lambda: fit(model, x[:64], y[:64], cfg, epochs=1, batch_size=64, optimizer="sgd", lr=0.1,
                              schedule="constant", seed=0))
    moved = 0.0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        moved = max(moved, (v - start[k]).abs().max().item())
    assert moved > 1e-3  # the step did change the parameters
