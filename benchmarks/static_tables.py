"""Static performance tables of the Triton kernels, from their compiled code (no GPU needed).

    python -m benchmarks.static_tables            # writes benchmarks/results/static-sm{80,90,100}.md

For each launcher mode and dtype at 256x3x224x224 (compiled from one 3x224x224 sample, which
specializes the kernels exactly as the full batch does: same dtypes, alignment, divisibility
and block sizes), every kernel it launches: registers per thread, local memory (spills),
shared memory, widest global access, and the global bytes each element of the image tensors
moves (design minimum, which tests/test_compiled.py checks against the PTX). The predicted
step time is a model, not a measurement: bytes moved over the copy bandwidth of an H100
(about 3.0 TB/s) and an H200 (about 4.3 TB/s), ignoring launch latency and caches.
"""
import argparse
import datetime
import os
import subprocess

import torch

from fastadv import compile_check as cc_

BATCH, SAMPLE = 256, (3, 224, 224)
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}  # bytes/s, read + write copy bandwidth (nominal)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(OUT), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rows(cc):
    """(case, [(kernel, profile, bytes per element)]) for every launcher mode and dtype."""
    seen = set()
    for launcher, mode, tiled in cc_._modes():
        path = "tiled" if tiled else "row"  # a 224x224 sample takes the tiled path where there is one
        for dtype in cc_.DTYPES:
            if (launcher, mode, dtype) in seen:
                continue
            seen.add((launcher, mode, dtype))
            case = cc_.Case(launcher, mode, dtype, "contiguous", path, shape=(1, *SAMPLE))
            kernels = []
            for item in cc_.compile_case(case, cc):
                traffic = cc_.expected_bits(item)[2]
                elem = torch.finfo(dtype).bits // 8
                kernels.append((item, cc_.inspect(item), (traffic.reads + traffic.writes) * elem))
            yield case, kernels


def table(cc) -> str:
    import triton

    n = BATCH * SAMPLE[0] * SAMPLE[1] * SAMPLE[2]
    lines = [
        f"# Static kernel table, sm_{cc}",
        "",
        f"Written by `python -m benchmarks.static_tables` on {datetime.date.today().isoformat()}, commit {_commit()}, "
        f"triton {triton.__version__}, torch {torch.__version__}. Compiled on the CPU for `GPUTarget('cuda', {cc}, 32)`;"
        " nothing here ran on a GPU.",
        "",
        f"Step at {BATCH}x{'x'.join(map(str, SAMPLE))}: registers, local memory (spill bytes), shared memory and the"
        " widest global load/store (bits) per kernel, read from the cubin and PTX; bytes/elem is the image-tensor"
        " traffic of the design minimum (reads + writes, checked against the PTX by tests/test_compiled.py)."
        " **Predicted time is a model, not a measurement**: bytes / copy bandwidth"
        f" ({', '.join(f'{k} {v / 1e12:.1f} TB/s' for k, v in BANDWIDTH.items())}), no launch latency, no cache effects.",
        "",
        "| launcher | mode | dtype | kernel (phase) | regs | spill B | smem B | ld/st bits | bytes/elem |"
        + "".join(f" {k} us (model) |" for k in BANDWIDTH),
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(BANDWIDTH),
    ]
    for case, kernels in rows(cc):
        total = sum(b for _, _, b in kernels)
        for i, (item, prof, b) in enumerate(kernels):
            phase = {k: v for k, v in item.options.items() if k in ("PHASE", "FINISH")}
            name = item.name + (f" ({', '.join(f'{k}={v}' for k, v in phase.items())})" if phase else "")
            widths = f"{max(prof.ptx_loads, default=0)}/{max(prof.ptx_stores, default=0)}"
            times = "".join(f" {n * total / bw * 1e6:.0f} |" if i == 0 else " |" for bw in BANDWIDTH.values())
            lines.append(
                f"| {case.launcher if i == 0 else ''} | {case.mode if i == 0 else ''} |"
                f" {str(case.dtype).removeprefix('torch.') if i == 0 else ''} | {name} | {prof.registers} |"
                f" {prof.spills} | {prof.shared} | {widths} | {b} |{times}"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="*", default=list(cc_.TARGETS))
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for cc in args.targets:
        text = table(cc)  # before opening: a failed compile leaves the last table in place
        path = os.path.join(args.out, f"static-sm{cc}.md")
        with open(path, "w") as f:
            f.write(text)
        print(path)


if __name__ == "__main__":
    main()
