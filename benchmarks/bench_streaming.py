"""Peak memory and throughput of `fastadv train` / `fastadv eval` on image folders.

    .venv/bin/python -m benchmarks.make_image_folder /tmp/f10k --images 10000
    .venv/bin/python -m benchmarks.make_image_folder /tmp/f40k --images 40000
    .venv/bin/python -m benchmarks.bench_streaming memory --folder /tmp/f10k --folder /tmp/f40k --workers 0 2 \\
        [--plots] [--baseline-tree DIR --baseline-name main]   # DIR: an exported tree of another commit
    .venv/bin/python -m benchmarks.bench_streaming throughput --folder /tmp/f40k --workers 0 2

memory: each command runs in its own process, as a user runs it (progress bar on);
every 0.1 s a sampler reads, for the process and all its descendants (DataLoader
workers), PSS from /proc/PID/smaps_rollup and VmRSS and VmHWM from /proc/PID/status.
Reported: the peak of PSS summed over the tree (the honest total: a page shared by k
processes, like the torch libraries the workers inherit, counts 1/k in each), the peak
of RSS summed over the tree (shared pages once per process: an upper bound), and the
largest single process's own peak RSS (VmHWM, exact, and ru_maxrss from wait4). The
model is an MLP with 16 hidden units (`--model fastadv.models:MLP`), so that the data
path, not the model, sets the memory and the run time: `train --method fgsm-rs
--epochs 1` then `eval --attack fgsm` with the checkpoint it wrote; each writes a
--report, whose images/s are recorded with the row, and whether the progress bar showed
img/s; with --plots also `eval --attack fgsm --plots DIR` (the robust-accuracy curve:
four more evaluations of the stream, and six examples drawn). With --baseline-tree the same commands also run with PYTHONPATH set to that tree
(the code before streaming: it decodes every image into one array first).

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


def _tree_pids(pid):
    """pid and all its descendants (DataLoader workers), from /proc."""
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def _fields(path, names):
    """{name: kB} of the 'Name:   123 kB' lines of a /proc file (missing: 0)."""
    out = dict.fromkeys(names, 0)
    try:
        with open(path) as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _sample(pid, hwm):
    """(PSS summed over the tree, RSS summed over the tree, in kB; the number of processes);
    records each process's VmHWM (its own exact peak RSS) in hwm."""
    pss = rss = 0
    pids = _tree_pids(pid)
    for p in pids:
        pss += _fields(f"/proc/{p}/smaps_rollup", ("Pss",))["Pss"]
        status = _fields(f"/proc/{p}/status", ("VmRSS", "VmHWM"))
        rss += status["VmRSS"]
        hwm[p] = max(hwm.get(p, 0), status["VmHWM"])
    return pss, rss, len(pids)


