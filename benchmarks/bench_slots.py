"""Fixed-shape slots: model calls, occupancy and time of the exact exits, with and without them.

Three parts, each timed with the variants alternating (the order reverses every repeat):

- ``pgd``: fastadv.PGD with batch_size=B slots (the cycle exit on, then off) against
  torchattacks.PGD on the whole batch: gradient evaluations per sample (counted by wrapping
  the model, padding slots included), median time, torch.equal with torchattacks.
- ``eval``: fastadv.evaluate with exits and with exits=False on the same slots: per stage
  the gradient evaluations, the slots' occupancy while points waited to be admitted and in
  the tail, median time (and the median of the ratios of rounds that ran the two back to
  back), and whether every per-sample flag agrees.
- ``anchor``: the cycle exit with and without its power-of-two anchor (periods longer than
  the ring of 16 iterates), at the model's step size and at eps / 40.
- ``invariance``: does a sample's logits and input gradient stay bit-identical when the
  other rows of a fixed-shape batch change or are permuted (with deterministic algorithms
  on and off), and across batch sizes? The property the exits rest on (docs: exactness).

    python -m benchmarks.bench_slots                       # the committed CPU rows (digits models)
    python -m benchmarks.bench_slots --parts eval --attacks autoattack --repeats 1
    python -m benchmarks.bench_slots --device cuda --models digits-cnn,robust-resnet18   # on a GPU

Results: benchmarks/results/slots_<device-slug>.{json,md}.
"""
import argparse
import json
import pathlib
import statistics
import sys

import torch

from . import models as bench_models
from . import results, timing
from .host_overhead import ops_of

CASES = {"digits-cnn": (0.2, 0.05), "digits-cnn-plain": (0.2, 0.05), "robust-resnet18": (8 / 255, 2 / 255)}


def load(name, device, n, seed=0):
    """(model, images, labels): the digits models on the 449 test digits, others on random
    images labelled with the model's own predictions."""
    from .bench_cycle_exit import build_model

    model = build_model(name, seed).to(device).eval()
    if name.startswith("digits"):
        x, y = bench_models.digits_test(n, seed)
    else:
        spec = bench_models.MODELS[name]
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((n, *spec.input_shape), generator=g)
        with torch.no_grad():
            y = model(x.to(device)).argmax(1).cpu()
    return model, x.to(device), y.to(device)


def alternate(variants, repeats, device):
    """{name: (result of the first call, [ms per repeat])}, the order reversed every repeat."""
    out = {name: [None, []] for name in variants}
    names = list(variants)
    for r in range(repeats + 1):
        for name in names if r % 2 == 0 else reversed(names):
            res, wall, cpu = timing.timed_call(variants[name], device)
            if r == 0:
                out[name][0] = res
            if r > 0 or repeats == 0:
                out[name][1].append(cpu if cpu is not None else wall)
    return out


def part_pgd(model, x, y, eps, alpha, *, steps, size, repeats, device):
    import torchattacks

    import fastadv
    from fastadv.calls import CallCounter

    counter = CallCounter(model)

    def call(make):
        def run():
            counter.reset()
            torch.manual_seed(0)
            adv = make()(x, y)
            return adv, counter.backwards / x.shape[0]
        return run

    runs = alternate({
        "torchattacks": call(lambda: torchattacks.PGD(counter, eps=eps, alpha=alpha, steps=steps)),
        "slots": call(lambda: fastadv.PGD(counter, eps=eps, alpha=alpha, steps=steps, batch_size=size, cycle_exit=False)),
        "slots + exit": call(lambda: fastadv.PGD(counter, eps=eps, alpha=alpha, steps=steps, batch_size=size)),
    }, repeats, device)
    ref = runs["torchattacks"][0][0]
    row = {"part": "pgd", "steps": steps, "slots": size}
    for name, key in (("torchattacks", "ta"), ("slots", "plain"), ("slots + exit", "exit")):
        (adv, grads), ms = runs[name]
        row[f"{key}_grads"] = grads
        row[f"{key}_ms"] = statistics.median(ms)
        row[f"{key}_equal"] = bool(torch.equal(adv, ref))
    row["grads_fraction"] = row["exit_grads"] / steps
    row["time_vs_torchattacks"] = row["exit_ms"] / row["ta_ms"]
    row["time_vs_no_exit"] = row["exit_ms"] / row["plain_ms"]
    return row


