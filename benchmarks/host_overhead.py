"""Host work per call: PGD-10 on tiny models, where the model costs little and what the
library does around it shows, against torchattacks 3.5.1 on the same model and inputs.

On a launch-bound GPU step the host's time is the step's time; on the CPU it can be
measured directly. For each case: CPU-time medians (``time.process_time``, one thread) of
``--calls`` back-to-back calls per sample, ``--repeats`` samples per library after a warm-up,
the order alternating every sample (fastadv, torchattacks, then torchattacks, fastadv);
the spread as p20-p80; the median of the per-sample ratios (each sample times the two
libraries back to back, so their ratio there is free of the machine's slow drifts); and the ATen ops each library dispatches per call and per step
(ops at 20 steps minus ops at 10, over 10), counted with a TorchDispatchMode.

    python -m benchmarks.host_overhead                 # both cases, results/host_overhead_cpu.{json,md}
    python -m benchmarks.host_overhead --repeats 5 --calls 2 --no-write   # a smoke run
    python -m benchmarks.host_overhead --split         # per call and per step apart: results/host_overhead_split_cpu.md

--split times each library at 0, 1 and 2 steps (wall clock, loops of --calls calls, the two
back to back --repeats times) and reports the median difference fastadv - torchattacks per call:
at 0 steps it is the work outside the steps, and its growth from 1 to 2 steps the work per step.

Cases: ``mlp-b1`` (fastadv.models.MLP on 1x8x8, batch 1) and ``cnn-b8`` (fastadv.models.SmallCNN
on 1x8x8, batch 8), both in eval mode, eps 8/255, alpha 2/255, random start.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import results, timing

CASES = {"mlp-b1": ("MLP", 1), "cnn-b8": ("SmallCNN", 8)}
COLUMNS = [
    ("case", "case"), ("steps", "steps"), ("fastadv ms", "fastadv_ms"), ("torchattacks ms", "reference_ms"),
    ("fastadv / torchattacks", "ratio"), ("paired ratio", "paired_ratio"), ("paired p20-p80", "paired_spread"),
    ("fastadv p20-p80", "fastadv_spread"),
    ("torchattacks p20-p80", "reference_spread"), ("ops/call fastadv / ta", "ops_call"),
    ("ops/step fastadv / ta", "ops_step"), ("samples x calls", "samples"), ("clock", "clock"),
    ("threads", "threads"), ("load", "load_avg_1m"), ("env", "env"),
]


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_of(fn) -> int:
    counter = OpCount()
    with counter:
        fn()
    return counter.n


def make_case(name, seed=0):
    """(model, images, labels) of a case, drawn from a fixed seed."""
    from fastadv import models

    cls, batch = CASES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(models, cls)().eval()
        x = torch.rand(batch, 1, 8, 8)
        y = torch.randint(0, 10, (batch,))
    return model, x, y


def measure(name, *, steps, repeats, calls, warmup):
    import torchattacks

    import fastadv

    model, x, y = make_case(name)
    attacks = {"fastadv": fastadv.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps),
               "torchattacks": torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps)}

    def run(lib, n=calls):
        for _ in range(n):
            attacks[lib](x, y)

    ops = {}
    for lib, atk in attacks.items():
        counts = []
        for s in (steps, 2 * steps):
            atk.steps = s
            counts.append(ops_of(lambda: run(lib, 1)))
        atk.steps = steps
        ops[lib] = (counts[0], (counts[1] - counts[0]) / steps)
    torch.manual_seed(0)
    equal = torch.equal(attacks["fastadv"](x, y), (torch.manual_seed(0), attacks["torchattacks"](x, y))[1])
    for lib in attacks:
        run(lib, warmup)
    samples = {lib: [] for lib in attacks}
    order = list(attacks)
    for r in range(repeats):
        for lib in (order if r % 2 == 0 else order[::-1]):
            c0 = time.process_time()
            run(lib)
            samples[lib].append((time.process_time() - c0) * 1e3 / calls)
    fa, ta = timing.summary(samples["fastadv"]), timing.summary(samples["torchattacks"])
    # each repeat timed the two libraries back to back: their ratio there cancels the machine's
    # slower drifts (clock, neighbours), which the two medians' ratio carries
    paired = timing.summary([f / t for f, t in zip(samples["fastadv"], samples["torchattacks"])])
    return {
        "bench": "host_overhead", "case": f"{name}/PGD-{steps}", "steps": steps,
        "fastadv_ms": fa[0], "reference_ms": ta[0], "ratio": fa[0] / ta[0],
        "paired_ratio": paired[0], "paired_spread": f"{paired[1]:.3f}-{paired[2]:.3f}",
        "fastadv_spread": f"{fa[1]:.3f}-{fa[2]:.3f}", "reference_spread": f"{ta[1]:.3f}-{ta[2]:.3f}",
        "ops_call": f"{ops['fastadv'][0]} / {ops['torchattacks'][0]}",
        "ops_step": f"{ops['fastadv'][1]:g} / {ops['torchattacks'][1]:g}",
        "bit_exact": bool(equal), "samples": f"{repeats} x {calls}", "clock": "process_time (CPU time)",
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "samples_ms": {k: [round(v, 4) for v in s] for k, s in samples.items()},
    }


def split(name, *, repeats, calls, warmup):
    """Median per-call differences fastadv - torchattacks (us) at 0, 1 and 2 steps."""
    import torchattacks

    import fastadv

    model, x, y = make_case(name)
    out = {}
    for steps in (0, 1, 2):
        fa = fastadv.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps)
        ta = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps)
        for _ in range(warmup):
            fa(x, y), ta(x, y)
        diffs = []
        for r in range(repeats):
            times = {}
            for lib, atk in ((("fa", fa), ("ta", ta)) if r % 2 == 0 else (("ta", ta), ("fa", fa))):
                t0 = time.perf_counter()
                for _ in range(calls):
                    atk(x, y)
                times[lib] = (time.perf_counter() - t0) / calls * 1e6
            diffs.append(times["fa"] - times["ta"])
        out[steps] = timing.summary(diffs)
    return {"case": name, "outside_steps_us": out[0][0], "first_step_us": out[1][0] - out[0][0],
            "per_step_us": out[2][0] - out[1][0], "spread_0": f"{out[0][1]:.0f} to {out[0][2]:.0f}"}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=41, help="samples per library (odd: a true median)")
    p.add_argument("--calls", type=int, default=20, help="calls per sample")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per library first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", default=str(results.RESULTS_DIR / "host_overhead_cpu.json"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--split", action="store_true", help="the work outside the steps and per step, apart")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = results.environment(torch.device("cpu"))
    if args.split:
        rows = [split(c.strip(), repeats=args.repeats, calls=args.calls, warmup=args.warmup)
                for c in args.cases.split(",") if c.strip()]
        table = results.table([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                              [("case", "case"), ("fastadv - torchattacks outside the steps, us", "outside_steps_us"),
                               ("p20 to p80", "spread_0"), ("in the first step, us", "first_step_us"),
                               ("per later step, us", "per_step_us")])
        print(table)
        if not args.no_write:
            path = results.RESULTS_DIR / "host_overhead_split_cpu.md"
            path.write_text(f"# Host work per call and per step, apart (CPU)\n\n`python -m benchmarks.host_overhead "
                            f"{' '.join(argv if argv is not None else sys.argv[1:])}` — {env['device']}; commit "
                            f"{env['commit']}; torch {env['torch']}; python {env['python']}; {env['date']}\n\n"
                            "PGD with eps 8/255, alpha 2/255; medians of per-call differences (wall clock), the two "
                            "libraries back to back, alternating.\n\n" + table + "\n")
            print(f"wrote {path}", file=sys.stderr)
        return rows
    rows = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name not in CASES:
            p.error(f"unknown case {name!r}; expected {list(CASES)}")
        rows.append(dict(measure(name, steps=args.steps, repeats=args.repeats, calls=args.calls, warmup=args.warmup),
                         **env))
    print(f"{env['device']} | commit {env['commit']} | torch {env['torch']} | {env['date']}", file=sys.stderr)
    for r in rows:
        r["env"] = 1
    print(results.table(rows, COLUMNS))
    if not args.no_write:
        import json
        import pathlib

        path = pathlib.Path(args.out_json)
        path.write_text(json.dumps(rows, indent=1) + "\n")
        command = " ".join(["python -m benchmarks.host_overhead", *(sys.argv[1:] if argv is None else argv)])
        md = [f"# Host work per call (CPU)\n", f"`{command}` — env 1: {env['device']}; "
              f"commit {env['commit']}; torch {env['torch']}; python {env['python']}; {env['date']}\n",
              results.table(rows, COLUMNS), ""]
        path.with_suffix(".md").write_text("\n".join(md))
        print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
