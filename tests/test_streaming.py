"""Streamed data: fit and evaluate take a DataLoader, a map-style Dataset or an (images,
labels) pair with the same results; bad batches are named; the command line reads image
folders (in DataLoader workers), CIFAR python batches and .npy memory maps; a SIGKILLed
streamed run resumes bit for bit; model adapters and input normalization."""
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastadv
from fastadv import datasets
from fastadv.cli import main
from fastadv.data import DataError, as_source
from fastadv.evaluate import EvaluationError, evaluate
from fastadv.models import SmallCNN
from fastadv.train import TrainConfig, fit
from test_cli import cnn_ckpt, fails, run  # noqa: F401  (cnn_ckpt: a fixture)
from test_train_resume import run_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.2


class Pairs(Dataset):
    """A plain map-style dataset over tensors (not a TensorDataset: its digest is streamed)."""

    def __init__(self, x, y, transform=None):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] if self.transform is None else self.transform(i, self.x[i])
        return x, int(self.y[i])


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(1, 8, 8), 0)])


@pytest.fixture
def test_set(digits):
    _, (x, y) = digits
    return x[:150], y[:150]


def write_folder(root, x, y, rgb=False):
    """x [N, 1, H, W] in [0, 1] as PNGs root/class_<label>/<index>.png (index keeps the order)."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y.tolist())):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        a = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a, mode="L").convert("RGB" if rgb else "L").save(folder / f"{i:05d}.png")
    return root


def folder_order(x, y):
    """The folder's sample order: by class, then by file name."""
    order = torch.tensor(sorted(range(len(y)), key=lambda i: (int(y[i]), i)))
    return x[order], y[order]


# -- the Python API -------------------------------------------------------------------------------

def test_fit_and_evaluate_are_on_the_top_level_package():
    assert fastadv.fit is fastadv.train.fit
    assert callable(fastadv.evaluate) and fastadv.evaluate.evaluate is evaluate
    assert {"fit", "evaluate"} <= set(dir(fastadv))


def test_evaluate_of_a_dataloader_equals_evaluate_of_the_tensors(test_set, trained_models, tmp_path):
    x, y = test_set
    model = trained_models["cnn"]
    tensors = evaluate(model, x, y, ["fgsm", "pgd-5"], eps=EPS, batch_size=32)
    forms = {
        "pair": (x, y),
        "tensor dataset loader": DataLoader(TensorDataset(x, y), batch_size=32),
        "dataset, 2 workers": DataLoader(Pairs(x, y), batch_size=32, num_workers=2, shuffle=True),
        "map-style dataset": Pairs(x, y),
    }
    for name, data in forms.items():
        r = fastadv.evaluate(model, data, ["fgsm", "pgd-5"], eps=EPS, batch_size=None if "loader" in name else 32,
                             state_path=tmp_path / f"{len(name)}.state")
        assert r["batch_size"] == 32, name
        assert r["fingerprint"] == tensors["fingerprint"], name  # the streamed digest is the tensors' digest
        assert torch.equal(r["robust_flags"], tensors["robust_flags"]), name
        assert [a["robust"] for a in r["attacks"]] == [a["robust"] for a in tensors["attacks"]], name
        assert r["clean"]["correct"] == tensors["clean"]["correct"] and r["images_per_second"] > 0


def test_fit_on_a_dataloader_equals_fit_on_the_tensors(digits):
    (x, y), _ = digits
    x, y = x[:192], y[:192]
    cfg = TrainConfig(method="fgsm-rs", eps=EPS)
    models = []
    for data in ((x, y), DataLoader(Pairs(x, y), batch_size=7, num_workers=2)):
        torch.manual_seed(0)
        model = SmallCNN()
        torch.manual_seed(1)
        history = fit(model, data, cfg, epochs=2, batch_size=32, seed=3)
        models.append((model, history))
    (a, ha), (b, hb) = models
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb] and ha[0]["images"] == 192


