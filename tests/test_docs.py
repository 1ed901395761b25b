"""The documentation site (mkdocs.yml, docs/): every public name has a reference entry, every
page is in the navigation, and the bounds the pages state are the bounds the tests assert.
No network and no MkDocs needed here; `make docs` builds the site with --strict."""
import inspect
import pathlib
import re
import types

import torch

import fastadv
from fastadv.attacks.deepfool import DeepFool
from fastadv.engine import EngineOptions
from fastadv.hints import EngineKwargs
from helpers import L2_KERNEL_ATOL
from test_cw_deepfool_square import DEEPFOOL_ATOL

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def nav_pages():
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def documented():
    """Every identifier a `::: path` directive renders: the path, and its `members:` when listed."""
    paths = set()
    for page in DOCS.rglob("*.md"):
        for block in re.split(r"\n(?=::: )", page.read_text()):
            m = re.match(r"::: ([\w.]+)", block)
            if not m:
                continue
            paths.add(m.group(1))
            members = re.search(r"members:\n((?:\s+- [\w_]+\n?)+)", block)
            if members:
                paths.update(f"{m.group(1)}.{name}" for name in re.findall(r"- ([\w_]+)", members.group(1)))
    return paths


def qualified(name):
    obj = getattr(fastadv, name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"fastadv.{name}"  # __version__, __wrapper__


def test_every_public_name_has_a_reference_entry():
    paths = documented()
    missing = []
    for name in fastadv.__all__:
        path = qualified(name)
        if path not in paths and not any(p.startswith(path + ".") for p in paths):
            missing.append(f"{name} ({path})")
    assert not missing, f"no `::: ...` entry in docs/ for {missing}"
    assert "fastadv.evaluate.evaluate" in paths and "fastadv.train.fit" in paths


def test_every_page_is_in_the_navigation():
    nav = nav_pages()
    assert len(nav) == len(set(nav))
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk


def test_engine_keywords_match_the_engine_options():
    assert set(EngineKwargs.__annotations__) == set(EngineOptions.__dataclass_fields__)


def sci(x):
    """1e-06 -> '1e-6', as the pages write bounds."""
    return f"{x:.0e}".replace("e-0", "e-")


def row(page, name):
    return next(line for line in (DOCS / page).read_text().splitlines() if line.startswith(f"| [{name}]"))


def test_stated_bounds_are_the_tested_bounds():
    """DeepFool's bound and the L2 kernels' bound read the same in the docs, the docstring and the tests."""
    bound = sci(DEEPFOOL_ATOL)
    assert f"within {bound}" in row("attacks.md", "DeepFool")
    assert f"within {bound} of torchattacks" in (DOCS / "migration.md").read_text()
    assert f"within {bound} (the tests assert it;" in " ".join(DeepFool.__doc__.split())
    assert f"DeepFool, which is batched (within {bound})" in " ".join((ROOT / "README.md").read_text().split())
    l2 = f"L2 within {sci(L2_KERNEL_ATOL[torch.float32])}"
    for name in ("APGD", "APGDT"):
        assert l2 in row("attacks.md", name), name
