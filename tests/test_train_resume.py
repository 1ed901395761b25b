"""Resumable training: a run stopped by a crash, Ctrl-C (SIGINT) or SIGKILL and started
again with the same arguments ends bit for bit where an uninterrupted run ends (weights,
optimizer, scheduler, Free AT's perturbation, RNG, history), in one process and under
DDP; state files that are corrupt, foreign or of another run are refused and left
untouched."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastadv.cli import main
from fastadv.evaluate import StateFileError, evaluate
from fastadv.models import SmallCNN
from fastadv.train import TrainConfig, TrainStateError, fit, load_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.2
RUN = dict(epochs=3, batch_size=32, seed=0)  # 96 samples: 3 steps per epoch, 9 in all
# The model's forwards per training step. pgd: 2 attack steps + the training forward; free: 2 replays;
# trades: the clean target, 2 attack steps, the clean and adversarial training forwards; fgsm-rs: 1 + 1.
FORWARDS_PER_STEP = {"plain": 1, "pgd": 3, "free": 2, "trades": 5, "fgsm-rs": 2, "pgd+bf16": 3}
METHODS = list(FORWARDS_PER_STEP)  # "pgd+bf16": PGD-AT under bf16 autocast (TrainConfig.amp)


def cfg_for(method):
    method, _, amp = method.partition("+")
    return TrainConfig(method=method, eps=EPS, steps=2, replays=2, amp=amp or None)


def train(data, method, state=None, *, model_seed=0, rng_seed=1, hook=None, cfg=None, **kw):
    """fit a fresh SmallCNN as the CLI does: the model from model_seed, the attack noise from rng_seed."""
    torch.manual_seed(model_seed)
    model = SmallCNN()
    if hook is not None:
        model.register_forward_pre_hook(hook)
    torch.manual_seed(rng_seed)
    history = fit(model, *data, cfg or cfg_for(method), **{**RUN, **kw}, state_path=state)
    return model, history


def assert_same(a, b, where="state"):
    """Nested equality, tensors bit for bit; wall-clock seconds (and the checksum over them) aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k not in ("seconds", "checksum"):
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Crash(Exception):
    pass


def crash():
    raise Crash


class Forwards:
    """A forward pre-hook that counts the model's forwards and acts at the n-th one."""

    def __init__(self, at=None, action=None):
        self.n, self.at, self.action = 0, at, action

    def __call__(self, module, inputs):
        self.n += 1
        if self.n == self.at:
            self.action()


@pytest.fixture(scope="module")
def data(digits):
    (x, y), _ = digits
    return x[:96], y[:96]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """method -> (model, history, final state) of the uninterrupted run, computed once."""
    runs = {}

    def get(method):
        if method not in runs:
            path = tmp_path_factory.mktemp(method) / "full.state"
            model, history = train(data, method, path)
            runs[method] = (model, history, load_train_state(path))
        return runs[method]

    return get


def assert_equals_reference(reference, method, model, history, state_path):
    ref_model, ref_history, ref_state = reference(method)
    assert_same(model.state_dict(), ref_model.state_dict(), "parameters and buffers")
    assert_same(history, ref_history, "history")
    final = load_train_state(state_path)
    assert final["finished"] and (final["epoch"], final["step"]) == (RUN["epochs"], 0)
    assert_same(final, ref_state)  # optimizer, scheduler, Free AT's delta, RNG, partial sums
    if method == "free":
        assert final["ranks"][0]["delta"].abs().max() > 0
    if method == "pgd+bf16":  # autocast did change the arithmetic
        assert not torch.equal(model.state_dict()["head.weight"], reference("pgd")[0].state_dict()["head.weight"])


# -- in process: interrupted at an epoch boundary, mid-epoch by a crash, mid-epoch by Ctrl-C ---

@pytest.mark.parametrize("method", METHODS)
def test_resume_at_an_epoch_boundary_is_bit_exact(tmp_path, data, reference, method):
    state = tmp_path / "run.state"

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train(data, method, state, on_epoch=stop_after_first_epoch)
    saved = load_train_state(state)
    assert (saved["epoch"], saved["step"], saved["finished"]) == (1, 0, False)
    assert len(saved["ranks"][0]["history"]) == 1

    count = Forwards()
    model, history = train(data, method, state, rng_seed=123, hook=count)  # the RNG comes from the state
    assert count.n == 6 * FORWARDS_PER_STEP[method]  # only the 2 remaining epochs were trained
    assert_equals_reference(reference, method, model, history, state)