def test_a_bad_streamed_batch_is_named(test_set, trained_models):
    x, y = test_set
    model = trained_models["cnn"]
    shifted = Pairs(x, y, transform=lambda i, img: img + 0.5 if i == 70 else img)
    with pytest.raises(EvaluationError, match=r"batch of samples 64\.\.95 \(clean pass\): images must lie in \[0, 1\]"):
        evaluate(model, DataLoader(shifted, batch_size=32), ["fgsm"], eps=EPS)
    bad_labels = y.clone()
    bad_labels[100] = 12
    with pytest.raises(EvaluationError, match=r"batch of samples 96\.\.127 .*labels must lie in \[0, 9\].*12\]"):
        evaluate(model, Pairs(x, bad_labels), ["fgsm"], eps=EPS, batch_size=32)
    with pytest.raises(DataError, match=r"training batch of samples .*labels must lie in \[0, 9\]"):
        fit(SmallCNN(), DataLoader(Pairs(x, bad_labels)), TrainConfig(method="plain"), epochs=1, batch_size=150)
    with pytest.raises(DataError, match="IterableDataset"):
        as_source(DataLoader(Stream()))
    with pytest.raises(DataError, match="must be a DataLoader, a map-style Dataset or an"):
        fit(SmallCNN(), "digits", TrainConfig(method="plain"))


def torchrun_env():
    """This checkout on the path, one thread per process, no distributed variables of a caller."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_distributed_evaluation_of_a_dataloader_reads_only_each_ranks_shard(tmp_path, test_set, trained_models):
    x, y = test_set[0][:100], test_set[1][:100]  # 4 batches of 32: 3 rounds, the last one with a short batch
    torch.save({"model": trained_models["cnn"].state_dict(), "x": x, "y": y}, tmp_path / "in.pt")
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = torchrun_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = evaluate(trained_models["cnn"], x, y, ["fgsm", "pgd-3"], eps=EPS, batch_size=32)
    reads = []
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["n"] == 100 and r["world_size"] == 2  # exact counts: no padding
        assert r["clean"] == single["clean"]["correct"]
        assert r["robust"] == [a["robust"] for a in single["attacks"]]
        assert torch.equal(r["flags"], single["robust_flags"])
        reads.append(set(r["clean_reads"]))
    assert reads[0].isdisjoint(reads[1]) and reads[0] | reads[1] == set(range(100))  # each rank read its shard only
    # a bad sample in rank 1's batch 1: rank 1 names it, rank 0 stops in the same round instead of waiting
    errors = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["bad_batch_error"] for rank in (0, 1)]
    assert errors[1] == "EvaluationError: batch of samples 32..63 (clean pass): images must lie in [0, 1], got values in [0, 2]"
    assert errors[0] == ("EvaluationError: rank 1 failed on the batch of samples 32..63 (clean pass), so every rank "
                         "stops; rank 1's error says why")


def test_an_unreadable_image_under_torchrun_stops_both_training_ranks(tmp_path, test_set):
    """One rank's DataError while the other waits in DDP's gradient all_reduce: the failing
    process exits, gloo's peer sees the closed connection and torchrun stops the group,
    within seconds (the process group's own timeout would be 30 minutes)."""
    root = write_folder(tmp_path / "f", test_set[0][:64], test_set[1][:64])
    bad = sorted(root.glob("class_*/*.png"))[37]
    bad.write_bytes(bad.read_bytes()[:40])
    env = torchrun_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastadv", "train", "--data", str(root), "--method", "fgsm-rs", "--eps", "0.1",
                           "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "m.pt"), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)  # a hang: TimeoutExpired
    assert proc.returncode != 0 and f"cannot read image {bad}" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "m.pt").exists()


