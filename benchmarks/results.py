"""Where a benchmark row came from, and the files the rows are kept in.

Every row carries its provenance: device name, commit (``git rev-parse HEAD``,
with ``-dirty`` when tracked or untracked files outside benchmarks/results differ
from it), torch, triton and Python versions, and the UTC date. Rows live in
``benchmarks/results/<device-slug>.json`` (the data) and ``.md`` (the same rows as
Markdown tables, regenerated from the JSON on every write). A row is identified by
``(bench, case)``: writing a row again replaces the old one instead of adding a
duplicate, so re-running one benchmark refreshes its rows and keeps the others.
"""
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV_KEYS = ("device", "commit", "torch", "triton", "python", "date")


# -- provenance --------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform's guess."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    """A human name for the device the benchmark ran on, e.g. 'NVIDIA H100 80GB HBM3'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device) -> str:
    """File name stem for a device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2c'."""
    device = torch.device(device)
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return f"cpu-{slugify(cpu_name())}-{os.cpu_count()}c"


def _git(*args):
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def commit() -> str:
    """HEAD's hash, '-dirty' when the tree differs from it; FASTADV_COMMIT overrides
    (for copies of the tree without .git, such as a lent GPU machine)."""
    if os.environ.get("FASTADV_COMMIT"):
        return os.environ["FASTADV_COMMIT"]
    if not (REPO_ROOT / "benchmarks").is_dir():  # an installed copy (fastadv.bench): no checkout to ask
        import fastadv

        return f"fastadv {fastadv.__version__} (installed)"
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    # Read-only; the results this suite writes do not make the tree dirty.
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return head + ("-dirty" if status else "")


def triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - no triton, or one that fails to import: record why
        return None


def environment(device) -> dict:
    """The provenance fields every row carries."""
    return {
        "device": device_name(device),
        "commit": commit(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }


# -- files ---------------------------------------------------------------------------------


def default_paths(device, results_dir=RESULTS_DIR):
    slug = device_slug(device)
    results_dir = pathlib.Path(results_dir)
    return results_dir / f"{slug}.json", results_dir / f"{slug}.md"


def load_rows(path) -> list:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = data.get("rows", []) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def merge_rows(old: list, new: list) -> list:
    """old with every row whose (bench, case) appears in new replaced; new rows appended in order."""
    keys = {(r["bench"], r["case"]) for r in new}
    kept = [r for r in old if (r.get("bench"), r.get("case")) not in keys]
    return kept + list(new)


def write_results(rows: list, json_path=None, md_path=None, *, device=None) -> tuple:
    """Merge rows into the JSON file (replacing same (bench, case)) and rewrite the Markdown.

    Paths default to benchmarks/results/<device-slug>.{json,md}; the Markdown path to
    the JSON path with .md. Returns the paths written.
    """
    if json_path is None:
        json_path, default_md = default_paths(device if device is not None else "cpu")
        md_path = md_path or default_md
    json_path = pathlib.Path(json_path)
    md_path = pathlib.Path(md_path) if md_path else json_path.with_suffix(".md")
    merged = merge_rows(load_rows(json_path), rows)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"schema": 1, "rows": merged}, indent=1, sort_keys=False) + "\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(merged))
    return json_path, md_path


# -- Markdown ------------------------------------------------------------------------------


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:.2e}"
    return str(v)