def part_anchor(model, x, y, eps, alpha, *, steps, size, repeats, device):
    """PGD on slots with the cycle exit, with and without the power-of-two anchor that catches
    periods longer than the ring: gradient evaluations, time, equality."""
    import fastadv
    from fastadv import slots
    from fastadv.calls import CallCounter

    counter = CallCounter(model)

    def run(anchor):
        def go():
            saved, slots.CYCLE_ANCHOR = slots.CYCLE_ANCHOR, anchor
            try:
                counter.reset()
                torch.manual_seed(0)
                adv = fastadv.PGD(counter, eps=eps, alpha=alpha, steps=steps, batch_size=size)(x, y)
                return adv, counter.backwards / x.shape[0]
            finally:
                slots.CYCLE_ANCHOR = saved
        return go

    runs = alternate({"anchor": run(True), "ring only": run(False)}, repeats, device)
    (a, ga), ta = runs["anchor"]
    (b, gb), tb = runs["ring only"]
    return {"part": "anchor", "steps": steps, "alpha": alpha, "slots": size, "anchor_grads": ga, "ring_grads": gb,
            "anchor_ms": statistics.median(ta), "ring_ms": statistics.median(tb), "equal": bool(torch.equal(a, b))}


def part_eval(model, x, y, eps, attacks, *, size, repeats, device):
    import fastadv

    variants = {
        exits: (lambda exits=exits: fastadv.evaluate(model, x, y, attacks, eps=eps, batch_size=size, exits=exits))
        for exits in (True, False)
    }
    runs = alternate(variants, repeats, device)
    # one more untimed run each, on the CPU (the counts are the host's work, the same on a GPU)
    ops = {exits: ops_of(call) for exits, call in variants.items()} if device.type == "cpu" else None
    calls = {exits: sum((sa.get("slots") or {}).get("calls", 0) for a in res["attacks"] for sa in a.get("stages", [a]))
             for exits, (res, _) in runs.items()}
    (on, on_ms), (off, off_ms) = runs[True], runs[False]
    rows = []
    for a, b in zip(on["attacks"], off["attacks"]):
        for sa, sb in zip(a.get("stages", [a]), b.get("stages", [b])):
            slots_a = sa.get("slots") or {}
            rows.append({
                "part": "eval", "attacks": ",".join(attacks), "stage": sa["name"], "slots": size,
                "attacked": sa["attacked"], "robust": sa["robust"], "robust_no_exit": sb["robust"],
                "exit_grads": sa["backwards"], "plain_grads": sb["backwards"],
                "grads_fraction": sa["backwards"] / sb["backwards"] if sb["backwards"] else None,
                "exit_grads_per_point": sa["gradients_per_sample"], "plain_grads_per_point": sb["gradients_per_sample"],
                "occupancy_admitting": slots_a.get("occupancy_admitting"), "occupancy_tail": slots_a.get("occupancy_tail"),
                "exit_s": sa["seconds"], "plain_s": sb["seconds"],
            })
    total = {"part": "eval", "attacks": ",".join(attacks), "stage": "total", "slots": size,
             "robust": on["robust"], "robust_no_exit": off["robust"],
             "flags_equal": bool(torch.equal(on["robust_flags"], off["robust_flags"])),
             "exit_grads": sum(r["exit_grads"] for r in rows), "plain_grads": sum(r["plain_grads"] for r in rows),
             "exit_ms": statistics.median(on_ms), "plain_ms": statistics.median(off_ms)}
    total["grads_fraction"] = total["exit_grads"] / total["plain_grads"] if total["plain_grads"] else None
    # the bookkeeping of exits in numbers that do not drift: every ATen op of the run (model,
    # attack, checks, refills, the clean pass) per model call of the slot stages
    if ops is not None and calls[True] and calls[False]:
        total["ops_per_call"] = f"{ops[True] / calls[True]:.1f} / {ops[False] / calls[False]:.1f}"
    total["time_fraction"] = total["exit_ms"] / total["plain_ms"]
    # each round runs the two back to back: their ratio there is free of the machine's slower drifts
    paired = timing.summary([a / b for a, b in zip(on_ms, off_ms)])
    total["time_paired"], total["time_paired_spread"] = paired[0], f"{paired[1]:.2f}-{paired[2]:.2f}"
    return rows + [total]


