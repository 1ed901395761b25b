"""AutoAttack's model calls per sub-attack: the original (pyautoattack 0.2.0), fastadv, and
fastadv with the flags-only shortcut (early_stop), with the robust flags compared and CPU time.

    python -m benchmarks.bench_autoattack_calls                       # digits CNN, full standard version
    python -m benchmarks.bench_autoattack_calls --models robust-resnet18 --n 8 --eps 0.00392 --steps 10 \
        --queries 50 --cases cascade,apgd-ce --out benchmarks/results/autoattack_calls_cpu_resnet18

Inputs: the digits test split for digits-cnn, else random images labelled with the model's
predictions (bench_attacks.make_inputs).

The three run version='standard', Linf, seed 0, the same chunk size, each on the same
fastadv.calls.CallCounter around the model (its few microseconds per call weigh on each
alike). Calls are in samples: a forward of a chunk of 250 counts 250; gradients are
backward passes reaching the logits. The original's calls per stage are read at its
stage boundaries (before its first sub-attack, then each EvaluationState.add_run_attack);
its 'clean' stage includes its sanity checks' forwards. fastadv's come from its report.
'flags equal' is torch.equal of the per-sample robust flags after every stage with the
original's; 'images equal' is torch.equal of the returned x_adv.

Timed cases (CPU time of this process, --clock cpu, median over --rounds alternating
rounds after the counted one, 1 thread by default): the whole cascade, and APGD-CE and
APGD-T alone on the points robust before them in the cascade (version='custom' with one
attack and the standard settings), where the shortcut acts. Square on the points that stay
robust queries the model n_queries times per point whatever is done: no exact shortcut
removes those calls, and FAB-T and Square are unchanged by early_stop.
"""
import argparse
import logging
import sys
from unittest import mock

import torch

from . import models as bench_models
from . import results, timing
from .bench_attacks import make_inputs
from .bench_cycle_exit import write

OUT = results.RESULTS_DIR / "autoattack_calls_cpu"
STAGES = ("clean", "apgd-ce", "apgd-t", "fab-t", "square")
VARIANTS = ("original", "fastadv", "fastadv + early_stop")


class OriginalStages:
    """Runs pyautoattack's AutoAttack and reads the counter at its stage boundaries."""

    def __init__(self, counter):
        self.counter = counter

    def __call__(self, x, y, *, eps, attacks, steps, n_queries, chunk):
        from pyautoattack.state import EvaluationState

        from .bench_autoattack_cpu import original

        self.calls, self.flags = {}, {}
        marks = []

        def mark():
            marks.append((self.counter.forwards, self.counter.backwards))

        def first_perturb(sub):
            perturb = sub.perturb

            def wrapped(*args, **kwargs):
                if len(marks) == 0:
                    mark()  # the checks and the clean pass end here
                return perturb(*args, **kwargs)
            return wrapped

        add_run_attack = EvaluationState.add_run_attack

        def record(state, attack):
            mark()
            (f0, b0), (f1, b1) = marks[-2], marks[-1]
            self.calls[attack] = (f1 - f0, b1 - b0)
            self.flags[attack] = state.robust_flags.clone()
            add_run_attack(state, attack)

        from pyautoattack import AutoAttack

        def build(*args, **kwargs):
            aa = AutoAttack(*args, **kwargs)
            for sub in (aa.apgd, aa.apgd_targeted, aa.fab, aa.square):
                sub.perturb = first_perturb(sub)
            return aa

        self.counter.reset()
        with mock.patch.object(EvaluationState, "add_run_attack", record), mock.patch("pyautoattack.AutoAttack", build):
            out = original(self.counter, x, y, eps=eps, attacks=attacks, steps=steps, n_queries=n_queries, chunk=chunk)
        first = marks[0] if marks else (self.counter.forwards, self.counter.backwards)
        self.calls = {"clean": first, **self.calls}
        return out


def run_fastadv(counter, x, y, *, eps, attacks, steps, n_queries, chunk, early_stop):
    """(x_adv, y_adv, calls per stage, flags per stage) of fastadv's AutoAttack."""
    import fastadv

    aa = fastadv.AutoAttack(counter, norm="Linf", eps=eps, seed=0, steps=steps, n_queries=n_queries,
                            early_stop=early_stop)
    if attacks:
        aa.attacks_to_run = list(attacks)
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=chunk)
    calls = {e["attack"]: (e["forwards"], e["backwards"]) for e in aa.report}
    return (x_adv, y_adv), calls, dict(aa.robust_flags)


def measure(counter, x, y, *, rounds, clock, **kw):
    """{variant: {'ms', 'calls', 'flags', 'out'}}: counted run, then alternating timed rounds."""
    orig = OriginalStages(counter)
    runs = {
        "original": lambda: (orig(x, y, **kw), orig.calls, orig.flags),
        "fastadv": lambda: run_fastadv(counter, x, y, early_stop=False, **kw),
        "fastadv + early_stop": lambda: run_fastadv(counter, x, y, early_stop=True, **kw),
    }
    ms = {v: [] for v in runs}
    got = {}
    for r in range(rounds + 1):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for v in order:
            (out, calls, flags), wall, cpu = timing.timed_call(runs[v], "cpu")
            if r == 0:
                got[v] = {"out": out, "calls": calls, "flags": flags}
            if r > 0 or rounds == 0:
                ms[v].append(cpu if clock == "cpu" else wall)
    for v in runs:
        got[v]["ms"] = timing.summary(ms[v])[0]
    return got


