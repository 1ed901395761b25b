"""PGD on a GPU timed so that its numbers can be believed: the floor, fastadv and torchattacks
under one set of global settings, interleaved, with enough repeats to give a spread.

    python -m benchmarks.fair                  # on a CUDA machine: results/<device-slug>-fair.{json,md}
    python -m benchmarks.fair --dry-run --results /tmp/x   # the same rows at tiny sizes on the CPU

Why: the first H200 run timed the floor (ten bare input-gradient evaluations) above both
libraries. That floor (``bench_attacks.floor_call``) ran under other conditions than the
attacks it bounds: the model's parameters frozen (requires_grad off) where torchattacks
leaves them on, one forward per step on the clean images under an extra grad-mode context,
and it was timed once per row after the attacks had warmed their own kernels. Here every
variant runs the same model in the same state:

- settings: cuDNN benchmark off, deterministic algorithms off, TF32 as torch's defaults
  (cuDNN on, matmul off), set once, recorded in every row and restored at the end; the
  bit-exactness check re-runs fastadv and torchattacks with deterministic algorithms on;
- warm-up: every variant runs ``--warmup`` times before any is timed (cuDNN's heuristics,
  Triton's compiles, the caching allocator's blocks, a captured graph all in place);
- timing: CUDA events around each sample (``--calls`` back-to-back calls, as a training or
  evaluation loop makes them), the device synchronised before each; ``--repeats`` samples
  per variant (at least 20), the order rotating every repeat so none always follows another;
  median, p20-p80 and min-max reported;
- the floor: ``steps`` input-gradient evaluations written as torchattacks writes a step
  (the parameters as the caller left them, a fresh leaf per step, nn.CrossEntropyLoss), minus
  the update. ``floor, frozen parameters`` is the same with requires_grad off (what fastadv
  does) and ``floor, before`` the old code, so a GPU run shows which made the difference.

Rows (each answers a goal of the GPU run): PGD-10 exact on ResNet-18 b256 and the small CNN
b1024 (fastadv >= torchattacks; floor at or below both); the launch-bound row, the small CNN
at b32 called 20 times in a row with the captured graph replayed (>= 1.3x torchattacks);
one epoch of PGD-10 adversarial training of ResNet-18 on generated CIFAR-size data, ``fit``
against the same loop written with torchattacks.PGD (>= 1.2x), with its floor. Then a
``torch.profiler`` table per step of the kernels (CPU ops on a dry run) of fastadv and
torchattacks side by side.
"""
import argparse
import contextlib
import copy
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models as bench_models
from . import results, timing

GPU = dict(r18="resnet18", b_r18=256, cnn="smallcnn", b_cnn=1024, b_launch=32, calls=20, steps=10, repeats=21,
           warmup=3, epoch_n=1024, epoch_batch=128, epoch_repeats=5, backend=None)
DRY = dict(r18="smallcnn-digits", b_r18=4, cnn="smallcnn-digits", b_cnn=8, b_launch=2, calls=2, steps=2, repeats=3,
           warmup=1, epoch_n=16, epoch_batch=8, epoch_repeats=2, backend="torch")
EPS, ALPHA = 8 / 255, 2 / 255


# -- global settings ----------------------------------------------------------------------------


def settings_now() -> dict:
    return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


@contextlib.contextmanager
def fixed_settings(deterministic=False):
    """One set of global settings for every variant; restored on exit."""
    saved = settings_now()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        yield settings_now()
    finally:
        torch.backends.cudnn.benchmark = saved["cudnn.benchmark"]
        torch.backends.cudnn.deterministic = saved["cudnn.deterministic"]
        torch.use_deterministic_algorithms(saved["deterministic_algorithms"], warn_only=warn_only)
        torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul.allow_tf32"]


# -- the variants ------------------------------------------------------------------------------


def floor(model, x, y, steps, frozen=False):
    """steps input-gradient evaluations as torchattacks makes them, without the update."""
    from .bench_attacks import floor_call

    return floor_call(model, x, y, grads=steps, forwards=None, mode_kw={}, device=x.device, frozen=frozen)


def attack_variants(model, x, y, steps, backend, graph):
    import torchattacks

    import fastadv
    from .bench_attacks import floor_call_before

    fa = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, backend=backend)
    ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps)
    variants = {"fastadv": lambda: fa(x, y), "torchattacks": lambda: ta(x, y)}
    if graph:
        fg = fastadv.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, backend=backend, cuda_graph=True)
        variants["fastadv, replayed graph"] = lambda: fg(x, y)
    variants["floor"] = floor(model, x, y, steps)
    variants["floor, frozen parameters"] = floor(model, x, y, steps, frozen=True)
    variants["floor, before"] = floor_call_before(model, x, y, grads=steps, forwards=None, mode_kw={}, device=x.device)
    return variants


