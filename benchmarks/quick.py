"""The headline rows in one run that fits a lent GPU slot (``bash benchmarks/gpu.sh quick``).

Each row times fastadv against the reference in the same process (bench_kernels and
bench_attacks, called in turn) and lands in ``<results>/<device-slug>-quick.{json,md}``;
a short summary is printed at the end. The rows and the goal each answers:

- ``linf_step`` / ``l2_step`` at 256x3x224x224 fp32: fused GB/s as a fraction of the
  copy bandwidth measured in the same run (goal: one pass at copy speed);
- PGD-10, ResNet-18 (CIFAR size), batch 256, exact: fastadv / floor and the speedup
  over torchattacks, bit-exact (goal: the attack costs its model passes);
- PGD-10, small CNN, batch 1024, exact (launch-bound): speedup over torchattacks
  (goal: launch-bound models gain most);
- PGD-10, ResNet-18, batch 512, fast mode (bf16 + channels_last): speedup and the
  outcome agreement with exact mode (goal: fast mode pays off without changing answers);
- AutoAttack standard, pyautoattack's robust ResNet-18, batch AA_BATCH: speedup over
  pyautoattack and robust accuracy of both (goal: the evaluation users wait hours for).

Sizes were chosen from FLOP counts, not measured: ResNet-18 on 32x32 is about 0.56
GFLOP forward per image, so one PGD-10 call at batch 256 is about 4 TFLOP of forward and
input-gradient backward: well under a second on an H200 for each of fastadv, torchattacks
and the floor, about 20 s for the row with its repeats and deterministic re-run.
AutoAttack is latency-bound at small batches (Square's 5000 queries, 9 target classes of
APGD-T and FAB-T at 100 steps each); at batch AA_BATCH one run of each library was
estimated at under a minute, four runs in all (timed + deterministic re-run), so the whole
quick run should stay well within its 8 minutes. Read the times the run prints.

``--dry-run``: the same rows on the CPU at tiny sizes (backend 'torch'; APGD in AutoAttack's
place, see DRY_SIZES), into a folder of your choice, to prove the script end to end without a GPU.
"""
import argparse
import pathlib
import sys
import time

import torch

from benchmarks import bench_attacks, bench_kernels, results

AA_BATCH = 128
REPEATS = 5


GPU_SIZES = dict(shape="256x3x224x224", b256=256, b512=512, b1024=1024, b_aa=AA_BATCH, steps=10, repeats=REPEATS,
                 r18="resnet18", aa_model="robust-resnet18", aa="AutoAttack", aa_runs=("5", "1"), device=[])
# The dry run proves the plumbing, not the numbers: one step, batches of 2 to 4, the 8x8 CNN in
# ResNet-18's place (ResNet-18 in bf16 autocast takes minutes on a busy CPU), and in
# AutoAttack's place one APGD step against pyautoattack on it (the standard
# AutoAttack always runs its full budget: Square's 5000 queries alone take minutes on a CPU).
DRY_SIZES = dict(shape="2x3x16x16", b256=2, b512=2, b1024=4, b_aa=4, steps=1, repeats=1, r18="smallcnn-digits",
                 aa_model="smallcnn-digits",
                 aa="APGD", aa_runs=("1", "0"), device=["--device", "cpu", "--backend", "torch"])


def plan(dry_run: bool):
    """(label, module, argv) per row group, at GPU sizes or tiny CPU ones."""
    z = DRY_SIZES if dry_run else GPU_SIZES
    dev = z["device"]
    kernels = ["--ops", "linf_step,l2_step", "--shapes", z["shape"], "--dtypes", "fp32", "--repeats", "1", *dev[:2]]
    pgd = ["--attacks", "PGD", "--steps", str(z["steps"]), "--repeats", str(z["repeats"]), "--warmup", "1", *dev]
    return [
        ("steps vs copy", bench_kernels, kernels),
        ("PGD ResNet-18 exact", bench_attacks, ["--models", z["r18"], "--batch", str(z["b256"]), "--modes", "exact",
                                                 *pgd]),
        ("PGD small CNN", bench_attacks, ["--models", "smallcnn", "--batch", str(z["b1024"]), "--modes",
                                                   "exact", *pgd]),
        ("PGD ResNet-18 fast", bench_attacks, ["--models", z["r18"], "--batch", str(z["b512"]), "--modes", "fast",
                                                *pgd]),
        (z["aa"], bench_attacks, ["--models", z["aa_model"], "--attacks", z["aa"], "--batch", str(z["b_aa"]),
                                  "--steps", str(z["steps"]), "--modes", "exact", "--repeats", z["aa_runs"][0], "--warmup", z["aa_runs"][1],
                                  "--refs", "pyautoattack", *dev]),
    ]


def summary_lines(rows) -> list:
    """One line per headline row."""
    lines = []
    for r in rows:
        if r.get("bench") == "kernels":
            frac = r.get("fused_frac_copy", r.get("reference_frac_copy"))
            which = "fused" if "fused_frac_copy" in r else "eager chain (no GPU)"
            lines.append(f"{r['op']} {r['shape']} {r['dtype']}: {which} at {fmt(frac)} of copy bandwidth "
                         f"({fmt(r.get('fused_gbps', r.get('reference_gbps')), 0)} GB/s)")
        elif r.get("bench") == "attacks":
            parts = [f"{r['attack']} {r['model']} b{r['batch']} {r['mode']}: fastadv {fmt(r['fastadv_ms'], 1)} ms"]
            if r.get("reference_ms") is not None:
                parts.append(f"{r['reference']} {fmt(r['reference_ms'], 1)} ms, speedup {fmt(r.get('speedup'))}")
            if r.get("fastadv_floor_ratio") is not None:
                parts.append(f"fastadv/floor {fmt(r['fastadv_floor_ratio'])}")
            if r.get("equal") is not None:
                parts.append("bit-exact" if r["equal"] else f"not bit-exact (max diff {r.get('max_abs_diff')})")
            if r.get("exact_agreement") is not None:
                parts.append(f"agreement w/ exact {fmt(r['exact_agreement'])}")
            if r["reference"] == "pyautoattack":
                parts.append(f"success {fmt(r.get('success_rate'))} vs ref {fmt(r.get('reference_success_rate'))}")
            lines.append(", ".join(parts))
    return lines


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quick", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, backend 'torch'")
    p.add_argument("--results", default=str(results.RESULTS_DIR), help="folder for <device-slug>-quick.{json,md}")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run on the CPU")
    out = pathlib.Path(args.results) / f"{results.device_slug(device)}-quick.json"
    rows, times = [], []
    for label, module, argv_ in plan(args.dry_run):
        start = time.perf_counter()
        new = module.main([*argv_, "--out-json", str(out), "--quiet"])
        times.append((label, time.perf_counter() - start))
        if not new:
            raise SystemExit(f"{label}: no rows (see the notes above)")
        rows += new
    print("\n== quick summary ==")
    for line in summary_lines(rows):
        print(line)
    print("time per group: " + ", ".join(f"{label} {s:.0f} s" for label, s in times))
    print(f"results: {out} and {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