@pytest.mark.parametrize("method", METHODS)
def test_crash_mid_epoch_resumes_from_the_last_save_bit_exact(tmp_path, data, reference, method):
    state = tmp_path / "run.state"
    per_step = FORWARDS_PER_STEP[method]
    # save_every=2 saves after steps 2, 4, (6: the epoch's end), 8; the crash hits step 5.
    with pytest.raises(Crash):
        train(data, method, state, save_every=2, hook=Forwards(at=4 * per_step + 1, action=crash))
    saved = load_train_state(state)
    assert (saved["epoch"], saved["step"]) == (1, 1)  # mid-epoch: step 4 overall
    count = Forwards()
    model, history = train(data, method, state, rng_seed=123, hook=count, save_every=2)
    assert count.n == 5 * per_step  # steps 5..9, each once
    assert_equals_reference(reference, method, model, history, state)


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as in a terminal, also where the test runner was started with it
    ignored (a background job of a non-interactive shell inherits SIG_IGN)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def terminal_sigint_in_child():
    """Popen preexec_fn: the child's Python then installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_saves_the_current_step_and_resumes_bit_exact(tmp_path, data, reference, method, terminal_sigint):
    state = tmp_path / "run.state"
    per_step = FORWARDS_PER_STEP[method]
    # SIGINT during step 5 (no save_every): fit finishes step 5, saves it, raises KeyboardInterrupt.
    with pytest.raises(KeyboardInterrupt):
        train(data, method, state, hook=Forwards(at=4 * per_step + 1, action=lambda: signal.raise_signal(signal.SIGINT)))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    saved = load_train_state(state)
    assert (saved["epoch"], saved["step"], saved["finished"]) == (1, 2, False)
    count = Forwards()
    model, history = train(data, method, state, rng_seed=123, hook=count)
    assert count.n == 4 * per_step
    assert_equals_reference(reference, method, model, history, state)


def test_fp16_grad_scaler_state_resumes_bit_exact(tmp_path, data):
    cfg = TrainConfig(method="free", eps=EPS, replays=2, amp="fp16")  # a GradScaler, on the CPU too
    full, full_history = train(data, "free", tmp_path / "full.state", cfg=cfg)
    with pytest.raises(Crash):
        # a crash in step 5 (2 forwards a step), after the save of step 4
        train(data, "free", tmp_path / "run.state", cfg=cfg, save_every=2, hook=Forwards(at=9, action=crash))
    model, history = train(data, "free", tmp_path / "run.state", cfg=cfg, rng_seed=123)
    assert_same(model.state_dict(), full.state_dict(), "parameters and buffers")
    assert_same(history, full_history, "history")
    final, ref = load_train_state(tmp_path / "run.state"), load_train_state(tmp_path / "full.state")
    assert ref["scaler"]["_growth_tracker"] > 0
    assert_same(final, ref)


def test_saving_state_does_not_change_training(data, reference):
    model, history = train(data, "pgd")
    ref_model, ref_history, _ = reference("pgd")
    assert_same(model.state_dict(), ref_model.state_dict(), "parameters and buffers")
    assert_same(history, ref_history, "history")


def test_finished_state_returns_without_training(tmp_path, data, reference):
    ref_model, ref_history, _ = reference("pgd")
    state = tmp_path / "done.state"
    model, _ = train(data, "pgd", state)
    before = state.read_bytes()
    count = Forwards()
    again, history = train(data, "pgd", state, hook=count)
    assert count.n == 0  # no forward at all: nothing trained
    assert_same(history, ref_history, "history")
    assert_same(again.state_dict(), ref_model.state_dict(), "parameters and buffers")  # the trained weights
    assert not again.training and state.read_bytes() == before


def test_save_every_is_validated(tmp_path, data):
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="save_every must be a positive int"):
            fit(SmallCNN(), *data, cfg_for("plain"), **RUN, state_path=tmp_path / "s", save_every=bad)
    with pytest.raises(ValueError, match="save_every needs a state_path"):
        fit(SmallCNN(), *data, cfg_for("plain"), **RUN, save_every=2)
    assert not (tmp_path / "s").exists()


# -- state files that are not this run's -------------------------------------------------------

@pytest.fixture
def state_file(tmp_path, data):
    path = tmp_path / "run.state"
    train(data, "plain", path, epochs=1)
    return path


def refused(path, data, match, method="plain", **kw):
    before = path.read_bytes()
    with pytest.raises(TrainStateError, match=match) as info:
        train(data, method, path, **{"epochs": 1, **kw})
    assert isinstance(info.value, (StateFileError, ValueError))
    assert path.read_bytes() == before, "the state file was modified"
    return str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_state_is_refused_untouched(state_file, data, damage):
    raw = state_file.read_bytes()
    state_file.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00not a state" * 10, "empty": b""}[damage])
    msg = refused(state_file, data, "corrupt or truncated")
    assert str(state_file) in msg and "delete" in msg


def test_tampered_state_fails_its_checksum(state_file, data):
    state = torch.load(state_file, weights_only=True)
    state["model"]["head.bias"][0] += 1
    torch.save(state, state_file)
    refused(state_file, data, "checksum")


def test_foreign_files_are_not_taken_for_a_state(state_file, data, trained_models):
    torch.save(SmallCNN().state_dict(), state_file)
    refused(state_file, data, "not a fastadv training state file")
    (x, y) = data
    evaluate(trained_models["cnn"], x[:32], y[:32], ["fgsm"], eps=EPS, state_path=state_file.with_suffix(".eval"))
    shutil.copy(state_file.with_suffix(".eval"), state_file)
    refused(state_file, data, "not a fastadv training state file")


@pytest.mark.parametrize("change, field", [
    (dict(epochs=2), "epochs"), (dict(lr=0.02), "lr"), (dict(seed=1), "seed"), (dict(batch_size=16), "batch_size"),
    (dict(method="pgd"), "config.method"), (dict(schedule="constant"), "schedule"), (dict(optimizer="sgd"), "optimizer"),
    (dict(model_seed=5), "model_sha256"), (dict(data="fewer"), "data_sha256"),
])
def test_state_of_another_run_is_refused_naming_the_difference(state_file, data, change, field):
    if change.get("data") == "fewer":
        change, data = {}, (data[0][:64], data[1][:64])
    msg = refused(state_file, data, "belongs to another training run", **change)
    assert f"{field}: state file has" in msg


# -- the command line: Ctrl-C and SIGKILL in real processes ------------------------------------

CLI_ARGS = ["train", "--method", "pgd", "--eps", str(EPS), "--steps", "5", "--limit", "512", "--batch-size", "32",
            "--epochs", "6", "--save-every", "1"]  # 16 steps per epoch, 96 in all
CLI_STEPS = 96


def run_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def progress(path):
    """Steps done according to the state file, or -1 before it exists."""
    try:
        s = torch.load(path, weights_only=True)
        return s["epoch"] * 16 + s["step"]
    except Exception:  # not written yet
        return -1


def start_and_stop(cmd, cwd, state, at_least, sig):
    proc = subprocess.Popen(cmd, env=run_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=terminal_sigint_in_child)
    deadline = time.monotonic() + 120
    try:
        while progress(state) < at_least and proc.poll() is None:
            assert time.monotonic() < deadline, "the training made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_cli_survives_ctrl_c_and_sigkill(tmp_path, digits):
    cmd = [sys.executable, "-m", "fastadv", *CLI_ARGS, "--state", "run.state", "--out", "model.pt"]
    state, out = tmp_path / "run.state", tmp_path / "model.pt"

    rc, _, err = start_and_stop(cmd, tmp_path, state, 8, signal.SIGINT)
    assert rc == 130, f"expected exit 130 after Ctrl-C, got {rc}: {err[-2000:]}"
    assert "fastadv train: interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    first = progress(state)
    assert 8 <= first < CLI_STEPS and not out.exists()

    rc, _, err = start_and_stop(cmd, tmp_path, state, first + 16, signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"the run finished before it could be killed: {err[-2000:]}"
    assert f"resuming from run.state: epoch {first // 16 + 1}, step {first % 16}" in err
    second = progress(state)
    assert first + 16 <= second < CLI_STEPS and not out.exists()

    done = subprocess.run(cmd, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from run.state: epoch {second // 16 + 1}, step {second % 16}" in done.stderr
    assert load_train_state(state)["finished"]

    # The uninterrupted run, in this process: the CLI's model, seeds and thread count.
    (x, y), _ = digits
    torch.manual_seed(0)
    model = SmallCNN()
    torch.manual_seed(1)
    history = fit(model, x[:512], y[:512], TrainConfig(method="pgd", eps=EPS, steps=5), epochs=6, batch_size=32, seed=0)
    ckpt = torch.load(out, weights_only=True)
    assert_same(ckpt["state_dict"], model.state_dict(), "checkpoint")
    assert [h["loss"] for h in ckpt["train"]["history"]] == [h["loss"] for h in history]


def test_cli_refuses_a_state_of_another_run(tmp_path, capsys):
    state, out = tmp_path / "s.state", tmp_path / "m.pt"
    common = ["train", "--method", "plain", "--epochs", "1", "--limit", "64", "--state", state, "--quiet"]
    assert main([str(a) for a in [*common, "--out", tmp_path / "first.pt"]]) == 0
    before = state.read_bytes()
    capsys.readouterr()
    assert main([str(a) for a in [*common, "--lr", "0.02", "--out", out]]) == 1
    err = capsys.readouterr().err
    assert "belongs to another training run" in err and "lr: state file has 0.01, this run 0.02" in err
    assert "Traceback" not in err and state.read_bytes() == before and not out.exists()
    for argv, match in ([["--save-every", "0", "--out", out], "--save-every must be >= 1"],
                        [["--out", state, "--overwrite"], "name the same file"]):
        assert main([str(a) for a in [*common, *argv]]) == 1
        assert match in capsys.readouterr().err
    assert main(["train", "--method", "plain", "--save-every", "2", "--out", str(out)]) == 1
    assert "--save-every needs --state" in capsys.readouterr().err
    assert state.read_bytes() == before and not out.exists()


# -- DistributedDataParallel: 2 gloo processes ---------------------------------------------------

DDP_SETUP = r"""
import datetime
import signal
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastadv.models import SmallCNN
from fastadv.train import TrainConfig, fit, make_optimizer

