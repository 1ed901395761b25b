"""PGD with and without the exact early exit (cycle_exit): gradient evaluations, time, bit-equality.

For each model and step count, torchattacks' PGD, fastadv's PGD with cycle_exit=False and
with cycle_exit=True run on the same inputs and seed, alternating, after one warm-up round.
Every model call is counted by wrapping the model in fastadv.calls.CallCounter (all three
run through the same wrapper, so its few microseconds per call weigh on each alike); the
time is the median over the repeats on the chosen clock; 'equal' is torch.equal with
torchattacks' output. --sweep also times the exit's check interval (slots.CHECK_EVERY) and
ring length (slots.CYCLE_HISTORY) on the first model and step count. digits-cnn-plain is the same
SmallCNN trained without attacks (fastadv.models.train_plain, 8 epochs): a standard model,
on which the exit's bookkeeping is measured where few samples settle; --settings picks the
(eps, alpha) pairs.

    python -m benchmarks.bench_cycle_exit --models digits-cnn --repeats 1 --sweep     # the committed CPU results
    python -m benchmarks.bench_cycle_exit --models robust-resnet18 --batch 2 --repeats 0 \
        --out benchmarks/results/cycle_exit_cpu_resnet18
    python -m benchmarks.bench_cycle_exit --models digits-cnn --steps 100 --repeats 1 --no-write
    python -m benchmarks.bench_cycle_exit --models digits-cnn,digits-cnn-plain --steps 10,20 --settings 0.1:0.01 \
        --repeats 5 --out benchmarks/results/cycle_exit_cpu_no_cycles
"""
import argparse
import json
import pathlib
import sys

import torch

from . import models as bench_models
from . import results, timing

# (eps, alpha) per model: the issue's two digits settings, torchattacks' defaults on CIFAR-10.
SETTINGS = {
    "digits-cnn": [(0.2, 0.05), (0.1, 0.01)],
    "digits-cnn-plain": [(0.2, 0.05), (0.1, 0.01)],
    "robust-resnet18": [(8 / 255, 2 / 255)],
}
OUT = results.RESULTS_DIR / "cycle_exit_cpu"


def build_model(name, seed):
    """A benchmark model by name, or digits-cnn-plain: SmallCNN trained on digits without attacks."""
    if name != "digits-cnn-plain":
        return bench_models.build(name, "cpu", seed=seed)
    from fastadv.data import load_digits
    from fastadv.models import SmallCNN, train_plain

    (x, y), _ = load_digits(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_plain(SmallCNN(), x, y, epochs=8, seed=seed)


def variants(model, eps, alpha, steps):
    """{name: attack} for the three runs of one row, each on the counting wrapper."""
    import torchattacks

    import fastadv

    return {
        "torchattacks": torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps),
        "no exit": fastadv.PGD(model, eps=eps, alpha=alpha, steps=steps, cycle_exit=False),
        "cycle exit": fastadv.PGD(model, eps=eps, alpha=alpha, steps=steps, cycle_exit=True),
    }


def measure(counter, x, y, attacks, *, repeats, clock, seed):
    """{name: {'ms', 'grads', 'forwards', 'out'}}: median time and calls per sample of each attack."""
    ms = {name: [] for name in attacks}
    calls, outs = {}, {}
    for r in range(repeats + 1):  # round 0 warms up and counts (and is the time when repeats is 0)
        for name, atk in attacks.items():
            counter.reset()
            torch.manual_seed(seed)
            out, wall, cpu = timing.timed_call(lambda: atk(x, y), x.device)
            if r == 0:
                calls[name], outs[name] = counter.per_sample(x.shape[0]), out
            if r > 0 or repeats == 0:
                ms[name].append(cpu if clock == "cpu" else wall)
    return {name: {"ms": timing.summary(ms[name])[0], "forwards": calls[name][0], "grads": calls[name][1],
                   "out": outs[name]} for name in attacks}


def row(model_name, batch, eps, alpha, steps, m, env, clock):
    ref = m["torchattacks"]
    r = {"model": model_name, "batch": batch, "eps": eps, "alpha": alpha, "steps": steps, "clock": clock}
    for name, v in m.items():
        key = name.replace(" ", "_")
        r[f"{key}_ms"], r[f"{key}_grads"], r[f"{key}_forwards"] = v["ms"], v["grads"], v["forwards"]
        r[f"{key}_equal"] = bool(torch.equal(v["out"], ref["out"]))
    r["grads_fraction"] = m["cycle exit"]["grads"] / m["no exit"]["grads"]
    r["time_fraction"] = m["cycle exit"]["ms"] / m["no exit"]["ms"]
    r.update(env)
    return r


