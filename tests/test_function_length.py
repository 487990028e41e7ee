"""Every function of the runner fits on one screen: at most MAX_LINES lines, decorators and docstring included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "gapbench" / "runner"
MAX_LINES = 60


def long_functions(source: str, max_lines: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method of ``source`` longer than ``max_lines``
    (end_lineno - lineno + 1: from its ``def`` to its last line)."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > max_lines]


@pytest.mark.parametrize("path", sorted(RUNNER.glob("*.py")), ids=lambda p: p.name)
def test_no_runner_function_is_longer_than_60_lines(path):
    assert long_functions(path.read_text()) == [], f"{path.name}: split these functions"


def test_the_checker_finds_a_long_function_and_a_long_method():
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES - 1))  # 59 lines, in a method's indent
    fits = f"class Stages:\n    def fits(self):\n{body}"  # a def line and 59 body lines: exactly 60
    too_long = f"class Stages:\n    def too_long(self):\n{body}        return 0\n"  # 61
    nested = f"def outer():\n    def inner(self):\n{body}        return 0\n    return inner\n"
    assert long_functions(fits) == []
    assert long_functions(too_long) == [("too_long", MAX_LINES + 1)]
    assert long_functions(nested) == [("outer", MAX_LINES + 3), ("inner", MAX_LINES + 1)]
