"""AutoAttack on the CPU: fastadv against the original (pyautoattack 0.2.0), the whole
cascade and each sub-attack, in one process, alternating, on the same model and inputs.

    .venv/bin/python -m benchmarks.bench_autoattack_cpu             # full standard version (~10 min, 2 cores)
    .venv/bin/python -m benchmarks.bench_autoattack_cpu --quick     # steps 10, 500 queries (~2 min)

Model: fastadv.models.SmallCNN trained with PGD-AT (fastadv.train.fit, method 'pgd',
eps 0.2 by default) on scikit-learn's digits train split; inputs: the test split (449).
Both AutoAttacks run version='standard', Linf, eps, seed 0, the same chunk size
(``--chunk``, 250 = the original's default) through run_standard_evaluation.

- cascade: the whole evaluation (APGD-CE, APGD-T, FAB-T, Square).
- one row per sub-attack: the standard version's settings with that attack alone
  (attacks_to_run = [name]), on the points the earlier stages leave robust (taken
  from fastadv's robust flags of the cascade, which equal the original's): the work
  that stage does inside the cascade.

Each case runs ``--rounds`` times per library, alternating (A B, then B A, ...), after
one untimed warm-up on a few samples. Reported: medians of this process's CPU time
(time.process_time: steady on a shared machine) and of the wall time, the speedup
(original / fastadv, CPU time), whether every pair of outputs was bit-identical
(torch.equal on x_adv and y_adv), and the model calls each library made (forwards with
and without gradient, and the rows they carried), counted once per case by a hook.
The original's sanity checks (check_randomized: 5 forwards, check_range_output,
check_dynamic) are part of its run and are timed with it.

Rows go to benchmarks/results/autoattack_cpu.json and .md (same provenance fields as
the other benchmarks: device, commit, torch, triton, python, date).
"""
import argparse
import logging
import os
import pathlib
import statistics
import sys
import time

import torch

from . import results

RESULTS_JSON = results.RESULTS_DIR / "autoattack_cpu.json"
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


# -- the model ---------------------------------------------------------------------------------


def trained_model(eps, epochs, seed):
    """SmallCNN, PGD-AT on digits (10-step PGD, alpha 2.5 eps / 10); eval mode."""
    from fastadv.data import load_digits
    from fastadv.models import SmallCNN
    from fastadv.train import TrainConfig, fit

    (x, y), test = load_digits(seed=0)
    torch.manual_seed(seed)
    model = SmallCNN()
    fit(model, x, y, TrainConfig(method="pgd", eps=eps, steps=10), epochs=epochs, seed=seed)
    return model.eval(), test


class CallCounter:
    """Counts the model's calls: (calls, rows) with and without an input that requires grad."""

    def __init__(self, model):
        self.counts = {}
        self.enabled = False
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if self.enabled:
            grad = torch.is_grad_enabled() and inputs[0].requires_grad
            c = self.counts.setdefault("grad" if grad else "nograd", [0, 0])
            c[0] += 1
            c[1] += inputs[0].shape[0]

    def run(self, fn):
        self.counts, self.enabled = {}, True
        try:
            fn()
        finally:
            self.enabled = False
        return {k: tuple(v) for k, v in self.counts.items()}


# -- the two AutoAttacks -----------------------------------------------------------------------


def original(model, x, y, *, eps, attacks, steps, n_queries, chunk):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, seed=0, device="cpu", version="standard")
    aa.verbose = False
    if attacks:  # the standard version's settings, some of its attacks
        aa.attacks_to_run = list(attacks)
    if steps is not None:  # the original fixes APGD's checkpoint schedule in its constructor
        for sub in (aa.apgd, aa.apgd_targeted):
            sub.n_iter = steps
            sub.n_iter_2, sub.n_iter_min, sub.size_decr = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))
        aa.fab.n_iter = steps
    if n_queries is not None:
        aa.square.n_queries = n_queries
    return aa.run_standard_evaluation(x, y, batch_size=chunk)


