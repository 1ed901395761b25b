"""Timers: CUDA events on the GPU, time.perf_counter on the CPU; medians and quantiles."""
import statistics
import time

import torch


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device):
    """(fn()'s result, wall milliseconds, CPU-time milliseconds or None).

    CUDA: events around the call, then a sync (the sync follows the end event, so it
    is not timed); no CPU time. CPU: perf_counter for the wall time, and
    time.process_time (this process's CPU time over all its threads), which on a
    machine shared with other jobs is far less disturbed by them than the wall time.
    """
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(end), None
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    return out, (t1 - t0) * 1e3, (time.process_time() - c0) * 1e3


def quantile(samples, q):
    """Linear-interpolated quantile q in [0, 1] of a list of numbers."""
    s = sorted(samples)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(samples):
    """(median, p20, p80) in the samples' unit, the same quantiles as do_bench's [0.5, 0.2, 0.8]."""
    return statistics.median(samples), quantile(samples, 0.2), quantile(samples, 0.8)


def bench_cpu(fn, *, warmup=1, repeats=5, min_time_s=None, clock="wall"):
    """Samples (ms) of fn() after warmup calls; with min_time_s, keeps sampling past
    repeats until that much time has gone by (at most 10x repeats). clock 'wall' is
    perf_counter; 'cpu' is time.process_time (this process's CPU time, all threads),
    which other jobs on a shared machine disturb far less."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        fn()
    samples = []
    t_start = time.perf_counter()
    while True:
        t0 = now()
        fn()
        samples.append((now() - t0) * 1e3)
        if len(samples) >= repeats and (
            min_time_s is None or time.perf_counter() - t_start >= min_time_s or len(samples) >= 10 * repeats
        ):
            return samples


def do_bench_cuda(fn, *, warmup_ms=25, rep_ms=100):
    """triton.testing.do_bench with quantiles [0.5, 0.2, 0.8]: (median, p20, p80) in ms."""
    import triton.testing

    r = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in r)
