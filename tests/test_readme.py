"""The README is a front page: its example runs as written, it stays short, its links lead
somewhere, it names every attack, and its speed figures are those of the results files its
picture is drawn from."""
import json
import pathlib
import re
import statistics

from fastadv.attacks import REGISTRY

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ["Quick start", "Five lines", "Switching from torchattacks", "Attacks", "Speed", "Documentation"]


def text():
    return README.read_text()


def test_readme_example_runs(capsys):
    code = re.search(r"## Five lines\s+```python\n(.*?)```", text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    acc = float(out.split("robust accuracy:")[1])
    assert 0.0 <= acc < 0.2, out  # PGD at eps 0.2 fools a plainly trained digits CNN


def test_readme_is_a_short_front_page():
    lines = text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move detail to docs/"
    headings = [line[3:] for line in lines if line.startswith("## ")]
    assert headings == SECTIONS, headings
    for command in ("make demo", "make test", "make test-fast", "make docs"):
        assert command in text(), command


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text())
    local = [t for t in targets if not t.startswith("http")]
    assert "docs/speed.png" in local and "docs/migration.md" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_readme_lists_every_attack():
    section = text().split("## Attacks", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\b[A-Za-z0-9]+\b", section))
    assert set(REGISTRY) <= listed, sorted(set(REGISTRY) - listed)


def rows(name):
    return [r for r in json.loads((ROOT / "benchmarks" / "results" / name).read_text())["rows"]
            if r.get("bench") == "attacks"]


def test_readme_speed_figures_are_the_results_files():
    """The numbers the README quotes, recomputed from the files the picture is drawn from."""
    speed = text().split("## Speed", 1)[1].split("\n## ", 1)[0]
    cpu = [r for r in rows("cpu-kernel-attacks.json") if r["reference"] == "torchattacks"]
    for model, n in (("linear", 19), ("smallcnn", 18)):
        ups = [r["speedup"] for r in cpu if r["model"] == model]
        assert len(ups) == n and all(r["equal"] for r in cpu if r["model"] == model)
        for value in (statistics.median(ups), min(ups), max(ups)):
            assert f"{value:.2f}x" in speed, (model, value)
    gpu = {(r["model"], r["batch"], r["mode"]): r["speedup"] for r in rows("nvidia-h200-quick.json")}
    exact = [v for (_, _, mode), v in gpu.items() if mode == "exact" and v < 1]
    assert f"{min(exact):.2f}-{max(exact):.2f}x" in speed
    assert f"{gpu[('resnet18', 512, 'fast')]:.2f}x" in speed
    assert f"{gpu[('robust-resnet18', 128, 'exact')]:.2f}x" in speed
    command = re.search(r"```bash\n(.*?)```", speed, re.S).group(1)
    assert command.strip() in (ROOT / "docs" / "speed.md").read_text(), "the picture's command, as docs/speed.md has it"
    for name in re.findall(r"benchmarks/results/[\w.-]+\.json", command):
        assert (ROOT / name).exists(), name


def test_speed_picture_is_drawn_from_the_results_files(tmp_path):
    from benchmarks import plot

    command = re.search(r"```bash\n(.*?)```", text().split("## Speed", 1)[1], re.S).group(1)
    sources = [ROOT / name for name in re.findall(r"benchmarks/results/[\w.-]+\.json", command)]
    devices = {(r["device_kind"], r["device"]) for r in plot.summary_rows(sources)}
    assert {kind for kind, _ in devices} == {"cpu", "cuda"}, devices  # CPU and GPU rows, each with its device
    png = plot.plot_summary(sources, tmp_path / "speed.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ROOT / "docs" / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
