"""Where one attack's time goes: torch.profiler op tables for fastadv and torchattacks.

Runs the attack once to warm up, then once under torch.profiler (CPU, and CUDA
when the device is), for each library, and prints the ops sorted by self time,
plus the split of the attack's time into forward, backward and the update. Use it
to see what an attack costs beyond the floor (forward + input-gradient backward).

    python -m benchmarks.profile_step --model linear --batch 1024 --attack PGD --steps 10
    python -m benchmarks.profile_step --model smallcnn --batch 128 --threads 1 --out /tmp/prof.txt
"""
import argparse
import contextlib
import io
import sys

import torch

from . import models as bench_models
from .bench_attacks import ATTACKS, fastadv_class, make_inputs, reference_call


def profile_one(fn, device, row_limit):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()  # warm-up
    with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    return events.table(sort_by=sort, row_limit=row_limit), events


MODEL_OPS = ("conv", "mm", "addmm", "bmm", "linear", "batch_norm", "relu", "threshold", "log_softmax", "nll_loss",
             "max_pool", "avg_pool", "mean")
UPDATE_OPS = ("sign", "clamp", "add", "sub", "mul", "div", "norm", "linalg_vector_norm", "uniform", "normal", "empty",
              "copy", "clone", "minimum", "maximum", "min", "max", "where", "isfinite", "abs", "sum", "ones_like",
              "zeros_like", "rsub", "gt", "lt", "ge", "le", "eq", "ne", "bitwise", "logical", "fill", "to", "_to_copy")


def split(events):
    """(total, model ops, elementwise/allocation ops) in self-CPU microseconds, by aten op name.

    Model ops are convolutions, matmuls, norms-of-layers, activations and the loss, in
    the forward and the backward; elementwise/allocation ops are what the update (and
    the random start) is made of. Rough by construction: an op name can serve both."""
    aten = [e for e in events if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)

    def named(e, names):
        op = e.key[len("aten::"):].lstrip("_")
        return any(op == n or op.startswith(n + "_") or op.startswith(n) for n in names)

    model = sum(e.self_cpu_time_total for e in aten if named(e, MODEL_OPS))
    update = sum(e.self_cpu_time_total for e in aten if not named(e, MODEL_OPS) and named(e, UPDATE_OPS))
    return total, model, update


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="linear", choices=sorted(bench_models.MODELS))
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--attack", default="PGD", choices=list(ATTACKS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=18, help="ops shown per table")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = bench_models.build(args.model, device)
    x, y = make_inputs(model, args.model, args.batch, device, 0)
    spec = bench_models.MODELS[args.model]
    kwargs = ATTACKS[args.attack].kwargs(args.steps, spec.num_classes, spec.eps)
    libs = {}
    cls = fastadv_class(args.attack)
    if cls is not None:
        fa = cls(model, **kwargs)
        libs["fastadv"] = lambda: fa(x, y)
    ref = reference_call("torchattacks", args.attack, model, kwargs, device)
    if ref is not None:
        libs["torchattacks"] = lambda: ref(x, y)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(f"# {args.attack} steps={args.steps} on {args.model} batch {args.batch}, {device}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
        for name, fn in libs.items():
            tab, events = profile_one(fn, device, args.rows)
            total, model_us, upd = split(events)
            print(f"## {name}: self CPU total {total / 1e3:.1f} ms; model ops (forward + backward) "
                  f"{model_us / 1e3:.1f} ms; elementwise/allocation ops (update, start) {upd / 1e3:.1f} ms\n")
            print(tab)
            print()
    text = buf.getvalue()
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
