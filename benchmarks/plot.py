"""Bar charts of the benchmark results (matplotlib, PNG).

``plot(source, out_dir=None)`` takes a results JSON file or a folder of them
(benchmarks/results/) and writes, per JSON file, ``<stem>-attacks.png`` (time per
attack for fastadv, each reference library and the floor, one panel per model /
batch / mode) and ``<stem>-kernels.png`` (GB/s of the step ops against the copy
bandwidth) when the file has such rows. It returns the paths written; the CLI
(``fastadv bench --plot DIR``) can call it directly.

    python -m benchmarks.plot benchmarks/results/                 # PNGs beside the JSON files
    python -m benchmarks.plot benchmarks/results/cpu-amd-epyc-2c.json -o /tmp/plots
    python -m benchmarks.plot --summary A.json B.json -o speed.png  # one picture of every row's speedup

``plot_summary(paths, out_png)`` draws that one picture (docs/speed.png, shown in the README).
"""
import argparse
import math
import pathlib

from . import results

COLORS = {"fastadv": "#1f77b4", "torchattacks": "#ff7f0e", "pyautoattack": "#2ca02c", "floor": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _json_files(source):
    source = pathlib.Path(source)
    if source.is_dir():
        return sorted(source.glob("*.json"))
    if source.exists():
        return [source]
    raise FileNotFoundError(f"{source}: no such results file or folder")


def _grid(n):
    cols = min(n, 2)
    return math.ceil(n / cols), cols


def plot_attacks(rows, out_png, title=""):
    """Grouped bars of median ms per attack: fastadv, the references and the floor. None if no rows."""
    rows = results.sort_attack_rows([r for r in rows if r.get("bench") == "attacks"])
    if not rows:
        return None
    plt = _pyplot()
    panels = {}
    for r in rows:
        key = (r["model"], r["batch"], r["mode"], r.get("device_kind"), r.get("backend"))
        panels.setdefault(key, []).append(r)
    nrows, ncols = _grid(len(panels))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.8 * nrows), squeeze=False)
    for ax, ((model, batch, mode, dev, backend), rs) in zip(axes.flat, panels.items()):
        attacks = list(dict.fromkeys(r["attack"] for r in rs))
        refs = list(dict.fromkeys(r["reference"] for r in rs if r.get("reference_ms") is not None))
        series = ["fastadv", *refs, "floor"]
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            vals = []
            for a in attacks:
                ra = [r for r in rs if r["attack"] == a]
                if s == "fastadv":
                    v = ra[0].get("fastadv_ms")
                elif s == "floor":
                    v = ra[0].get("floor_ms")
                else:
                    v = next((r.get("reference_ms") for r in ra if r["reference"] == s), None)
                vals.append(float("nan") if v is None else v)
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(attacks))]
            ax.bar(xs, vals, width, label=s, color=COLORS.get(s))
        for j, a in enumerate(attacks):
            sp = next((r.get("speedup") for r in rs if r["attack"] == a and r.get("speedup")), None)
            if sp:
                ax.annotate(f"{sp:.2f}x", (j, 0), xycoords=ax.get_xaxis_transform(), xytext=(0, -24),
                            textcoords="offset points", ha="center", fontsize=7, color=COLORS["fastadv"],
                            annotation_clip=False)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels(attacks, fontsize=8)
        vals = [v for r in rs for v in (r.get("fastadv_ms"), r.get("reference_ms"), r.get("floor_ms")) if v]
        log = bool(vals) and max(vals) / min(vals) > 30
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("median ms per attack call" + (" (log)" if log else ""))
        ax.set_title(f"{model}, batch {batch}, {mode}, {dev}/{backend}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title + "\n(lower is better; under each attack: reference time / fastadv time)", fontsize=9)
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_kernels(rows, out_png, title=""):
    """Bars of GB/s per (op, shape, dtype): fused, reference chain, copy. None if no rows."""
    rows = [r for r in rows if r.get("bench") == "kernels"]
    if not rows:
        return None
    plt = _pyplot()
    labels = [f"{r['op']}\n{r['shape']}\n{r['dtype']}" for r in rows]
    series = [("fused", "fused_gbps", COLORS["fastadv"]), ("reference chain", "reference_gbps", COLORS["torchattacks"]),
              ("copy", "copy_gbps", COLORS["floor"])]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for i, (name, key, color) in enumerate(series):
        vals = [float("nan") if r.get(key) is None else r[key] for r in rows]
        ax.bar([j + (i - 1) * width for j in range(len(rows))], vals, width, label=name, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("GB/s (ideal bytes / median time)")
    ax.legend(fontsize=8)
    ax.set_title(title + " (higher is better)", fontsize=9)
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def summary_rows(paths):
    """The attack rows of the given results files, one per (device, model, batch, mode, attack):
    against torchattacks where it was measured, else against the other reference."""
    chosen = {}
    for path in paths:
        for r in results.load_rows(path):
            if r.get("bench") != "attacks" or not r.get("speedup"):
                continue
            key = (r.get("device"), r["model"], r["batch"], r["mode"], r["attack"])
            if key not in chosen or r.get("reference") == "torchattacks":
                chosen[key] = r
    return list(chosen.values())


def plot_summary(paths, out_png):
    """One picture of measured speed: per results row, fastadv's time over its reference's, one
    panel per device, model and batch (each titled with the device as the results file names it)."""
    rows = summary_rows(paths)
    if not rows:
        raise ValueError(f"no attack rows with a speedup in {[str(p) for p in paths]}")
    plt = _pyplot()
    groups = {}
    for r in rows:
        groups.setdefault((r.get("device"), r["model"], r["batch"]), []).append(r)
    panels = {}  # a model with a few rows shares its device's panel, its rows labelled with it
    for (device, model, batch), rs in groups.items():
        key = (device, model, batch) if len(rs) >= 3 else (device, None, None)
        panels.setdefault(key, []).extend(rs)
    height = max(len(rs) for rs in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 1.2 + 0.27 * height), squeeze=False)
    for ax, ((device, model, batch), rs) in zip(axes.flat, panels.items()):
        labels = [r["attack"] + ("" if model else f", {r['model']} b{r['batch']}")
                  + (f" ({r['mode']})" if r["mode"] != "exact" else "")
                  + ("" if r.get("reference") == "torchattacks" else f" vs {r['reference']}") for r in rs]
        speedups = [r["speedup"] for r in rs]
        colors = [COLORS["fastadv"] if s >= 1 else COLORS["torchattacks"] for s in speedups]
        ys = range(len(rs))[::-1]
        ax.barh(list(ys), speedups, color=colors, height=0.7)
        for y, sp in zip(ys, speedups):
            ax.annotate(f"{sp:.2f}x", (sp, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        lo, hi = min(0.5, min(speedups) * 0.8), max(2.0, max(speedups) * 1.6)
        ticks = [t for t in (0.5, 1, 2, 4, 8, 16) if lo <= t <= hi]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.axvline(1.0, color=COLORS["floor"], linewidth=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.6, height - 0.4)
        ax.set_xlabel("reference time / fastadv time (> 1x: fastadv faster)", fontsize=8)
        kind = "GPU" if rs[0].get("device_kind") == "cuda" else "CPU"
        ax.set_title(f"{kind}: {device}" + (f"\n{model}, batch {batch}" if model else ""), fontsize=9)
    refs = sorted({r["reference"] for r in rows})
    fig.suptitle(f"fastadv against {' and '.join(refs)}, measured side by side (one bar per results row)", fontsize=10)
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, metadata={"Software": None})  # the same bytes from the same rows
    plt.close(fig)
    return out_png


def plot(source, out_dir=None):
    """PNGs for every results JSON in source (a file or a folder); returns the paths written."""
    written = []
    for path in _json_files(source):
        rows = results.load_rows(path)
        target = pathlib.Path(out_dir) if out_dir else path.parent
        devices = sorted({r.get("device", "?") for r in rows})
        title = "; ".join(devices)
        for fn, suffix in ((plot_attacks, "attacks"), (plot_kernels, "kernels")):
            png = fn(rows, target / f"{path.stem}-{suffix}.png", title=title)
            if png is not None:
                written.append(png)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description="Bar charts of benchmark results.")
    p.add_argument("source", nargs="*", default=[str(results.RESULTS_DIR)], help="results JSON file(s) or a folder")
    p.add_argument("-o", "--out-dir", help="where to write the PNGs (default: beside each JSON file); with --summary "
                                            "the PNG file itself")
    p.add_argument("--summary", action="store_true", help="one picture of the speedups of every given results file")
    args = p.parse_args(argv)
    if args.summary:
        print(plot_summary(args.source, args.out_dir or "speed.png"))
        return
    for source in args.source:
        for path in plot(source, args.out_dir):
            print(path)


if __name__ == "__main__":
    main()