def epoch_variants(model, x, y, steps, batch, backend, graph):
    """One epoch of PGD-AT: fit, the torchattacks loop, and the loop with the attack replaced by its floor."""
    import torchattacks

    from fastadv.train import TrainConfig, fit, global_batches

    order = global_batches(len(y), batch, 0, 0)

    def fit_run(cuda_graph):
        def run():
            net = copy.deepcopy(model)
            fit(net, x, y, TrainConfig(method="pgd", eps=EPS, alpha=ALPHA, steps=steps, backend=backend,
                                       cuda_graph=cuda_graph),
                epochs=1, batch_size=batch, optimizer="sgd", lr=0.05, schedule="constant", seed=0)
            return net
        return run

    def loop(craft):
        def run():
            net = copy.deepcopy(model)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            for idx in order:
                net.train()
                adv = craft(net, x[idx], y[idx])
                net.train()
                opt.zero_grad()
                F.cross_entropy(net(adv), y[idx]).backward()
                opt.step()
            return net.eval()
        return run

    def ta_craft(net, xb, yb):
        return torchattacks.PGD(net, eps=EPS, alpha=ALPHA, steps=steps)(xb, yb)

    def floor_craft(net, xb, yb):
        net.eval()
        floor(net, xb, yb, steps)()
        return xb

    variants = {"fastadv fit": fit_run(False), "torchattacks loop": loop(ta_craft)}
    if graph:
        variants["fastadv fit, replayed graph"] = fit_run(True)
    variants["floor"] = loop(floor_craft)
    return variants


# -- timing ------------------------------------------------------------------------------------


def time_variants(variants, *, device, repeats, warmup, calls=1, seed=0):
    """{name: [ms per call, ...]}: warm-up of all, then repeats samples of `calls` calls each,
    the order rotating every repeat; CUDA events on a GPU, perf_counter on the CPU."""
    names = list(variants)

    def sample(fn):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls

    for _ in range(warmup):
        for name in names:
            sample(variants[name])
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(sample(variants[name]))
    return out


def summarize(samples) -> dict:
    med, p20, p80 = timing.summary(samples)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "min_ms": min(samples), "max_ms": max(samples),
            "n": len(samples)}


def bit_exact(a_fn, b_fn, device) -> bool:
    """a and b from the same seed, equal bit for bit (deterministic algorithms on CUDA)."""
    with fixed_settings(deterministic=device.type == "cuda"):
        torch.manual_seed(0)
        a = a_fn()
        torch.manual_seed(0)
        b = b_fn()
    if isinstance(a, nn.Module):
        return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    return torch.equal(a, b)


# -- the profile ---------------------------------------------------------------------------------