rank, init, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
x, y = torch.load(f"{folder}/data.pt")  # 128 digits: global batches of 32, 16 per rank: 4 steps per epoch, 12 in all


def run(method, state, rng_seed=1, on_step=None, save_every=None):
    torch.manual_seed(0)
    model = SmallCNN()  # BatchNorm: each rank's running statistics are its own between forwards
    net = DDP(model)
    opt = make_optimizer(net, "adam", 1e-2)
    if on_step is not None:  # on_step(n) right after this rank's n-th optimizer step
        steps = []
        def hook(*args):
            steps.append(1)
            on_step(len(steps))
        opt.register_step_post_hook(hook)
    torch.manual_seed(rng_seed + rank)
    cfg = TrainConfig(method=method, eps=0.2, steps=2, replays=2)
    history = fit(net, x, y, cfg, epochs=3, batch_size=32, optimizer=opt, seed=0, state_path=state, save_every=save_every)
    return {k: v.clone() for k, v in model.state_dict().items()}, history
"""

DDP_SCRIPT = DDP_SETUP + r"""

class Crash(Exception):
    pass


def crash_at(n):  # a crash right after an optimizer step, on every rank alike
    def on_step(k):
        if k == n:
            raise Crash
    return on_step


out = {}
for method in ("pgd", "free"):
    per_batch = 2 if method == "free" else 1
    full = run(method, f"{folder}/{method}-full.state")
    try:  # saves after steps 3, 6 (epoch 2, step 2), 9; the crash hits step 8
        run(method, f"{folder}/{method}-run.state", on_step=crash_at(7 * per_batch + 1), save_every=3)
        raise SystemExit("the crash did not happen")
    except Crash:
        pass
    dist.barrier()
    if rank == 0:
        s = torch.load(f"{folder}/{method}-run.state", weights_only=True)
        assert (s["epoch"], s["step"]) == (1, 2), (s["epoch"], s["step"])
    resumed = run(method, f"{folder}/{method}-run.state", rng_seed=77, save_every=3)
    out[method] = {"full": full, "resumed": resumed}
