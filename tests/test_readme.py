"""The README's example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    code = re.search(r"## Five lines\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    acc = float(out.split("robust accuracy:")[1])
    assert 0.0 <= acc < 0.2, out  # PGD at eps 0.2 fools a plainly trained digits CNN