RANK_SCRIPT = r"""
import torch, torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
import fastadv
from fastadv.models import SmallCNN

dist.init_process_group("gloo")
rank = dist.get_rank()
d = torch.load("in.pt", weights_only=True)

class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

class Logged(Dataset):
    reads = []
    def __len__(self):
        return len(d["y"])
    def __getitem__(self, i):
        Logged.reads.append(i)
        return d["x"][i], int(d["y"][i])

model = SmallCNN()
model.load_state_dict(d["model"])
data = Logged()
loader = DataLoader(data, batch_size=32)
# the clean pass alone: one probe of sample 0, then every sample of this rank's batches once
fastadv.evaluate(model.eval(), loader, [], eps=0.2)
clean_reads = Logged.reads[1:]
r = fastadv.evaluate(model.eval(), loader, ["fgsm", "pgd-3"], eps=0.2)
bad = d["x"].clone()
bad[40] = 2.0  # in batch 1 (samples 32..63): rank 1's
try:
    fastadv.evaluate(model.eval(), DataLoader(Pairs(bad, d["y"]), batch_size=32), ["fgsm"], eps=0.2)
    error = "none"
except Exception as e:
    error = f"{type(e).__name__}: {e}"
torch.save({"n": r["n"], "world_size": r["world_size"], "clean": r["clean"]["correct"],
            "robust": [a["robust"] for a in r["attacks"]], "flags": r["robust_flags"],
            "clean_reads": clean_reads, "bad_batch_error": error}, f"rank{rank}.pt")
dist.destroy_process_group()
"""


# -- the command line: folders, CIFAR, memory maps ------------------------------------------------

def report_of(capsys, *argv, tmp_path, name):
    path = tmp_path / f"{name}.json"
    rc, _, err = run(capsys, "eval", *argv, "--attack", "fgsm,pgd-3", "--eps", EPS, "--batch-size", "32",
                     "--report", path, "--quiet")
    assert rc == 0, err
    import json

    return json.loads(path.read_text())


def test_folder_cifar_and_npy_give_the_numbers_of_the_same_tensors(tmp_path, capsys, cnn_ckpt, test_set):
    x, y = folder_order(*test_set)
    folder = write_folder(tmp_path / "imgs", x, y)
    x8 = (x * 255).round() / 255  # what the PNGs hold
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x8.numpy(), y=y.numpy())
    images, labels = tmp_path / "images.npy", tmp_path / "labels.npy"
    np.save(images, (x8.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))  # NHWC uint8
    np.save(labels, y.numpy())
    base = ["--checkpoint", cnn_ckpt]
    ref = report_of(capsys, *base, "--data", npz, tmp_path=tmp_path, name="npz")
    runs = {"folder": ["--data", folder], "folder, 2 workers": ["--data", folder, "--workers", "2"],
            "npy": ["--data", images, "--labels", labels], "npy, 2 workers": ["--data", images, "--labels", labels,
                                                                            "--workers", "2"]}
    for name, argv in runs.items():
        r = report_of(capsys, *base, *argv, tmp_path=tmp_path, name=name.replace(" ", "_").replace(",", ""))
        assert r["n"] == 150 and r["clean"] == {**ref["clean"], "seconds": r["clean"]["seconds"]}, name
        assert [a["robust"] for a in r["attacks"]] == [a["robust"] for a in ref["attacks"]], name


def test_eval_plots_on_a_streamed_folder_equal_those_of_the_same_tensors(tmp_path, capsys, cnn_ckpt, test_set):
    """--plots on a streamed folder (evaluated batch by batch at every eps): the curve of the
    same images as tensors, and both figures."""
    import json

    from PIL import Image

    x, y = folder_order(*test_set)
    folder = write_folder(tmp_path / "imgs", x, y)
    np.savez(tmp_path / "d.npz", x=((x * 255).round() / 255).numpy(), y=y.numpy())  # what the PNGs hold
    curves = {}
    for name, data in (("folder", ["--data", folder]), ("npz", ["--data", tmp_path / "d.npz"])):
        rc, out, err = run(capsys, "eval", *data, "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS,
                           "--batch-size", "32", "--report", tmp_path / f"{name}.json", "--plots", tmp_path / name,
                           "--quiet")
        assert rc == 0 and "plots:" in out, err
        curves[name] = json.loads((tmp_path / f"{name}.json").read_text())["robust_curve"]
        for png in ("robust_vs_eps.png", "adversarial_examples.png"):
            with Image.open(tmp_path / name / png) as im:
                assert im.format == "PNG"
    assert curves["folder"] == curves["npz"] and len(curves["npz"]["curves"]["fgsm"]) == 5