def measure(cmd, env, cwd, interval=0.1):
    """Runs cmd and samples its process tree every interval seconds. Returns a dict:
    returncode, seconds, peak_tree_pss_mib (the peak of PSS summed over the tree: a
    shared page is split among the processes that map it, so the torch libraries the
    workers share with the main process count once), peak_tree_rss_mib (the peak of
    RSS summed over the tree: shared pages once per process, an upper bound),
    largest_process_rss_mib (the largest single process's own peak RSS: VmHWM, and
    ru_maxrss from wait4, which also covers a child that ended between two samples),
    processes (most seen at once) and stderr (its tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, ended = [], {}
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    waiter = threading.Thread(target=lambda: ended.update(zip(("pid", "status", "usage"), os.wait4(proc.pid, 0))))
    reader.start()
    waiter.start()
    peak_pss = peak_rss = processes = 0
    hwm = {}
    while waiter.is_alive():
        pss, rss, n = _sample(proc.pid, hwm)
        peak_pss, peak_rss, processes = max(peak_pss, pss), max(peak_rss, rss), max(processes, n)
        time.sleep(interval)
    reader.join()
    seconds = time.perf_counter() - t0
    largest = max([ended["usage"].ru_maxrss, *hwm.values()])  # kB
    return {"returncode": os.waitstatus_to_exitcode(ended["status"]), "seconds": seconds,
            "peak_tree_pss_mib": peak_pss / 1024, "peak_tree_rss_mib": peak_rss / 1024,
            "largest_process_rss_mib": largest / 1024, "processes": processes, "stderr": "".join(err)}


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
                    ckpt, report = os.path.join(tmp, "m.pt"), os.path.join(tmp, "report.json")
                    py = [sys.executable, "-m", "fastadv"]
                    common = ["--data", folder, "--eps", "0.03", "--batch-size", "128", "--report", report,
                              "--overwrite", *extra]  # no --quiet: the progress bar is part of the run
                    commands = [("train fgsm-rs 1 epoch", ["train", *common, *MLP, "--method", "fgsm-rs", "--epochs", "1",
                                                           "--out", ckpt]),
                                ("eval fgsm", ["eval", *common, "--checkpoint", ckpt, "--attack", "fgsm"])]
                    if args.plots:  # 4 more evaluations (eps/4 .. eps) and 6 examples drawn
                        commands.append(("eval fgsm --plots", [*commands[1][1], "--plots", os.path.join(tmp, "plots")]))
                    for command, argv in commands:
                        m = measure(py + argv, _env(tree), tmp)
                        if m["returncode"] != 0:
                            raise SystemExit(f"{name} {command} on {folder} failed ({m['returncode']}):\n"
                                             f"{m['stderr'][-2000:]}")
                        row = {"case": "memory", "code": name, "command": command, "images": n,
                               "workers": int(extra[1]) if extra else 0,
                               **{k: round(m[k]) for k in ("peak_tree_pss_mib", "peak_tree_rss_mib",
                                                           "largest_process_rss_mib")},
                               "processes": m["processes"], "seconds": round(m["seconds"], 1),
                               "images_per_s": _run_images_per_s(report),
                               "progress_bar_shows_images_per_s": " img/s" in m["stderr"],
                               "argv": " ".join(["fastadv", *argv]).replace(tmp, "TMP")}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        write([row])
    return rows


def _run_images_per_s(report):
    """Images/s of a run from its --report: the training epoch's, or the evaluation's
    (None from code whose reports lack them)."""
    r = json.loads(pathlib.Path(report).read_text())
    if "history" in r:
        epoch = r["history"][0]
        return round(epoch["images"] / epoch["seconds"], 1) if "images" in epoch else None
    return round(r["images_per_second"], 1) if r.get("images_per_second") else None


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


def _short(commit):
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _load(row):
    load = row.get("load_average_1m_5m_15m")
    return "-" if not load else load[0]


def _cell(row, key):
    return "-" if row.get(key) is None else row[key]


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
             "Written by `python -m benchmarks.bench_streaming` (see its docstring for the method). Code: `this` "
             "is the commit in the row; `main (ff07048)` is that commit's fastadv (an exported tree on PYTHONPATH, "
             "which decodes every image into one array first) run by the bench at the row's commit.", ""]
    mem = [r for r in rows if r["case"] == "memory"]
    if mem:
        lines += ["Peak memory in MiB. PSS tree: proportional set size summed over the process and its DataLoader "
                  "workers (shared pages split among the processes that map them; sampled every 0.1 s from "
                  "/proc/PID/smaps_rollup). RSS tree: resident set size summed the same way (shared pages counted "
                  "once per process: an upper bound). Largest process: the largest single process's own peak RSS "
                  "(VmHWM, ru_maxrss). Images/s: the training epoch's or the evaluation's, from its report "
                  "(times depend on the machine's load; memory does not).", "",
                  "| code | command | images | workers | PSS tree | RSS tree | largest process | processes | "
                  "images/s | seconds | commit | date | load 1m |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        lines += [f"| {r['code']} | {r['command']} | {r['images']} | {r['workers']} | {_cell(r, 'peak_tree_pss_mib')} | "
                  f"{r['peak_tree_rss_mib']} | {r['largest_process_rss_mib']} | {_cell(r, 'processes')} | "
                  f"{_cell(r, 'images_per_s')} | {r['seconds']} | {_short(r['commit'])} | {r['date'][:16]} | "
                  f"{_load(r)} |" for r in mem]
        lines.append("")
    thr = [r for r in rows if r["case"] == "throughput"]
    if thr:
        lines += ["Throughput in images/s: the loader alone (fastadv.datasets.open_data's DataLoader decoding every "
                  "image once, batches of 128) and the whole `fastadv train --method fgsm-rs` epoch of SmallCNN "
                  "(the default model), with the same number of workers.", "",
                  "| images | workers | loader alone | whole train epoch, fgsm-rs SmallCNN | commit | date | load 1m |",
                  "|---:|---:|---:|---:|---|---|---:|"]
        lines += [f"| {r['images']} | {r['workers']} | {r['loader_images_per_s']} | "
                  f"{r['train_fgsm_rs_smallcnn_images_per_s']} | {_short(r['commit'])} | {r['date'][:16]} | "
                  f"{_load(r)} |" for r in thr]
        lines.append("")
    r0 = rows[-1]
    lines.append(f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, python {r0['python']}; "
                 "the machine is shared with other jobs (load average at the end of each row's run).")
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
    p.add_argument("--plots", action="store_true", help="memory: also `eval --attack fgsm --plots DIR`")
    args = p.parse_args(argv)
    memory(args) if args.case == "memory" else throughput(args)


if __name__ == "__main__":
    main()
