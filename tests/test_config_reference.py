"""The config-key reference is made from the config models, and README.md holds the current one."""

import tomllib
import types
import typing
from pathlib import Path

import pytest

from gapbench.cli import main
from gapbench.errors import ConfigError
from gapbench.runner.config import ExperimentConfig
from gapbench.runner.config_reference import (BEGIN, END, REGENERATE, default_text, reference_block,
                                              reference_markdown, reference_rows, update_file)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_holds_the_generated_config_table():
    text = README.read_text(encoding="utf-8")
    start, end = reference_block(text)
    assert text[start:end] == reference_markdown(), (
        f"README.md's config table differs from the descriptions in gapbench/runner/config.py; regenerate it: "
        f"{REGENERATE}")


def _fields():
    for section, key, _, _ in reference_rows():
        model = ExperimentConfig if section == "(top)" else ExperimentConfig.model_fields[section].annotation
        yield f"{section}.{key}", model.model_fields[key]


def test_every_key_has_one_row():
    keys = [f"{s}.{k}" for s, k, _, _ in reference_rows()]
    expected = [f"(top).{k}" for k in ("name", "seed")] + [
        f"{section}.{key}" for section, field in ExperimentConfig.model_fields.items() if section not in ("name", "seed")
        for key in field.annotation.model_fields]
    assert keys == expected


def _choices(annotation) -> tuple[str, ...]:
    """The values of a Literal annotation (or an optional one); () for anything else."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(annotation) if arg is not type(None) for c in _choices(arg))
    return ()


def test_each_description_names_every_choice_of_its_key():
    missing = [f"{key}: `{choice}`" for key, field in _fields() for choice in _choices(field.annotation)
               if f"`{choice}`" not in field.description]
    assert not missing, "descriptions that do not name a choice of their key: " + ", ".join(missing)
    assert _choices(typing.Literal["a", "b"] | None) == ("a", "b")  # the check sees optional Literals


def test_the_default_column_is_the_default_as_toml():
    """Where no shown_default overrides it, the default column parses (as TOML) back to the field's default."""
    checked = 0
    for key, field in _fields():
        extra = field.json_schema_extra or {}
        if field.is_required() or "shown_default" in extra or field.default is None:
            continue
        text = default_text(field).strip("`")
        assert tomllib.loads(f"v = {text}")["v"] == field.default, key
        checked += 1
    assert checked > 50
    assert default_text(ExperimentConfig.model_fields["name"]) == "required"
    assert default_text(ExperimentConfig.model_fields["model"].annotation.model_fields["flow_steps"]) == "none"


def test_cells_are_escaped():
    """A '|' inside a description would end its cell; a '*' outside code would start emphasis."""
    table = reference_markdown()
    assert r"p(z1\|z2)" in table and r"L[q\*]" in table
    assert all(line.count(" | ") - line.count(r"\| ") >= 3 for line in table.splitlines()[2:])


def test_config_reference_command_prints_and_updates(tmp_path, capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n")
    assert main(["config-reference", "--update", str(readme)]) == 0
    assert readme.read_text() == f"# title\n\n{BEGIN}\n{reference_markdown()}{END}\n\nafter\n"
    assert update_file(readme) is False  # already current: not rewritten
    readme.write_text("# no markers\n")
    assert main(["config-reference", "--update", str(readme)]) == 2
    assert "has no config-reference block" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no config-reference block"):
        reference_block(f"{END}\n{BEGIN}\n")