def kernels_per_step(fn, device, steps) -> dict:
    """{kernel (CUDA) or op (CPU) name: (count per step, microseconds per step)} of one call."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    table = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if not us or e.key.startswith("aten::"):
                continue
        else:
            us = e.self_cpu_time_total
            if not e.key.startswith("aten::"):
                continue
        table[e.key] = (e.count / steps, us / steps)
    return table


def profile_table(tables: dict, rows=25) -> str:
    """A Markdown table: per kernel, count and time per step in each library, largest first."""
    libs = list(tables)
    names = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[1] for t in tables.values()))
    head = "| kernel | " + " | ".join(f"{lib} count/step | {lib} us/step" for lib in libs) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(libs))]
    for k in names[:rows]:
        cells = []
        for lib in libs:
            c, us = tables[lib].get(k, (0, 0))
            cells += [f"{c:g}", f"{us:.1f}"]
        lines.append(f"| {k[:90]} | " + " | ".join(cells) + " |")
    totals = []
    for lib in libs:
        totals += [f"{sum(c for c, _ in tables[lib].values()):g}", f"{sum(u for _, u in tables[lib].values()):.1f}"]
    lines.append("| **all** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


# -- driver ----------------------------------------------------------------------------------------


def make_case(name, batch, device, seed=0):
    model = bench_models.build(name, device, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *bench_models.MODELS[name].input_shape, generator=g).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def run(z, device, log=print):
    rows, profiles = [], {}
    graph = device.type == "cuda"
    env = results.environment(device)
    with fixed_settings() as settings:
        pgd = f"PGD-{z['steps']} exact"
        cases = [(pgd, z["r18"], z["b_r18"], 1), (pgd, z["cnn"], z["b_cnn"], 1),
                 (f"{pgd}, launch-bound loop", z["cnn"], z["b_launch"], z["calls"])]
        for label, name, batch, calls in cases:
            model, x, y = make_case(name, batch, device)
            variants = attack_variants(model, x, y, z["steps"], z["backend"], graph)
            t0 = time.perf_counter()
            samples = time_variants(variants, device=device, repeats=z["repeats"], warmup=z["warmup"], calls=calls)
            exact = bit_exact(variants["fastadv"], variants["torchattacks"], device)
            if graph:
                exact = exact and bit_exact(variants["fastadv, replayed graph"], variants["torchattacks"], device)
            rows.append(row(label, name, batch, calls, samples, exact, settings, env, "torchattacks", z))
            log(f"{label} {name} b{batch}: {time.perf_counter() - t0:.0f} s")
            if calls == 1:
                profiles[f"{label}, {name} b{batch}"] = {
                    lib: kernels_per_step(variants[lib], device, z["steps"]) for lib in ("fastadv", "torchattacks")}
            del model, x, y, variants
        model, x, y = make_case(z["r18"], z["epoch_n"], device)
        model.train()
        variants = epoch_variants(model, x, y, z["steps"], z["epoch_batch"], z["backend"], graph)
        t0 = time.perf_counter()
        samples = time_variants(variants, device=device, repeats=z["epoch_repeats"], warmup=1)
        exact = bit_exact(variants["fastadv fit"], variants["torchattacks loop"], device)
        rows.append(row(f"PGD-{z['steps']} AT, one epoch", z["r18"], z["epoch_batch"], 1, samples, exact, settings, env,
                        "torchattacks loop", z, n=z["epoch_n"]))
        log(f"training epoch {z['r18']}: {time.perf_counter() - t0:.0f} s")
    return rows, profiles


def row(label, model, batch, calls, samples, exact, settings, env, reference, z, n=None):
    stats = {name: summarize(s) for name, s in samples.items()}
    ref = stats[reference]["median_ms"]
    ours = [k for k in stats if k.startswith("fastadv")]
    floors = [k for k in stats if k.startswith("floor")]
    both = min(ref, stats[ours[0]]["median_ms"])  # torchattacks and fastadv's default (eager) path
    return {
        "bench": "fair", "case": f"{label}/{model}/b{batch}" + (f"/n{n}" if n else ""), "label": label, "model": model,
        "batch": batch, "images": n, "calls_per_sample": calls, "steps": z["steps"], "backend": z["backend"] or "auto",
        "variants": stats, "speedup": {k: ref / stats[k]["median_ms"] for k in ours},
        "floor_at_or_below_both": {k: stats[k]["median_ms"] <= both for k in floors},
        "bit_exact": bool(exact), "reference": reference, "settings": settings,
        "samples_ms": {k: [round(v, 4) for v in s] for k, s in samples.items()},
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None, **env,
    }


def markdown(rows, profiles) -> str:
    env = rows[0]
    out = [f"# PGD timed fairly ({env['device']})", "",
           f"`python -m benchmarks.fair` at commit {env['commit']}; torch {env['torch']}, triton {env['triton']}, "
           f"python {env['python']}; {env['date']}. Settings: " +
           ", ".join(f"{k}={v}" for k, v in env["settings"].items()) + ". Medians of CUDA-event samples "
           "(perf_counter on a CPU), p20-p80 and min-max; each sample is `calls` back-to-back calls, per call.", ""]
    out += ["| row | model | batch | variant | median ms | p20-p80 | min-max | n | speedup vs reference | bit-exact |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, s in r["variants"].items():
            sp = r["speedup"].get(name)
            out.append(f"| {r['label']} | {r['model']} | {r['batch']} | {name} | {s['median_ms']:.3f} | "
                       f"{s['p20_ms']:.3f}-{s['p80_ms']:.3f} | {s['min_ms']:.3f}-{s['max_ms']:.3f} | {s['n']} | "
                       f"{'-' if sp is None else f'{sp:.3f}'} | {'yes' if r['bit_exact'] else 'NO'} |")
    for title, tables in profiles.items():
        out += ["", f"## Kernels per step: {title}", "", profile_table(tables)]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fair", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, backend 'torch'")
    p.add_argument("--results", default=str(results.RESULTS_DIR))
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run on the CPU")
    if args.dry_run:
        torch.set_num_threads(1)  # OpenMP threads spin-waiting on a shared CPU would swamp the tiny rows
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for the deterministic equality check
    rows, profiles = run(DRY if args.dry_run else GPU, device, log=lambda m: print(m, file=sys.stderr))
    stem = pathlib.Path(args.results) / f"{results.device_slug(device)}-fair"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "profiles": {
        k: {lib: {n: list(v) for n, v in t.items()} for lib, t in tables.items()} for k, tables in profiles.items()}},
        indent=1, default=str) + "\n")
    text = markdown(rows, profiles)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"results: {stem}.json and {stem}.md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