def sweep(counter, x, y, eps, alpha, steps, *, repeats, clock, seed):
    """Rows timing the exit with other check intervals and ring lengths (on the CPU's slots)."""
    import fastadv
    from fastadv import slots

    saved = slots.CHECK_EVERY["cpu"], slots.CYCLE_HISTORY
    out = []
    try:
        for every, history in [(1, 16), (2, 16), (4, 16), (8, 16), (1, 4), (1, 8), (1, 32)]:
            slots.CHECK_EVERY["cpu"], slots.CYCLE_HISTORY = every, history
            atk = {"cycle exit": fastadv.PGD(counter, eps=eps, alpha=alpha, steps=steps, cycle_exit=True)}
            m = measure(counter, x, y, atk, repeats=repeats, clock=clock, seed=seed)["cycle exit"]
            out.append({"check_every": every, "history": history, "ms": m["ms"], "grads": m["grads"]})
    finally:
        slots.CHECK_EVERY["cpu"], slots.CYCLE_HISTORY = saved
    return out


COLUMNS = [
    ("model", "model"), ("batch", "batch"), ("eps", "eps"), ("alpha", "alpha"), ("steps", "steps"),
    ("grads/sample torchattacks", "torchattacks_grads"), ("grads/sample fastadv", "no_exit_grads"),
    ("grads/sample fastadv + exit", "cycle_exit_grads"), ("grads fraction", "grads_fraction"),
    ("ms torchattacks", "torchattacks_ms"), ("ms fastadv", "no_exit_ms"), ("ms fastadv + exit", "cycle_exit_ms"),
    ("time fraction", "time_fraction"), ("fastadv equal", "no_exit_equal"), ("+ exit equal", "cycle_exit_equal"),
]
SWEEP_COLUMNS = [("check every", "check_every"), ("history", "history"), ("grads/sample", "grads"), ("ms", "ms")]


def markdown(data):
    env = data["rows"][0]
    lines = [
        "# PGD with and without the exact early exit (cycle_exit), CPU", "",
        f"{env['device']}; commit {env['commit']}; torch {env['torch']}; python {env['python']}; {env['date']} (UTC).",
        f"Command: `{data['command']}`. Times: median of {max(data['repeats'], 1)} run(s) ({data['clock']} clock, "
        f"{data['threads']} thread); calls counted by wrapping the model; 'equal': torch.equal with torchattacks.", "",
        results.table(data["rows"], COLUMNS), "",
    ]
    if data.get("sweep"):
        s = data["sweep_case"]
        lines += [f"## Check interval and history ({s})", "", results.table(data["sweep"], SWEEP_COLUMNS), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cycle_exit", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits-cnn,robust-resnet18")
    p.add_argument("--steps", default="10,50,100,1000")
    p.add_argument("--batch", type=int, default=None, help="default: 449 (digits test split), 8 for the ResNet-18")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the counted one (0: time that one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also time other check intervals and histories")
    p.add_argument("--settings", default=None, help="eps:alpha pairs, comma-separated (default: per model)")
    p.add_argument("--out", default=str(OUT), help="results path without suffix (.json and .md are written)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastadv.calls import CallCounter

    env = results.environment("cpu")
    command = "python -m benchmarks.bench_cycle_exit " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"command": command, "repeats": args.repeats, "clock": args.clock, "threads": args.threads, "rows": [],
            "sweep": None, "sweep_case": None}
    for name in args.models.split(","):
        model = build_model(name, args.seed)
        counter = CallCounter(model).eval()
        digits = name.startswith("digits")
        batch = args.batch or (449 if digits else 8)
        x, y = bench_models.digits_test(batch, args.seed) if digits else _robust_inputs(model, batch, args.seed)
        settings = SETTINGS[name] if args.settings is None else [
            tuple(float(v) for v in pair.split(":")) for pair in args.settings.split(",")]
        for eps, alpha in settings:
            for steps in [int(s) for s in args.steps.split(",")]:
                m = measure(counter, x, y, variants(counter, eps, alpha, steps), repeats=args.repeats, clock=args.clock,
                            seed=args.seed)
                data["rows"].append(row(name, batch, eps, alpha, steps, m, env, args.clock))
                print(results.table(data["rows"][-1:], COLUMNS).splitlines()[-1], file=sys.stderr)
                if args.sweep and data["sweep"] is None and steps >= 100:
                    data["sweep_case"] = f"{name}, batch {batch}, eps {eps:g}, alpha {alpha:g}, PGD-{steps}"
                    data["sweep"] = sweep(counter, x, y, eps, alpha, steps, repeats=args.repeats, clock=args.clock,
                                          seed=args.seed)
                if not args.no_write:  # after every row: a long run that is stopped keeps what it measured
                    write(data, args.out)
    print(markdown(data))
    return data["rows"]


def write(data, out, render=None):
    """data as out.json and, rendered (default: this benchmark's markdown), as out.md."""
    out = pathlib.Path(out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text((render or markdown)(data))


def _robust_inputs(model, batch, seed):
    """Random CIFAR-size images labelled with the model's predictions (benchmarks' convention)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        return x, model(x).argmax(1)


if __name__ == "__main__":
    main()