def ours(model, x, y, *, eps, attacks, steps, n_queries, chunk, keep=None):
    import fastadv

    aa = fastadv.AutoAttack(model, norm="Linf", eps=eps, seed=0, steps=steps, n_queries=n_queries)
    if attacks:  # the standard version's settings, some of its attacks
        aa.attacks_to_run = list(attacks)
    out = aa.run_standard_evaluation(x, y, batch_size=chunk)
    if keep is not None:
        keep.append(aa)
    return out


# -- timing ------------------------------------------------------------------------------------


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def compare(name, model, x, y, counter, *, rounds, log, **kw):
    """Alternating runs of both libraries on (x, y); one result row."""
    fns = {
        "fastadv": lambda: ours(model, x, y, **kw),
        "original": lambda: original(model, x, y, **kw),
    }
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    equal = True
    for r in range(rounds):
        outs = {}
        for lib in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            outs[lib], c, w = timed(fns[lib])
            cpu[lib].append(c)
            wall[lib].append(w)
        (xa, ya), (xb, yb) = outs["fastadv"], outs["original"]
        equal = equal and torch.equal(xa, xb) and torch.equal(ya, yb)
        log(f"  {name} round {r + 1}: fastadv {cpu['fastadv'][-1]:.2f} s, original {cpu['original'][-1]:.2f} s "
            f"(CPU time), bit-identical {torch.equal(xa, xb) and torch.equal(ya, yb)}")
    calls = {lib: counter.run(fn) for lib, fn in fns.items()}
    med = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}

    def fmt_calls(c):
        return " / ".join(f"{k} {c[k][0]} calls {c[k][1]} rows" for k in ("grad", "nograd") if k in c)

    return {
        "bench": "autoattack-cpu",
        "case": f"{name} n={len(y)} chunk={kw['chunk']} steps={kw['steps']} queries={kw['n_queries']}",
        "attack": name, "n": len(y), "chunk": kw["chunk"], "eps": kw["eps"],
        "steps": kw["steps"] if kw["steps"] is not None else 100,
        "n_queries": kw["n_queries"] if kw["n_queries"] is not None else 5000,
        "fastadv_cpu_s": round(med["fastadv"], 3), "original_cpu_s": round(med["original"], 3),
        "speedup": round(med["original"] / med["fastadv"], 3),
        "fastadv_wall_s": round(med_wall["fastadv"], 3), "original_wall_s": round(med_wall["original"], 3),
        "speedup_wall": round(med_wall["original"] / med_wall["fastadv"], 3),
        "bit_identical": equal, "rounds": rounds,
        "fastadv_model_calls": fmt_calls(calls["fastadv"]), "original_model_calls": fmt_calls(calls["original"]),
        "fastadv_cpu_samples_s": [round(v, 3) for v in cpu["fastadv"]],
        "original_cpu_samples_s": [round(v, 3) for v in cpu["original"]],
    }


COLUMNS = [
    ("attack", "attack"), ("n", "n"), ("chunk", "chunk"), ("steps", "steps"), ("queries", "n_queries"),
    ("fastadv CPU s", "fastadv_cpu_s"), ("original CPU s", "original_cpu_s"), ("speedup", "speedup"),
    ("fastadv wall s", "fastadv_wall_s"), ("original wall s", "original_wall_s"), ("speedup (wall)", "speedup_wall"),
    ("bit-identical", "bit_identical"), ("fastadv model calls", "fastadv_model_calls"),
    ("original model calls", "original_model_calls"), ("threads", "threads"), ("load", "load_avg_1m"),
]


def render(rows):
    lines = ["# AutoAttack on the CPU: fastadv vs the original (pyautoattack 0.2.0)", "",
             "Written by `benchmarks/bench_autoattack_cpu.py` (see its docstring for the method). "
             "CPU time = time.process_time of this process; medians over alternating rounds; "
             "speedup = original / fastadv.", ""]
    envs = []
    for r in rows:
        key = tuple(r.get(k) for k in results.ENV_KEYS)
        if key not in envs:
            envs.append(key)
    for i, e in enumerate(envs, 1):
        f = dict(zip(results.ENV_KEYS, e))
        sub = [r for r in rows if tuple(r.get(k) for k in results.ENV_KEYS) == e]
        lines += [f"## Run {i}: {f['device']}; commit {f['commit']}; torch {f['torch']}; python {f['python']}; "
                  f"{f['date']} (UTC); model {sub[0].get('model')}", "", results.table(sub, COLUMNS), ""]
    return "\n".join(lines)


