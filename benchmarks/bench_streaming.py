"""Peak memory and throughput of `fastadv train` / `fastadv eval` on image folders.

    .venv/bin/python -m benchmarks.make_image_folder /tmp/f10k --images 10000
    .venv/bin/python -m benchmarks.make_image_folder /tmp/f40k --images 40000
    .venv/bin/python -m benchmarks.bench_streaming memory --folder /tmp/f10k --folder /tmp/f40k \\
        [--baseline-tree DIR --baseline-name main]   # DIR: an exported tree of another commit
    .venv/bin/python -m benchmarks.bench_streaming throughput --folder /tmp/f10k --workers 0 2

memory: each command runs in its own process; a sampler reads VmRSS of the process and
all its descendants (DataLoader workers) from /proc every 50 ms. Reported: the peak of
that sum over the tree (shared pages counted once per process: an upper bound) and
the largest single process (ru_maxrss from wait4). The model is an MLP with 16 hidden
units (`--model fastadv.models:MLP`), so that the data path, not the model, sets the
memory and the run time: `train --method fgsm-rs --epochs 1` then `eval --attack fgsm`
with the checkpoint it wrote. With --baseline-tree the same commands also run with
PYTHONPATH set to that tree (the code before streaming: it decodes every image into
one array first).

throughput: images/s of the loader alone (fastadv.datasets.open_data's DataLoader,
decoding every image once in batches of 128) against the whole `fastadv train
--method fgsm-rs` epoch (SmallCNN, the default model; images / epoch seconds from the
training record), with 0 and N workers.

Rows go to benchmarks/results/streaming_cpu.json and .md with device, commit, versions,
date and the load average (a shared machine's throughput varies with it).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402

MLP = ["--model", "fastadv.models:MLP", "--model-args", '{"in_features": 12288, "hidden": 16}']
RESULTS = ROOT / "benchmarks" / "results" / "streaming_cpu"


def _tree_rss_kb(pid):
    """VmRSS of pid and all its descendants, in kB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd, env, cwd):
    """(returncode, seconds, peak tree RSS MiB, largest process MiB, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, ended = [], {}
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    waiter = threading.Thread(target=lambda: ended.update(zip(("pid", "status", "usage"), os.wait4(proc.pid, 0))))
    reader.start()
    waiter.start()
    peak = 0
    while waiter.is_alive():
        peak = max(peak, _tree_rss_kb(proc.pid))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - t0
    largest = ended["usage"].ru_maxrss  # kB: the process, or a descendant it waited for if larger
    return os.waitstatus_to_exitcode(ended["status"]), seconds, peak / 1024, largest / 1024, "".join(err)[-2000:]


def _env(tree=None):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if tree:
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def memory(args):
    rows = []
    versions = [] if args.baseline_only else [("this", None, [["--workers", str(w)] for w in args.workers])]
    if args.baseline_tree:
        versions.insert(0, (args.baseline_name, args.baseline_tree, [[]]))
    for folder in args.folder:
        n = sum(len(files) for _, _, files in os.walk(folder))
        for name, tree, options in versions:
            for extra in options:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = os.path.join(tmp, "m.pt")
                    py = [sys.executable, "-m", "fastadv"]
                    common = ["--data", folder, "--eps", "0.03", "--batch-size", "128", "--quiet", *extra]
                    for command, argv in (("train fgsm-rs 1 epoch", ["train", *common, *MLP, "--method", "fgsm-rs",
                                                                      "--epochs", "1", "--out", ckpt]),
                                          ("eval fgsm", ["eval", *common, "--checkpoint", ckpt, "--attack", "fgsm"])):
                        rc, seconds, tree_mib, largest_mib, err = measure(py + argv, _env(tree), tmp)
                        if rc != 0:
                            raise SystemExit(f"{name} {command} on {folder} failed ({rc}):\n{err}")
                        row = {"case": "memory", "code": name, "command": command, "images": n,
                               "workers": int(extra[1]) if extra else 0, "peak_tree_rss_mib": round(tree_mib),
                               "largest_process_rss_mib": round(largest_mib), "seconds": round(seconds, 1),
                               "argv": " ".join(["fastadv", *argv]).replace(tmp, "TMP")}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        write([row])
    return rows


def throughput(args):
    import torch

    from fastadv import datasets

    rows = []
    for folder in args.folder:
        for workers in args.workers:
            source = datasets.open_data(folder, "train", workers=workers)
            n = len(source)
            t0 = time.perf_counter()
            for _ in source.batches(torch.arange(n).split(128)):
                pass
            loader = n / (time.perf_counter() - t0)
            with tempfile.TemporaryDirectory() as tmp:
                report = os.path.join(tmp, "r.json")
                argv = ["train", "--data", folder, "--method", "fgsm-rs", "--eps", "0.03", "--epochs", "1",
                        "--batch-size", "128", "--workers", str(workers), "--out", os.path.join(tmp, "m.pt"),
                        "--report", report, "--quiet"]
                done = subprocess.run([sys.executable, "-m", "fastadv", *argv], env=_env(), cwd=tmp,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-2000:])
                epoch = json.loads(pathlib.Path(report).read_text())["history"][0]
            row = {"case": "throughput", "images": n, "workers": workers,
                   "loader_images_per_s": round(loader, 1),
                   "train_fgsm_rs_smallcnn_images_per_s": round(epoch["images"] / epoch["seconds"], 1),
                   "argv": " ".join(["fastadv", *argv]).replace(tmp, "TMP")}
            print(json.dumps(row), flush=True)
            rows.append(row)
            write([row])
    return rows


def _key(row):
    return tuple(row.get(k) for k in ("case", "code", "command", "images", "workers"))


def write(rows):
    """Adds rows to the results (replacing earlier rows of the same case, code, command,
    images and workers); several runs of this script may add to one file."""
    import torch

    env = results.environment(torch.device("cpu"))
    env["load_average_1m_5m_15m"] = [round(v, 2) for v in os.getloadavg()]
    path = RESULTS.with_suffix(".json")
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {_key(r) for r in rows}
    rows = sorted([r for r in old if _key(r) not in new] + [{**r, **env} for r in rows],
                  key=lambda r: [str(v) for v in _key(r)])
    path.write_text(json.dumps({"schema": 1, "rows": rows}, indent=1) + "\n")
    lines = ["# Streaming data: peak memory and throughput (CPU)", "",
             "Written by `python -m benchmarks.bench_streaming` (see its docstring for the method).", ""]
    mem = [r for r in rows if r["case"] == "memory"]
    if mem:
        lines += ["| code | command | images | workers | peak RSS, process tree (MiB) | largest process (MiB) | seconds |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['code']} | {r['command']} | {r['images']} | {r['workers']} | {r['peak_tree_rss_mib']} | "
                  f"{r['largest_process_rss_mib']} | {r['seconds']} |" for r in mem]
        lines.append("")
    thr = [r for r in rows if r["case"] == "throughput"]
    if thr:
        lines += ["| images | workers | loader alone (images/s) | whole train epoch, fgsm-rs SmallCNN (images/s) |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['images']} | {r['workers']} | {r['loader_images_per_s']} | "
                  f"{r['train_fgsm_rs_smallcnn_images_per_s']} |" for r in thr]
        lines.append("")
    r0 = rows[-1]
    lines.append(f"{r0['device']}, commit {r0['commit']}, torch {r0['torch']}, python {r0['python']}, {r0['date']}, "
                 f"load average {r0['load_average_1m_5m_15m']} (a machine shared with other jobs)")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {RESULTS.with_suffix('.md')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["memory", "throughput"])
    p.add_argument("--folder", action="append", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--baseline-tree", help="an exported tree of the code to compare with (PYTHONPATH)")
    p.add_argument("--baseline-name", default="baseline")
    p.add_argument("--baseline-only", action="store_true", help="measure only the baseline tree")
    args = p.parse_args(argv)
    memory(args) if args.case == "memory" else throughput(args)


if __name__ == "__main__":
    main()