def write_cifar(root, x, y, kind="cifar-10", drop=None):
    """The python-pickle layout, images from x [N, 1, 8, 8] upsampled to 3x32x32."""
    root.mkdir()
    img = (x.repeat(1, 3, 4, 4) * 255).round().to(torch.uint8).reshape(len(x), -1).numpy()
    key = b"labels" if kind == "cifar-10" else b"fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if kind == "cifar-10" else ["train", "test"]
    for f in files:
        if f != drop:
            with open(root / f, "wb") as fh:
                pickle.dump({b"data": img, key: y.tolist()}, fh)
    meta = {b"label_names": [str(i).encode() for i in range(10)]} if kind == "cifar-10" else \
        {b"fine_label_names": [str(i).encode() for i in range(10)]}
    with open(root / ("batches.meta" if kind == "cifar-10" else "meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return root


@pytest.mark.parametrize("kind", ["cifar-10", "cifar-100"])
def test_cifar_python_layout(tmp_path, kind, digits):
    (x, y), _ = digits
    root = write_cifar(tmp_path / kind, x[:40], y[:40], kind)
    train = datasets.open_data(str(root), "train")
    test = datasets.open_data(str(root), "test", limit=7)
    assert len(train) == (200 if kind == "cifar-10" else 40) and len(test) == 7
    xb, yb = next(test.batches([[0, 6]]))
    expected = (x[[0, 6]].repeat(1, 3, 4, 4) * 255).round() / 255
    assert torch.equal(xb, expected) and torch.equal(yb, y[[0, 6]])
    assert test.dataset.classes == [str(i) for i in range(10)]


def test_cifar_missing_batch_and_foreign_pickles_are_refused(tmp_path, capsys, digits):
    (x, y), _ = digits
    root = write_cifar(tmp_path / "c10", x[:8], y[:8], drop="data_batch_3")
    fails(capsys, "train", "--data", root, "--method", "plain", "--out", tmp_path / "m.pt",
          match="lacks the batch file data_batch_3")
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": os.system, b"labels": []}, fh)  # a pickle that would call code
    with pytest.raises(DataError, match="refusing posix.system"):
        datasets.open_data(str(root), "test")


def test_bad_folders_and_options(tmp_path, capsys, cnn_ckpt, test_set):
    x, y = folder_order(*test_set)
    base = ["eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--quiet", "--data"]
    folder = write_folder(tmp_path / "imgs", x[:40], y[:40])
    fails(capsys, *base, folder, "--workers", "-1", match="--workers must be >= 0, got -1")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((folder / "class_0" / "00000.png").read_bytes())
    fails(capsys, *base, flat, match="has no class sub-folders")
    last = folder / sorted(os.listdir(folder))[-1]
    png = last / sorted(os.listdir(last))[0]
    (last / "zero.png").write_bytes(b"")
    (last / "truncated.png").write_bytes(png.read_bytes()[:40])
    for workers in ("0", "2"):
        err = fails(capsys, *base, folder, "--workers", workers, match="cannot read image")
        assert "truncated.png" in err or "zero.png" in err
    rc, out, err = run(capsys, *base[:-2], "--data", folder, "--skip-bad", "--workers", "2")
    assert rc == 0, err
    assert "--skip-bad: skipped 2 unreadable image(s) of 42" in err and "40 samples" in out
    mixed = write_folder(tmp_path / "mixed", x[:20], y[:20])
    write_folder(mixed, x[20:21], y[20:21], rgb=True)
    fails(capsys, *base, mixed, match="all images must have the same size and channels")
    fails(capsys, *base, tmp_path / "d.npy", match="neither 'digits' nor an existing folder")


def test_mixed_image_sizes_with_resize_and_crop(tmp_path):
    from PIL import Image

    root = tmp_path / "sizes"
    for label, size in ((0, (40, 30)), (1, (17, 23)), (1, (64, 64))):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (255, 0, 128)).save(root / f"c{label}" / f"{size[0]}.png")
    with pytest.raises(DataError, match="all images must have the same size"):
        source = datasets.open_data(str(root), "test")
        list(source.batches([range(3)]))
    source = datasets.open_data(str(root), "test", resize=12, crop=10)
    xb, yb = next(source.batches([range(3)]))
    assert xb.shape == (3, 3, 10, 10) and yb.tolist() == [0, 1, 1]
    assert torch.equal(xb[:, 0], torch.ones(3, 10, 10)) and torch.equal(xb[:, 1], torch.zeros(3, 10, 10))
    with pytest.raises(DataError, match="smaller than --crop 20"):
        list(datasets.open_data(str(root), "test", crop=20).batches([range(3)]))


def _anonymous_mib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads a worker's memory from Linux's /proc")
def test_a_workers_memory_does_not_grow_with_the_images_it_reads(tmp_path):
    """A batch stacked in ordinary memory in a worker (and moved to shared memory when
    sent), or read as one batch-sized float temporary, grew the worker's heap by about
    2 MiB per 128-image batch of 3x64x64: 80 batches here grew it by 150+ MiB."""
    images = np.random.default_rng(0).integers(0, 256, (512, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.arange(512) % 10)
    source = datasets.open_data(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), workers=1)
    index_lists = [torch.arange(512).roll(-k).split(128) for k in range(20)]  # 80 batches, 10240 images
    me, anon = os.getpid(), []
    for i, (xb, yb) in enumerate(source.batches([idx for lists in index_lists for idx in lists])):
        if i in (8, 79):
            with open(f"/proc/{me}/task/{me}/children") as f:
                anon.append(_anonymous_mib(int(f.read().split()[0])))
        if i == 76:  # samples 19..146 of the file, converted as the tensors would be
            assert torch.equal(xb, torch.from_numpy(images[19:147]).float() / 255) and torch.equal(yb, torch.arange(19, 147) % 10)
    assert anon[1] - anon[0] < 24, f"the worker's anonymous memory grew from {anon[0]:.0f} to {anon[1]:.0f} MiB"


# -- resuming a streamed run -----------------------------------------------------------------------

def _steps_done(path):
    try:
        s = torch.load(path, weights_only=True)
        return s["epoch"] * 4 + s["step"]
    except Exception:
        return -1


# SmallCNN whose every forward also waits 0.1 s: a step (two forwards with fgsm-rs) then lasts
# at least 0.2 s, so a test polling every 10 ms sees each state the run writes, even when a busy
# machine delays it by a few hundred milliseconds; its numbers are SmallCNN's.
SLOW_MODEL = """
import time
from fastadv.models import SmallCNN

class SlowCNN(SmallCNN):
    def forward(self, x):
        time.sleep(0.1)
        return super().forward(x)
"""


def test_sigkilled_streamed_run_resumes_bit_exact_and_refuses_other_data(tmp_path, capsys, digits, monkeypatch):
    (x, y), _ = digits
    x, y = folder_order(x[:128], y[:128])
    folder = write_folder(tmp_path / "imgs", x, y)
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    cmd = [sys.executable, "-m", "fastadv", "train", "--data", str(folder), "--workers", "1", "--method", "fgsm-rs",
           "--eps", str(EPS), "--batch-size", "32", "--epochs", "2", "--save-every", "1", "--state", "run.state",
           "--model", "slow_model:SlowCNN", "--model-args", '{"in_channels": 1, "n_classes": 10, "image_size": 8}',
           "--out", "model.pt", "--quiet"]  # 4 steps per epoch
    state = tmp_path / "run.state"
    proc = subprocess.Popen(cmd, env=run_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while _steps_done(state) < 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "the training made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed: {err[-2000:]}"
    killed_at = _steps_done(state)
    assert 5 <= killed_at < 8, killed_at  # mid-epoch, in the second epoch
    done = subprocess.run([c for c in cmd if c != "--quiet"], env=run_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from run.state: epoch 2, step {killed_at % 4}" in done.stderr

    torch.manual_seed(0)  # the uninterrupted run on the same images as tensors: the CLI's seeds
    model = SmallCNN(in_channels=1, n_classes=10, image_size=8)
    torch.manual_seed(1)
    x8 = (x * 255).round() / 255
    history = fit(model, x8, y, TrainConfig(method="fgsm-rs", eps=EPS), epochs=2, batch_size=32, seed=0)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert [h["loss"] for h in ckpt["train"]["history"]] == [h["loss"] for h in history]

    before = state.read_bytes()
    os.utime(folder / "class_0" / "00000.png", ns=(1, 1))  # the same file list, one file changed
    argv = cmd[3:cmd.index("--state")] + ["--state", state, "--out", tmp_path / "other.pt", "--quiet"]
    monkeypatch.syspath_prepend(str(tmp_path))  # slow_model, for the run in this process
    err = fails(capsys, *argv, match="belongs to another training run")
    assert "data_sha256" in err and state.read_bytes() == before


# -- models -----------------------------------------------------------------------------------------

def test_normalization_happens_inside_the_model(tmp_path, capsys, cnn_ckpt, test_set, trained_models):
    x, y = test_set
    mean, std = [0.25], [0.5]
    inner = trained_models["cnn"]
    torch.save(inner.state_dict(), cnn_ckpt)
    wrapped = datasets.Normalized(inner, mean, std).eval()
    assert torch.equal(wrapped(x[:4]), inner((x[:4] - 0.25) / 0.5))
    expected = evaluate(wrapped, x, y, ["fgsm"], eps=EPS, batch_size=32)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    r = report_of(capsys, "--checkpoint", cnn_ckpt, "--data", tmp_path / "d.npz", "--mean", "0.25", "--std", "0.5",
                  tmp_path=tmp_path, name="norm")
    assert r["normalize"] == {"mean": mean, "std": std}
    assert r["clean"]["correct"] == expected["clean"]["correct"]
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--mean", "0.5",
          match="--mean and --std go together")
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--mean", "0.5", "0.5",
          "--std", "1", "1", "--limit", "4", match="--mean/--std have 2 values, the images 1 channels")


@pytest.mark.parametrize("spec, missing", [("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")])
def test_model_adapters_name_a_missing_package(spec, missing, capsys, tmp_path):
    try:
        __import__(missing)
        pytest.skip(f"{missing} imports here: the adapter is exercised on the GPU machine instead")
    except Exception:
        pass
    fails(capsys, "train", "--method", "plain", "--model", spec, "--out", tmp_path / "m.pt",
          match=f"--model {spec} needs the package {missing}")


def test_robustbench_adapter_needs_local_weights(capsys, tmp_path):
    fails(capsys, "eval", "--model", "robustbench:Carmon2019Unlabeled", "--attack", "fgsm", "--eps", EPS,
          match="needs --model-dir DIR")
    fails(capsys, "eval", "--model", "robustbench:Carmon2019Unlabeled", "--model-dir", tmp_path, "--attack", "fgsm",
          "--eps", EPS, match=f"no weights at {tmp_path}/cifar10/Linf/Carmon2019Unlabeled.pt (fastadv downloads nothing")
    fails(capsys, "eval", "--model", "robustbench:X", "--model-dir", tmp_path, "--model-args", '{"norm": 1}',
          "--attack", "fgsm", "--eps", EPS, match="takes the model arguments dataset and threat_model")
    fails(capsys, "eval", "--model", "torchvision:resnet18", "--attack", "fgsm", "--eps", EPS,
          match="--checkpoint is required")