def rows_for(case, model_name, n, m, env, kw, clock):
    """One row per stage (calls) and a 'total' row (calls and time) for one timed case."""
    ref = m["original"]
    stages = [s for s in STAGES if s in ref["calls"]]
    rows = []
    for stage in stages + ["total"]:
        r = {"model": model_name, "case": case, "n": n, "stage": stage, "steps": kw["steps"] or 100,
             "queries": kw["n_queries"] or 5000, "chunk": kw["chunk"], "eps": kw["eps"], "clock": clock}
        for v in VARIANTS:
            key = v.replace(" + ", "_").replace(" ", "_")
            calls = m[v]["calls"]
            pick = (lambda c: c.get(stage, (0, 0))) if stage != "total" else (
                lambda c: tuple(sum(t[i] for t in c.values()) for i in (0, 1)))
            r[f"{key}_forwards"], r[f"{key}_grads"] = pick(calls)
            if stage == "total":
                r[f"{key}_ms"] = m[v]["ms"]
            if stage not in ("clean", "total"):
                r[f"{key}_robust"] = int(m[v]["flags"][stage].sum()) if stage in m[v]["flags"] else None
        if stage == "total":
            r["flags_equal"] = all(
                set(m[v]["flags"]) - {"clean"} == set(ref["flags"])
                and all(torch.equal(m[v]["flags"][s], ref["flags"][s]) for s in ref["flags"]) for v in VARIANTS[1:])
            r["images_equal"] = bool(torch.equal(m["fastadv"]["out"][0], ref["out"][0]))
            r["time_fraction"] = m["fastadv + early_stop"]["ms"] / m["fastadv"]["ms"]
        base = r["fastadv_grads"]
        r["grads_fraction"] = r["fastadv_early_stop_grads"] / base if base else None
        r.update(env)
        rows.append(r)
    return rows


COLUMNS = [
    ("model", "model"), ("case", "case"), ("n", "n"), ("stage", "stage"),
    ("grads original", "original_grads"), ("grads fastadv", "fastadv_grads"),
    ("grads + early_stop", "fastadv_early_stop_grads"), ("grads fraction", "grads_fraction"),
    ("forwards original", "original_forwards"), ("forwards fastadv", "fastadv_forwards"),
    ("forwards + early_stop", "fastadv_early_stop_forwards"), ("robust after", "fastadv_early_stop_robust"),
    ("ms original", "original_ms"), ("ms fastadv", "fastadv_ms"), ("ms + early_stop", "fastadv_early_stop_ms"),
    ("time fraction", "time_fraction"), ("flags equal", "flags_equal"), ("images equal", "images_equal"),
]


def markdown(data):
    env = data["rows"][0]
    return "\n".join([
        "# AutoAttack's model calls per sub-attack: the original, fastadv, fastadv + early_stop (CPU)", "",
        f"{env['device']}; commit {env['commit']}; torch {env['torch']}; python {env['python']}; {env['date']} (UTC).",
        f"Command: `{data['command']}`. Version 'standard', Linf. Calls in samples (gradients: backward passes; "
        f"forwards include those that carried a gradient); times: median of {max(data['rounds'], 1)} run(s) "
        f"({data['clock']} clock, {data['threads']} thread), on the 'total' rows; 'grads fraction' and 'time "
        "fraction': fastadv + early_stop over fastadv; 'flags equal': the per-sample robust flags after every "
        "stage of both fastadv runs equal the original's; 'images equal': fastadv's x_adv (without early_stop) "
        "equals the original's. Case 'cascade' is the whole evaluation; 'apgd-ce' and 'apgd-t' run that attack "
        "alone on the points robust before it. Square on the points that stay robust queries the model "
        "n_queries times each: no exact shortcut removes those calls.", "",
        results.table(data["rows"], COLUMNS), "",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_autoattack_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits-cnn")
    p.add_argument("--n", type=int, default=None, help="images (default: the 449 digits test images; 8 for others)")
    p.add_argument("--eps", type=float, default=None, help="default: the model's (0.2 for digits-cnn, else 8/255)")
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--steps", type=int, default=None, help="APGD/APGD-T/FAB-T iterations (default: 100)")
    p.add_argument("--queries", type=int, default=None, help="Square's queries (default: 5000)")
    p.add_argument("--cases", default="cascade,apgd-ce,apgd-t")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the counted one (0: time that one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT), help="results path without suffix (.json and .md are written)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    from fastadv.calls import CallCounter

    env = results.environment("cpu")
    command = "python -m benchmarks.bench_autoattack_calls " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"command": command, "rounds": args.rounds, "clock": args.clock, "threads": args.threads, "rows": []}
    for name in args.models.split(","):
        model = bench_models.build(name, "cpu", seed=args.seed)
        counter = CallCounter(model).eval()
        n = args.n or (449 if name == "digits-cnn" else 8)
        x, y = make_inputs(model, name, n, "cpu", args.seed)
        eps = args.eps if args.eps is not None else bench_models.MODELS[name].eps
        kw = dict(eps=eps, steps=args.steps, n_queries=args.queries, chunk=args.chunk)
        before = None
        for case in args.cases.split(","):
            if case == "cascade":
                xs, ys, attacks = x, y, None
            else:  # the points robust before this stage in the cascade
                if before is None:
                    _, _, flags = run_fastadv(counter, x, y, attacks=None, early_stop=True, **kw)
                    order = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
                    before = {s: flags[order[i - 1]] for i, s in enumerate(order) if i}
                idx = before[case].nonzero().flatten()
                xs, ys, attacks = x[idx].clone(), y[idx].clone(), [case]
            m = measure(counter, xs, ys, rounds=args.rounds, clock=args.clock, attacks=attacks, **kw)
            data["rows"] += rows_for(case, name, len(ys), m, env, kw, args.clock)
            print(results.table(data["rows"][-1:], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
            if not args.no_write:  # after every case: a long run that is stopped keeps what it measured
                write(data, args.out, markdown)
    print(markdown(data))
    return data["rows"]


if __name__ == "__main__":
    main()
