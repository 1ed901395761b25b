"""The fused step ops against the reference's eager op chain, in GB/s.

For each op (linf_step, l2_step, random_start), shape and dtype:

- CUDA: the fused Triton op (``fastadv.ops.<op>(..., backend='triton')``, as an
  attack calls it) and the eager chain (``fastadv.reference.<op>``, torchattacks'
  arithmetic op for op) on the same tensors, timed with
  ``triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])`` (L2 flushed before each call);
- CPU: the Triton path is GPU-only, so only the chain fastadv runs on the CPU
  (backend 'torch' = fastadv.reference) is timed, with perf_counter medians.

Throughput uses the ideal bytes: one read of each input (adv, x, grad; x and noise
for random_start) and one write of the result. It is also given as a fraction of
a device copy measured in the same run: ``dst.copy_(src)`` of a buffer sized so the
copy moves the same number of bytes (read + write) as the op ideally does.

    python -m benchmarks.bench_kernels                       # all ops, shapes, fp32 + bf16
    python -m benchmarks.bench_kernels --shapes 128x3x32x32 --dtypes fp32 --no-write
"""
import argparse
import functools
import os
import sys

import torch

from . import results, timing

SHAPES = ["128x3x32x32", "512x3x32x32", "256x3x224x224"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("linf_step", "l2_step", "random_start")
# Tensors each op ideally moves: reads + one write.
TRAFFIC = {"linf_step": 4, "l2_step": 4, "random_start": 3}
CPU_NOTE = ("CPU rows: the Triton kernels run on CUDA only, so on the CPU fastadv's ops dispatch to backend "
            "'torch' (fastadv.reference, the eager chain); the 'ref' columns are that chain, 'fused' is empty.")


def parse_shape(text):
    return tuple(int(v) for v in text.lower().split("x"))


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(shape, generator=g)
    adv = (x + (torch.rand(shape, generator=g) * 2 - 1) * (8 / 255)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    noise = (torch.rand(shape, generator=g) * 2 - 1) * (8 / 255)
    return [t.to(device=device, dtype=dtype) for t in (adv, x, grad, noise)]


def op_callables(op, adv, x, grad, noise):
    """(fused, reference) zero-argument callables for one op on fixed inputs."""
    from fastadv import ops, reference

    if op == "linf_step":
        kw = dict(alpha=2 / 255, eps=8 / 255)
        return (lambda: ops.linf_step(adv, x, grad, backend="triton", **kw),
                lambda: reference.linf_step(adv, x, grad, **kw))
    if op == "l2_step":
        kw = dict(alpha=0.2, eps=0.5)
        return (lambda: ops.l2_step(adv, x, grad, backend="triton", **kw),
                lambda: reference.l2_step(adv, x, grad, **kw))
    if op == "random_start":
        return (lambda: ops.random_start(x, noise, backend="triton"),
                lambda: reference.random_start(x, noise))
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def copy_buffers(numel_per_tensor, n_tensors, dtype, device):
    """src and dst sized so dst.copy_(src) moves n_tensors tensors' worth of bytes."""
    numel = numel_per_tensor * n_tensors // 2
    src = torch.rand(numel, device=device).to(dtype)
    return src, torch.empty_like(src)


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else None


def bench_case(op, shape, dtype_name, device, *, repeats, clock="wall"):
    dtype = DTYPES[dtype_name]
    device = torch.device(device)
    adv, x, grad, noise = make_inputs(shape, dtype, device)
    numel = adv.numel()
    nbytes = TRAFFIC[op] * numel * adv.element_size()
    fused_fn, ref_fn = op_callables(op, adv, x, grad, noise)
    src, dst = copy_buffers(numel, TRAFFIC[op], dtype, device)
    copy_fn = functools.partial(dst.copy_, src)
    row = {
        "bench": "kernels", "case": f"{op}/{'x'.join(map(str, shape))}/{dtype_name}/{device.type}",
        "op": op, "shape": "x".join(map(str, shape)), "dtype": dtype_name, "device_kind": device.type,
        "ideal_bytes": nbytes,
    }
    if device.type == "cuda":
        row["backend"] = "triton"
        fused = timing.do_bench_cuda(fused_fn)
        ref = timing.do_bench_cuda(ref_fn)
        cp = timing.do_bench_cuda(copy_fn)
        out_f, out_r = fused_fn(), ref_fn()
        row["equal"] = bool(torch.equal(out_f, out_r))
        row["max_abs_diff"] = float((out_f.float() - out_r.float()).abs().max()) if numel else 0.0
        row["timer"] = "triton.testing.do_bench"
    else:
        row["backend"] = "torch"
        row["note"] = CPU_NOTE
        fused = None
        small = numel * adv.element_size() < 64 << 20
        min_t = 0.5 if small else None
        ref = timing.summary(timing.bench_cpu(ref_fn, warmup=1, repeats=repeats, min_time_s=min_t, clock=clock))
        cp = timing.summary(timing.bench_cpu(copy_fn, warmup=1, repeats=repeats, min_time_s=min_t, clock=clock))
        row["timer"] = "time.perf_counter" if clock == "wall" else "time.process_time"
    row["reference_ms"], row["reference_p20_ms"], row["reference_p80_ms"] = ref
    row["copy_ms"] = cp[0]
    if fused is not None:
        row["fused_ms"], row["fused_p20_ms"], row["fused_p80_ms"] = fused
        row["speedup"] = ref[0] / fused[0]
        row["fused_gbps"] = gbps(nbytes, fused[0])
    row["reference_gbps"] = gbps(nbytes, ref[0])
    row["copy_gbps"] = gbps(nbytes, cp[0])
    if row.get("fused_gbps") and row["copy_gbps"]:
        row["fused_frac_copy"] = row["fused_gbps"] / row["copy_gbps"]
    if row["reference_gbps"] and row["copy_gbps"]:
        row["reference_frac_copy"] = row["reference_gbps"] / row["copy_gbps"]
    del adv, x, grad, noise, src, dst
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of NxCxHxW")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {tuple(DTYPES)}")
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per case at least (CUDA: do_bench decides)")
    p.add_argument("--out-json", help="default benchmarks/results/<device-slug>.json")
    p.add_argument("--out-md", help="default: the JSON path with .md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU only: wall time (perf_counter) or this process's CPU time (process_time; "
                        "steadier on a shared machine, use with --threads 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    ops_ = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops_:
        if o not in OPS:
            p.error(f"unknown op {o!r}; expected {OPS}")
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected {tuple(DTYPES)}")
    if device.type != "cuda":
        print("note: no CUDA device; timing backend 'torch' (the eager reference chain) and a torch copy only. "
              "The fused Triton kernels are GPU-only.", file=sys.stderr)

    from tqdm import tqdm

    env = results.environment(device)
    cases = [(o, s, d) for s in shapes for d in dtypes for o in ops_]
    rows = []
    for o, s, d in tqdm(cases, desc="kernels", disable=args.quiet, file=sys.stderr):
        row = bench_case(o, s, d, device, repeats=args.repeats, clock=args.clock)
        row.update(env)
        row["threads"] = torch.get_num_threads()
        if hasattr(os, "getloadavg"):
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{env['device']} | commit {env['commit']} | torch {env['torch']} | triton {env['triton']} | "
          f"python {env['python']} | {env['date']}\n")
    results.print_table(rows, "kernels")
    if device.type != "cuda":
        print("\n" + CPU_NOTE)
    if not args.no_write:
        written = results.write_results(rows, args.out_json, args.out_md, device=device)
        print(f"\nwrote {written[0]} and {written[1]}")
    return rows


if __name__ == "__main__":
    main()