torch.save(out, f"{folder}/rank{rank}.pt")
dist.destroy_process_group()
"""


def start_ranks(script, tmp_path, data, *args):
    """Runs script as ranks 0 and 1 of a gloo group, on the first 128 of data; returns
    [(returncode, stderr)] by rank."""
    path = tmp_path / "ddp.py"
    path.write_text(script)
    torch.save((data[0][:128].clone(), data[1][:128].clone()), tmp_path / "data.pt")  # spares each rank scikit-learn
    init = f"file://{tmp_path / ('pg-' + '-'.join(args))}"  # a fresh rendezvous file for each launch
    procs = [subprocess.Popen([sys.executable, str(path), str(rank), init, str(tmp_path), *args], env=run_env(),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:  # a rank that failed leaves the other waiting in a collective
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, results)]


def test_ddp_interrupted_and_resumed_equals_uninterrupted(tmp_path, digits):
    for rc, err in start_ranks(DDP_SCRIPT, tmp_path, digits[0]):
        assert rc == 0, err[-4000:]
    for method in ("pgd", "free"):
        for rank in range(2):
            r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[method]
            assert_same(r["resumed"], r["full"], f"{method} rank {rank}")  # weights, buffers, this rank's history
        full = load_train_state(tmp_path / f"{method}-full.state")
        resumed = load_train_state(tmp_path / f"{method}-run.state")
        assert full["description"]["world_size"] == 2 and len(full["ranks"]) == 2
        assert_same(resumed, full, method)  # optimizer, each rank's RNG, delta and buffers
        assert not torch.equal(full["ranks"][0]["rng_cpu"], full["ranks"][1]["rng_cpu"])


DDP_CTRL_C_SCRIPT = DDP_SETUP + r"""
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the launcher ignored SIGINT
steps = [0]


