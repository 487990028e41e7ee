"""One error base: every error gapbench defines derives from GapbenchError, which the command line catches
once (exit 2, the message as it is)."""

import ast
import importlib
from pathlib import Path

import pytest

from gapbench.cli import EXIT_USAGE, main
from gapbench.errors import ConfigError, GapbenchError, RunError

PACKAGE = Path(__file__).resolve().parents[1] / "gapbench"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class name) of every class named *Error defined in gapbench."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("gapbench",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


def test_every_gapbench_error_derives_from_gapbench_error():
    classes = _error_classes()
    assert len(classes) >= 10
    outside = [f"{module}.{name}" for module, name in classes
               if not issubclass(getattr(importlib.import_module(module), name), GapbenchError)]
    assert not outside, "errors that the command line would not catch: " + ", ".join(outside)


def test_errors_keep_their_builtin_bases_and_old_homes():
    from gapbench.commands.check import CheckError
    from gapbench.data import ChecksumError, DataError
    from gapbench.runner.config import ConfigError as config_error
    from gapbench.runner.rundir import RunError as rundir_error

    assert config_error is ConfigError and rundir_error is RunError
    assert issubclass(ConfigError, ValueError) and issubclass(RunError, RuntimeError)
    assert issubclass(CheckError, ValueError) and issubclass(ChecksumError, DataError)
    assert issubclass(ChecksumError, ValueError)  # a download loop catches it with network errors


def test_the_command_line_prints_a_gapbench_error_as_it_is(monkeypatch, capsys):
    from gapbench.report.figures.curve import FigureError
    from gapbench.runner import config_reference

    def refuse():
        raise FigureError("something is wrong; do this")

    monkeypatch.setattr(config_reference, "reference_markdown", refuse)
    assert main(["config-reference"]) == EXIT_USAGE == 2
    assert capsys.readouterr().err == "gapbench: error: something is wrong; do this\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    """A bug is not bad input: it reaches the user with its traceback, not as exit 2."""
    from gapbench.runner import config_reference

    def broken():
        raise KeyError("bug")

    monkeypatch.setattr(config_reference, "reference_markdown", broken)
    with pytest.raises(KeyError):
        main(["config-reference"])