def write(rows, json_path):
    import json

    json_path = pathlib.Path(json_path)
    old = results.load_rows(json_path)
    merged = results.merge_rows(old, rows)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"schema": 1, "rows": merged}, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render(merged))
    return json_path, md_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=10, help="PGD-AT epochs of the SmallCNN")
    p.add_argument("--n", type=int, default=None, help="first n test digits (default: all 449)")
    p.add_argument("--chunk", type=int, default=250, help="batch_size of both run_standard_evaluation calls")
    p.add_argument("--steps", type=int, default=None, help="APGD/APGD-T/FAB-T iterations (default: 100)")
    p.add_argument("--queries", type=int, default=None, help="Square queries (default: 5000)")
    p.add_argument("--quick", action="store_true", help="--steps 10 --queries 500")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per library and case")
    p.add_argument("--cases", default="cascade," + ",".join(STAGES), help="comma list of cascade and sub-attacks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_JSON), help="results JSON (the .md beside it)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 10 if args.steps is None else args.steps
        args.queries = 500 if args.queries is None else args.queries
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c != "cascade" and c not in STAGES:
            p.error(f"unknown case {c!r}")

    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = results.environment("cpu")
    log(f"{env['device']}; commit {env['commit']}; torch {env['torch']}; {env['date']}")
    t0 = time.perf_counter()
    model, (xt, yt) = trained_model(args.eps, args.epochs, args.seed)
    for prm in model.parameters():  # as a user would hand it over; both libraries guard it themselves
        prm.requires_grad_(True)
    if args.n is not None:
        xt, yt = xt[:args.n].clone(), yt[:args.n].clone()
    with torch.no_grad():
        clean = (model(xt).argmax(1) == yt).float().mean().item()
    log(f"SmallCNN, PGD-AT {args.epochs} epochs at eps {args.eps}: clean accuracy {clean:.2%} "
        f"on {len(yt)} test digits ({time.perf_counter() - t0:.1f} s)")
    counter = CallCounter(model)
    kw = dict(eps=args.eps, steps=args.steps, n_queries=args.queries, chunk=args.chunk)

    # warm-up: both libraries on a few samples, a few iterations
    warm = dict(kw, steps=2, n_queries=5)
    ours(model, xt[:16], yt[:16], attacks=None, **warm)
    original(model, xt[:16], yt[:16], attacks=None, **warm)

    # the stages' inputs: the points robust before each stage, from fastadv's cascade
    stage_inputs = {}
    if any(c in STAGES for c in cases):
        keep = []
        _, before = timed(lambda: ours(model, xt, yt, attacks=None, keep=keep, **kw))[:2]
        flags, prev = keep[0].robust_flags, "clean"
        for name in STAGES:
            stage_inputs[name] = flags[prev].nonzero().squeeze(1)
            prev = name
        log(f"fastadv cascade (untimed pass for the stages' inputs): {before:.1f} s CPU; robust after each stage: "
            + ", ".join(f"{k} {int(v.sum())}" for k, v in flags.items()))

    rows = []
    base = dict(env, model=f"SmallCNN PGD-AT digits ({args.epochs} ep, clean {clean:.4f})", threads=args.threads)
    for case in cases:
        if case == "cascade":
            row = compare("cascade", model, xt, yt, counter, rounds=args.rounds, log=log, attacks=None, **kw)
        else:
            idx = stage_inputs[case]
            if idx.numel() == 0:
                log(f"  {case}: no robust points left, skipped")
                continue
            row = compare(case, model, xt[idx].clone(), yt[idx].clone(), counter, rounds=args.rounds, log=log,
                          attacks=[case], **kw)
        if hasattr(os, "getloadavg"):
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
        rows.append(dict(base, **row))
        log(f"{case}: fastadv {row['fastadv_cpu_s']:.2f} s, original {row['original_cpu_s']:.2f} s, "
            f"speedup {row['speedup']:.2f}x (wall {row['speedup_wall']:.2f}x), bit-identical {row['bit_identical']}")

    print(results.table(rows, COLUMNS))
    if not args.no_write:
        paths = write(rows, args.out)
        log("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
