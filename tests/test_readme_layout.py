"""README.md's "Layout" names every module and subpackage of gapbench/, and nothing else, in layer order.

The tree is the first code block under "## Layout": a line ``NAME.py  what it holds`` per module and
``NAME/  what it holds`` per package, indented two spaces per level below ``gapbench/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
INDENT = 2  # spaces per level of the tree


class Entry:
    """One line of the tree: its path below gapbench/ ("runner/config.py", "report/figures/"), the line
    and its number in the block."""

    def __init__(self, path: str, line: str, number: int):
        self.path, self.line, self.number = path, line, number


def layout_block(readme: str) -> list[str]:
    """The lines of the first code block after the "## Layout" heading."""
    section = readme.split("\n## Layout\n", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", section[1], re.S | re.M)
    assert block, "README.md's Layout section has no code block holding the tree"
    return block.group(1).splitlines()


def layout_entries(lines: list[str]) -> list[Entry]:
    """The entries of the gapbench/ tree, in order; an AssertionError names a malformed line."""
    entries, parents, inside = [], [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name, _, description = line.strip().partition(" ")
        if indent == 0:
            inside = name == "gapbench/"
            continue
        if not inside:
            continue
        assert indent % INDENT == 0, f"Layout line {number} ({line.strip()!r}): indent {INDENT} spaces per level"
        depth = indent // INDENT
        assert depth <= len(parents) + 1, f"Layout line {number} ({line.strip()!r}) is indented deeper than its package"
        assert name.endswith((".py", "/")), (f"Layout line {number} ({line.strip()!r}): name a module NAME.py "
                                             "and a package NAME/")
        assert description.strip(), f"Layout line {number} ({name}): say what it holds after the name"
        del parents[depth - 1:]
        entries.append(Entry("".join(parents) + name, line, number))
        if name.endswith("/"):
            parents.append(name)
    return entries


def package_paths(package: Path) -> set[str]:
    """Every module ("runner/config.py") and subpackage ("report/figures/") below ``package``; a package's
    __init__.py is its own line."""
    paths = set()
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if path.name != "__init__.py":
            paths.add(relative.as_posix())
        elif relative.parent.parts:
            paths.add(relative.parent.as_posix() + "/")
    return paths


def _suggestion(path: str, entries: list[Entry]) -> str:
    """Where and what to add for a missing path: the line, indented, and the line it goes under."""
    parent, _, name = path.rstrip("/").rpartition("/")
    depth = path.rstrip("/").count("/") + 1
    name += "/" if path.endswith("/") else ""
    line = " " * (INDENT * depth) + name.ljust(max(30 - INDENT * depth, len(name) + 1)) + "  WHAT IT HOLDS"
    under = next((e.line.rstrip() for e in entries if e.path == parent + "/"), "gapbench/") if parent else "gapbench/"
    return f"add the line\n{line}\nunder\n{under}"


def layout_problems(readme: str, package: Path) -> list[str]:
    """What to change in README's Layout so that it matches ``package``; [] when it does."""
    entries = layout_entries(layout_block(readme))
    named = [e.path for e in entries]
    problems = [f"README.md's Layout names gapbench/{p} twice" for p in sorted({p for p in named if named.count(p) > 1})]
    actual = package_paths(package)
    for path in sorted(actual - set(named)):
        problems.append(f"README.md's Layout lacks gapbench/{path}: {_suggestion(path, entries)}")
    for entry in entries:
        if entry.path not in actual:
            problems.append(f"README.md's Layout names gapbench/{entry.path}, which does not exist: remove or "
                            f"rename its line {entry.line.strip()!r}")
    top = [(e.path.rstrip("/").removesuffix(".py"), e.line.strip()) for e in entries if "/" not in e.path.rstrip("/")]
    ranks = [next((r for r, names in enumerate(LAYERS) if name in names), None) for name, _ in top]
    for (name, line), rank in zip(top, ranks):
        if rank is None:
            problems.append(f"gapbench/{name} is in no layer of tests/test_layers.py LAYERS: add it there")
    known = [(rank, line) for rank, (_, line) in zip(ranks, top) if rank is not None]
    for (rank, line), (next_rank, next_line) in zip(known, known[1:]):
        if next_rank < rank:
            problems.append(f"README.md's Layout lists {next_line.split()[0]} (layer {next_rank}) after "
                            f"{line.split()[0]} (layer {rank}); order the top level bottom to top as "
                            "tests/test_layers.py LAYERS")
    return problems


def test_readme_layout_matches_the_package():
    problems = layout_problems((ROOT / "README.md").read_text(encoding="utf-8"), ROOT / "gapbench")
    assert not problems, "\n\n".join(problems)


def _fake_package(root: Path, files: list[str]) -> Path:
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text("")
    return root


README = """text

## Layout

```
gapbench/
  errors.py        errors
  data/            datasets
    load.py        load_dataset
  runner/          the runner
    run.py         the driver
  cli.py           the command
tests/
```
"""


def test_the_check_sees_every_kind_of_drift(tmp_path):
    files = ["__init__.py", "errors.py", "data/__init__.py", "data/load.py", "runner/__init__.py", "runner/run.py",
             "cli.py"]
    assert layout_problems(README, _fake_package(tmp_path / "a", files)) == []
    new_module = layout_problems(README, _fake_package(tmp_path / "b", files + ["runner/stages.py"]))
    assert new_module == ["README.md's Layout lacks gapbench/runner/stages.py: add the line\n"
                          "    stages.py                   WHAT IT HOLDS\nunder\n  runner/          the runner"]
    new_package = layout_problems(README, _fake_package(tmp_path / "c", files + ["report/__init__.py"]))
    assert new_package[0].startswith("README.md's Layout lacks gapbench/report/: add the line\n  report/")
    gone = layout_problems(README, _fake_package(tmp_path / "d", [f for f in files if f != "data/load.py"]))
    assert gone == ["README.md's Layout names gapbench/data/load.py, which does not exist: remove or rename its "
                    "line 'load.py        load_dataset'"]
    swapped = README.replace("  cli.py           the command\n", "").replace("gapbench/\n", "gapbench/\n  cli.py  x\n")
    assert "order the top level bottom to top" in layout_problems(swapped, _fake_package(tmp_path / "e", files))[0]
    with pytest.raises(AssertionError, match="say what it holds"):
        layout_problems(README.replace("load.py        load_dataset", "load.py"), tmp_path / "a")
