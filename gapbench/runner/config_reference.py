"""The config-key reference: a Markdown table made from the config models themselves.

Each row is one key of :class:`gapbench.runner.config.ExperimentConfig` (top-level keys first, then
each section in the order of the model): its section, name, default and the field's
``description``. The default column shows the field's default, or its ``shown_default``
(``json_schema_extra``) where the default depends on other keys. README.md holds the table between
:data:`BEGIN` and :data:`END`; ``gapbench config-reference --update README.md`` rewrites it there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gapbench import io
from gapbench.errors import ConfigError
from gapbench.runner.config import ExperimentConfig

BEGIN = "<!-- config-reference: made by `gapbench config-reference`; edit the descriptions in gapbench/runner/config.py -->"
END = "<!-- /config-reference -->"
REGENERATE = "gapbench config-reference --update README.md"


def _escape(text: str) -> str:
    """``text`` for a cell of a Markdown table: ``|`` escaped everywhere, ``*`` outside code spans."""
    parts = text.split("`")
    return "`".join(part.replace("|", "\\|") if i % 2 else part.replace("|", "\\|").replace("*", "\\*")
                    for i, part in enumerate(parts))


def _value(value: Any) -> str:
    """A default as it is written in a TOML file."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float) and 0 < abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")  # 1.000000e-03
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 1e-3
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def default_text(field: FieldInfo) -> str:
    """The default column of ``field``: its ``shown_default``, "required", or its default value."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    if field.is_required():
        return "required"
    return _value(field.get_default(call_default_factory=True))


def _sections() -> Iterator[tuple[str, dict[str, FieldInfo]]]:
    """("(top)", the top-level keys), then (name, keys) of each section, in the model's order."""
    fields = ExperimentConfig.model_fields
    sections = {name: f.annotation for name, f in fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    yield "(top)", {name: f for name, f in fields.items() if name not in sections}
    for name, model in sections.items():
        yield name, model.model_fields


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(section, key, default, meaning) of every config key; ``meaning`` is the field's description."""
    rows = []
    for section, fields in _sections():
        for key, field in fields.items():
            if not field.description:
                raise ConfigError(f"config key {section}.{key} has no description; give its Field a "
                                  "description=... in gapbench/runner/config.py")
            rows.append((section, key, default_text(field), field.description))
    return rows


def reference_markdown() -> str:
    """The Markdown table of every config key (the section named on its first row only)."""
    lines = ["| section | key | default | meaning |", "|---|---|---|---|"]
    previous = None
    for section, key, default, meaning in reference_rows():
        shown = "" if section == previous else (section if section == "(top)" else f"`{section}`")
        previous = section
        lines.append(f"| {shown} | `{key}` | {_escape(default)} | {_escape(meaning)} |".replace("|  |", "| |", 1))
    return "\n".join(lines) + "\n"


def reference_block(text: str, *, where: str = "README.md") -> tuple[int, int]:
    """(start, end): the span of ``text`` between the :data:`BEGIN` and :data:`END` lines (the table);
    ConfigError naming ``where`` if the markers are missing or out of order."""
    begin, end = text.find(BEGIN + "\n"), text.find(END)
    if begin < 0 or end < begin:
        raise ConfigError(f"{where} has no config-reference block; put the lines\n{BEGIN}\n{END}\nwhere the "
                          "table belongs, then run " + REGENERATE.replace("README.md", where))
    return begin + len(BEGIN) + 1, end


def update_file(path: str | Path) -> bool:
    """Rewrite the table between the markers of ``path`` with :func:`reference_markdown`; True if it
    changed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}; give the path of README.md") from None
    start, end = reference_block(text, where=str(path))
    updated = text[:start] + reference_markdown() + text[end:]
    if updated == text:
        return False
    io.write_text(path, updated)
    return True


__all__ = ["BEGIN", "END", "REGENERATE", "default_text", "reference_block", "reference_markdown", "reference_rows",
           "update_file"]