def part_invariance(model, x, y, *, size, device):
    """Rows: for deterministic algorithms off and on, whether sample 0's logits and input
    gradient are bit-identical when the other rows are replaced or permuted (fixed shape
    `size`), and the batch sizes at which they differ from the full batch's."""
    import torch.nn.functional as F

    def numbers(batch, labels):
        a = batch.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(a)
            g, = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), a)
        return logits.detach()[0], g[0]

    x, y = x[:size], y[:size]
    g = torch.Generator().manual_seed(1)
    others = torch.rand(x.shape, generator=g).to(device)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(size - 1, generator=g)]).to(device)
    rows = []
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det, warn_only=True)
            torch.backends.cudnn.deterministic = det
            base = numbers(x, y)
            mixed = numbers(torch.cat([x[:1], others[1:]]), y)
            permuted = numbers(x[perm], y[perm])
            again = numbers(x, y)
            sizes = [b for b in sorted({1, 2, 4, 7, 8, 15, 16, 31, 32, 64, size}) if b <= size]
            differ = [b for b in sizes if not all(torch.equal(u, v) for u, v in zip(numbers(x[:b], y[:b]), base))]
            rows.append({"part": "invariance", "slots": size, "deterministic": det,
                         "repeat_equal": all(torch.equal(u, v) for u, v in zip(again, base)),
                         "other_rows_equal": all(torch.equal(u, v) for u, v in zip(mixed, base)),
                         "permuted_equal": all(torch.equal(u, v) for u, v in zip(permuted, base)),
                         "batch_sizes_that_differ": ",".join(map(str, differ)) or "none"})
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[2])
        torch.backends.cudnn.deterministic = saved[1]
    return rows


PGD_COLUMNS = [("model", "model"), ("eps", "eps"), ("steps", "steps"), ("slots", "slots"), ("grads/sample torchattacks", "ta_grads"),
               ("grads/sample slots", "plain_grads"), ("grads/sample slots + exit", "exit_grads"),
               ("grads fraction", "grads_fraction"), ("ms torchattacks", "ta_ms"), ("ms slots", "plain_ms"),
               ("ms slots + exit", "exit_ms"), ("time vs torchattacks", "time_vs_torchattacks"),
               ("time vs no exit", "time_vs_no_exit"), ("equal", "exit_equal"), ("no-exit equal", "plain_equal")]
EVAL_COLUMNS = [("model", "model"), ("eps", "eps"), ("attacks", "attacks"), ("stage", "stage"), ("slots", "slots"),
                ("points attacked", "attacked"), ("robust", "robust"), ("robust, no exit", "robust_no_exit"),
                ("grads", "exit_grads"), ("grads, no exit", "plain_grads"), ("grads fraction", "grads_fraction"),
                ("grads/point", "exit_grads_per_point"), ("grads/point, no exit", "plain_grads_per_point"),
                ("occupancy admitting", "occupancy_admitting"), ("occupancy tail", "occupancy_tail"),
                ("s", "exit_s"), ("s, no exit", "plain_s"), ("ms total", "exit_ms"), ("ms total, no exit", "plain_ms"),
                ("time fraction", "time_fraction"), ("time, median of paired rounds", "time_paired"),
                ("paired p20-p80", "time_paired_spread"), ("ATen ops per slot call, exits / no exit", "ops_per_call"),
                ("flags equal", "flags_equal")]
ANCHOR_COLUMNS = [("model", "model"), ("steps", "steps"), ("alpha", "alpha"), ("slots", "slots"),
                  ("grads/sample, ring + anchor", "anchor_grads"), ("grads/sample, ring only", "ring_grads"),
                  ("ms, ring + anchor", "anchor_ms"), ("ms, ring only", "ring_ms"), ("equal", "equal")]
INV_COLUMNS = [("model", "model"), ("slots", "slots"), ("deterministic", "deterministic"),
               ("repeat equal", "repeat_equal"), ("other rows replaced: equal", "other_rows_equal"),
               ("rows permuted: equal", "permuted_equal"), ("batch sizes that differ", "batch_sizes_that_differ")]