def table(rows: list, columns: list) -> str:
    """A Markdown table of rows; columns is a list of (header, key or callable)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [fmt(k(r) if callable(k) else r.get(k)) for _, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_cell(r):
    if r.get("equal") is None:
        return None
    if r["equal"]:
        return "yes"
    d = r.get("max_abs_diff")
    return f"no (max abs diff {fmt(d)})" if d is not None else "no"


KERNEL_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"),
    ("fused ms", "fused_ms"), ("ref ms", "reference_ms"), ("speedup", "speedup"),
    ("fused GB/s", "fused_gbps"), ("ref GB/s", "reference_gbps"), ("copy GB/s", "copy_gbps"),
    ("fused/copy", "fused_frac_copy"), ("ref/copy", "reference_frac_copy"), ("exact", equal_cell),
    ("timer", "timer"), ("threads", "threads"), ("load", "load_avg_1m"), ("env", "env"),
]

def calls_cell(kind):
    """'fastadv / reference / floor' calls per sample of one kind ('grads' or 'forwards')."""

    def cell(r):
        calls = r.get("calls_per_sample")
        if not calls:
            return None
        return " / ".join(fmt(calls.get(who, {}).get(kind)) for who in ("fastadv", r.get("reference"), "floor"))

    return cell


ATTACK_COLUMNS = [
    ("attack", "attack"), ("model", "model"), ("batch", "batch"), ("mode", "mode"), ("device", "device_kind"),
    ("backend", "backend"), ("reference", "reference"), ("fastadv ms", "fastadv_ms"), ("ref ms", "reference_ms"),
    ("floor ms", "floor_ms"), ("speedup", "speedup"),
    ("grads/sample fastadv / ref / floor", calls_cell("grads")),
    ("forwards/sample fastadv / ref / floor", calls_cell("forwards")),
    ("fastadv/floor", "fastadv_floor_ratio"), ("ref/floor", "reference_floor_ratio"), ("bit-exact", equal_cell),
    ("success", "success_rate"), ("ref success", "reference_success_rate"), ("exact success", "exact_success_rate"),
    ("agreement w/ exact", "exact_agreement"),
    ("clock", "clock"), ("speedup, other clock", lambda r: r.get("speedup_wall") or r.get("speedup_cpu")),
    ("threads", "threads"), ("load", "load_avg_1m"), ("env", "env"),
]


def summarize(rows):
    """Per (model, batch, mode, backend, reference): median, min and max speedup over
    the attacks measured, and whether every one was bit-exact."""
    import statistics

    groups = {}
    for r in rows:
        if r.get("bench") == "attacks" and r.get("speedup") is not None:
            key = (r["model"], r["batch"], r["mode"], r.get("backend"), r["reference"], r.get("device_kind"))
            groups.setdefault(key, []).append(r)
    out = []
    for (m, b, mode, be, ref, dev), rs in groups.items():
        sp = sorted(r["speedup"] for r in rs)
        out.append({"model": m, "batch": b, "mode": mode, "device_kind": dev, "backend": be, "reference": ref,
                    "attacks": len(rs), "attack_names": ", ".join(r["attack"] for r in rs),
                    "median_speedup": statistics.median(sp), "min_speedup": sp[0], "max_speedup": sp[-1],
                    "all_bit_exact": all(bool(r.get("equal")) for r in rs)})
    return out


SUMMARY_COLUMNS = [("model", "model"), ("batch", "batch"), ("mode", "mode"), ("device", "device_kind"),
                   ("backend", "backend"), ("reference", "reference"), ("attacks", "attack_names"),
                   ("median speedup", "median_speedup"), ("min", "min_speedup"), ("max", "max_speedup"),
                   ("all bit-exact", "all_bit_exact")]


def _env_index(rows):
    envs = []
    for r in rows:
        e = tuple(r.get(k) for k in ENV_KEYS if k != "date")
        if e not in envs:
            envs.append(e)
    for r in rows:
        r["env"] = envs.index(tuple(r.get(k) for k in ENV_KEYS if k != "date")) + 1
    return envs


MODE_ORDER = {"exact": 0, "fast": 1}


def sort_attack_rows(rows: list) -> list:
    """Grouped by (model, batch, device, backend), exact before fast; attacks keep their
    measured order inside a group (a stable sort)."""
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r.get("model"), i)
    return sorted(rows, key=lambda r: (first[r.get("model")], r.get("batch") or 0, r.get("device_kind") or "",
                                       r.get("backend") or "", MODE_ORDER.get(r.get("mode"), 2)))


def render_markdown(rows: list) -> str:
    rows = [dict(r) for r in rows]
    envs = _env_index(rows)
    out = ["# fastadv benchmark results", ""]
    out.append("Generated from the JSON file beside this one; `env` refers to the list below. "
               "Times are medians; see benchmarks/README.md for what each column means.")
    out.append("")
    for i, e in enumerate(envs, 1):
        fields = dict(zip([k for k in ENV_KEYS if k != "date"], e))
        dates = sorted(r["date"] for r in rows if r["env"] == i and r.get("date"))
        span = f"{dates[0]} .. {dates[-1]}" if dates else "?"
        out.append(f"{i}. {fields['device']}; commit {fields['commit']}; torch {fields['torch']}; "
                   f"triton {fields['triton']}; python {fields['python']}; measured {span} (UTC)")
    out.append("")
    kern = [r for r in rows if r.get("bench") == "kernels"]
    if kern:
        out += ["## Step ops (bench_kernels)", "", table(kern, KERNEL_COLUMNS), ""]
        notes = sorted({r["note"] for r in kern if r.get("note")})
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    att = sort_attack_rows([r for r in rows if r.get("bench") == "attacks"])
    if att:
        out += ["## Attacks (bench_attacks)", "", table(att, ATTACK_COLUMNS), ""]
        summ = summarize(att)
        if summ:
            out += ["### Speedup over the reference, per model and batch (median over the attacks listed)", "",
                    table(summ, SUMMARY_COLUMNS), ""]
        notes = sorted({r["note"] for r in att if r.get("note")})
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    other = [r for r in rows if r.get("bench") not in ("kernels", "attacks")]
    if other:
        keys = [k for k in other[0] if k not in ENV_KEYS]
        out += ["## Other rows", "", table(other, [(k, k) for k in keys]), ""]
    return "\n".join(out)


def print_table(rows: list, bench: str, file=None):
    cols = KERNEL_COLUMNS if bench == "kernels" else ATTACK_COLUMNS
    rows = [dict(r) for r in rows]
    _env_index(rows)
    print(table(rows, [c for c in cols if c[0] != "env"]), file=file or sys.stdout)
