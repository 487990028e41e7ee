"""The package's imports point one way: a module imports only from its own layer or the layers below.

The layers, bottom to top, are the order data flows through gapbench (README "Layout"). Every import
is counted, including those inside functions: an import deferred to call time still ties the lower
module to the higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gapbench"

# Bottom to top. A name is a module or a subpackage of gapbench; the first match of a module's dotted
# name (longest prefix) gives its layer.
LAYERS = [
    ["errors", "random", "io", "outputs", "deadline"],
    ["data"],
    ["models"],
    ["posteriors"],
    ["estimators"],
    ["inference"],
    ["gaps", "measure", "train", "calibration"],
    ["report"],
    ["runner"],
    ["commands", "adapters"],
    ["bench"],
    ["cli", "__main__"],
]


def _layer_of(module: str) -> int | None:
    parts = module.split(".")[1:]
    if not parts:  # the package itself: its __init__ gathers the public API from every layer
        return None
    for rank, names in enumerate(LAYERS):
        if parts[0] in names:
            return rank
    raise AssertionError(f"gapbench.{'.'.join(parts)} is in no layer: add it to LAYERS and to README's Layout")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("gapbench",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "gapbench":  # "from gapbench import x": x is a module, or a name of the package's API
                targets.update(f"gapbench.{alias.name}" for alias in node.names
                               if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir())
            elif target.startswith("gapbench."):
                targets.add(target)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.startswith("gapbench."))
    return targets


def test_every_import_points_down_or_sideways():
    upward = []
    for module, path in sorted(_modules().items()):
        rank = _layer_of(module)
        if rank is None:
            continue
        for target in sorted(_imports(module, path)):
            target_rank = _layer_of(target)
            if target_rank is not None and target_rank > rank:
                upward.append(f"{module} (layer {rank}) imports {target} (layer {target_rank})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk above would pass vacuously if it saw no imports; a planted upward import must show."""
    fake = tmp_path / "gapbench"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "loader.py").write_text("def f():\n    from ..runner import config\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="gapbench.data.loader .* imports gapbench.runner"):
        test_every_import_points_down_or_sideways()