def markdown(data):
    lines = ["# Fixed-shape slots: calls, occupancy and time, with and without the exact exits", "",
             "Gradient evaluations are counted by wrapping the model, padding slots included; times are medians "
             "of alternating runs (CPU time on the CPU, CUDA events on a GPU). Each row names the run it comes from:", ""]
    for i, run in enumerate(data["runs"]):
        env = run["env"]
        lines.append(f"- run {i}: `{run['command']}`; {env['device']}; commit {env['commit']}; torch {env['torch']}; "
                     f"python {env['python']}; {env['date']} (UTC); {run['repeats']} timed repeat(s), "
                     f"{run['threads']} thread(s), load {run['load']}")
    lines.append("")
    for part, title, cols in (("pgd", "PGD on slots vs torchattacks on the whole batch", PGD_COLUMNS),
                              ("anchor", "The cycle exit with and without the anchor (periods beyond the ring)",
                               ANCHOR_COLUMNS),
                              ("eval", "fastadv.evaluate with and without exits (the same slots)", EVAL_COLUMNS),
                              ("invariance", "A sample's numbers at a fixed shape", INV_COLUMNS)):
        rows = [r for r in data["rows"] if r["part"] == part]
        if rows:
            lines += [f"## {title}", "", results.table(rows, [("run", "run"), *cols]), ""]
    return "\n".join(lines)


def _case(row):
    """What a row measured (rows of a later run replace the same case's)."""
    return tuple(row.get(k) for k in ("part", "model", "eps", "steps", "alpha", "attacks", "stage", "slots",
                                       "deterministic"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_slots", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="pgd,anchor,eval,invariance")
    p.add_argument("--models", default="digits-cnn,digits-cnn-plain")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=449, help="points (the digits test split has 449)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--eps", type=float, default=None, help="budget for every model (default: per model)")
    p.add_argument("--steps", default="100,1000", help="PGD steps of the pgd part")
    p.add_argument("--attacks", default="pgd-100;apgd-ce;pgd-100,apgd-ce",
                   help="cascades of the eval part, ';' between cascades")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the first (0: time the first)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results path without suffix (default: slots_<device-slug>)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = args.parts.split(",")
    command = "python -m benchmarks.bench_slots " + " ".join(argv if argv is not None else sys.argv[1:])
    load_avg = round(__import__("os").getloadavg()[0], 2)
    run = {"command": command, "repeats": args.repeats, "threads": args.threads, "env": results.environment(device),
           "load": load_avg}
    rows = []
    for name in args.models.split(","):
        model, x, y = load(name, device, args.n)
        eps, alpha = CASES.get(name, (8 / 255, 2 / 255))
        if args.eps is not None:
            eps, alpha = args.eps, args.eps / 4
        new = []
        if "pgd" in parts:
            for steps in map(int, args.steps.split(",")):
                new.append(part_pgd(model, x, y, eps, alpha, steps=steps, size=args.slots, repeats=args.repeats,
                                    device=device))
        if "anchor" in parts:
            for steps in map(int, args.steps.split(",")):
                for a in (alpha, eps / 40):
                    new.append(part_anchor(model, x, y, eps, a, steps=steps, size=args.slots, repeats=args.repeats,
                                           device=device))
        if "eval" in parts:
            for cascade in args.attacks.split(";"):
                new += part_eval(model, x, y, eps, cascade.split(","), size=args.slots, repeats=args.repeats,
                                 device=device)
        if "invariance" in parts:
            new += part_invariance(model, x, y, size=min(args.slots, args.n), device=device)
        for r in new:
            r["model"], r["eps"] = name, eps
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, file=sys.stderr)
        rows += new
    if not args.no_write:
        out = args.out or str(results.RESULTS_DIR / f"slots_{results.device_slug(device)}")
        path = pathlib.Path(out + ".json")
        data = json.loads(path.read_text()) if path.exists() else {"runs": [], "rows": []}
        # rows of earlier runs stay unless this run measured the same case again
        fresh = {_case(r) for r in rows}
        kept = [r for r in data["rows"] if _case(r) not in fresh]
        runs = [data["runs"][i] for i in sorted({r["run"] for r in kept})] + [run]
        renumber = {old: new for new, old in enumerate(sorted({r["run"] for r in kept}))}
        for r in kept:
            r["run"] = renumber[r["run"]]
        for r in rows:
            r["run"] = len(runs) - 1
        data = {"runs": runs, "rows": kept + rows}
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        pathlib.Path(out + ".md").write_text(markdown(data))
        print(f"wrote {out}.json and {out}.md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