def count(n):
    steps[0] = n


if sys.argv[4] == "interrupt":
    full = run("pgd", f"{folder}/full.state")
    ctrl_c_at = int(sys.argv[5].split(",")[rank])  # the step during which this rank gets SIGINT (0: never)

    def ctrl_c(n):
        count(n)
        if n == ctrl_c_at:
            signal.raise_signal(signal.SIGINT)
    try:
        run("pgd", f"{folder}/run.state", on_step=ctrl_c)
    except KeyboardInterrupt:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        torch.save({"full": full, "steps": steps[0]}, f"{folder}/interrupted{rank}.pt")
        dist.destroy_process_group()
        raise  # the process ends by KeyboardInterrupt
    raise SystemExit("no KeyboardInterrupt")
resumed = run("pgd", f"{folder}/run.state", rng_seed=77, on_step=count)  # the RNG comes from the state
torch.save({"resumed": resumed, "steps": steps[0]}, f"{folder}/resumed{rank}.pt")
dist.destroy_process_group()
"""


# (the step during which rank 0, rank 1 get SIGINT (0: never), the steps both do before stopping)
@pytest.mark.parametrize("ctrl_c_at, stop_after", [
    ("5,6", 6),  # as torchrun forwards it, rank after rank: both stop after step 6, the step after the first request
    ("7,0", 8),  # rank 1 never gets it, yet stops with rank 0, at the end of epoch 2 (step 8)
])
def test_ddp_ctrl_c_stops_every_rank_after_the_same_step_and_resumes_bit_exact(tmp_path, digits, ctrl_c_at, stop_after):
    for rc, err in start_ranks(DDP_CTRL_C_SCRIPT, tmp_path, digits[0], "interrupt", ctrl_c_at):
        assert rc == -signal.SIGINT and err.rstrip().endswith("KeyboardInterrupt"), f"exit status {rc}: {err[-4000:]}"
    stopped = [torch.load(tmp_path / f"interrupted{rank}.pt", weights_only=True) for rank in range(2)]
    assert [r["steps"] for r in stopped] == [stop_after, stop_after]  # the same step on both, then stopped
    saved = load_train_state(tmp_path / "run.state")  # saved once, by rank 0, with both ranks' parts
    assert (saved["epoch"], saved["step"], saved["finished"]) == (*divmod(stop_after, 4), False)
    assert len(saved["ranks"]) == 2

    for rc, err in start_ranks(DDP_CTRL_C_SCRIPT, tmp_path, digits[0], "resume"):  # 2 new processes
        assert rc == 0, err[-4000:]
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=True)
        assert resumed["steps"] == 12 - stop_after  # only the steps left
        assert_same(resumed["resumed"], stopped[rank]["full"], f"rank {rank}")  # weights, buffers, history
    assert_same(load_train_state(tmp_path / "run.state"), load_train_state(tmp_path / "full.state"))
