"""Published numbers and our runs side by side.

A published table is a JSON file (``results/published/*.json``) that names its source (authors,
title, venue, table), its units and settings, whether it was verified against the paper, and holds one
or more *transcriptions* of the table, each with its provenance and ``tables[dataset][encoder_family]
[quantity]`` in nats, quantities named as in ``summary.json``: ``log_px``, ``elbo_q_star_<family>``,
``elbo_q``, ``approximation``, ``amortization``, ``inference``. (``format_version`` 1 files hold a
single ``tables`` block: one transcription.) A run is matched to a published column by its dataset
(``summary.json`` settings) and its encoder's family; the difference is ours minus published. Where
the transcriptions disagree, every one is shown, so that no unverified number passes for the paper's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from gapbench.errors import GapbenchError
from gapbench.report.tables import format_mean_stderr, table_grid

PUBLISHED_FORMAT = "gapbench-published"
PUBLISHED_VERSIONS = (1, 2)
SINGLE = "as given"  # the name of a format_version 1 file's one transcription
GAP_NAMES = {"approximation": ("log_px", "elbo_q_star_{family}"), "amortization": ("elbo_q_star_{family}", "elbo_q"),
             "inference": ("log_px", "elbo_q")}


class PublishedError(GapbenchError, ValueError):
    """A published table that cannot be used; the message names the problem and the fix."""


def _check_tables(tables: object, where: str, fix: str) -> None:
    if not isinstance(tables, dict) or not tables:
        raise PublishedError(f"{where} holds no tables; {fix}")
    for dataset, columns in tables.items():
        for family, values in (columns or {}).items():
            bad = [k for k, v in (values or {}).items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if not isinstance(values, dict) or bad:
                raise PublishedError(f"{where}: tables.{dataset}.{family} must map quantities to numbers "
                                     f"(not numbers: {', '.join(bad) or 'the whole entry'}); {fix}")


def load_published(path: str | Path, *, transcription: str | None = None) -> dict:
    """Read and check a published table (see the module docstring).

    Returns the file's dict with ``transcriptions`` always present (``{name: {"provenance",
    "verified", "tables"}}``); ``transcription`` keeps only the one of that name.
    """
    path = Path(path)
    fix = "see results/published/cremer2018_table2.json for the expected form"
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishedError(f"the published table {path} does not exist; pass a file such as "
                             "results/published/cremer2018_table2.json") from None
    except (OSError, ValueError) as error:
        raise PublishedError(f"{path} cannot be read as JSON ({error}); {fix}") from None
    if not isinstance(table, dict) or table.get("format") != PUBLISHED_FORMAT:
        raise PublishedError(f"{path} is not a gapbench published table (no 'format': '{PUBLISHED_FORMAT}'); {fix}")
    version = table.get("format_version", 1)
    if version not in PUBLISHED_VERSIONS:
        raise PublishedError(f"{path} has format_version {version!r}, which this gapbench does not read "
                             f"(it reads {', '.join(map(str, PUBLISHED_VERSIONS))}); {fix}")
    source = table.get("source")
    if not isinstance(source, dict) or not {"authors", "title", "table"} <= set(source):
        raise PublishedError(f"{path} does not name its source (source.authors, .title, .table); {fix}")
    if version == 1:
        _check_tables(table.get("tables"), str(path), fix)
        table["transcriptions"] = {SINGLE: {"provenance": table.get("transcription", ""),
                                            "verified": bool(table.get("verified", False)),
                                            "tables": table["tables"]}}
    transcriptions = table.get("transcriptions")
    if not isinstance(transcriptions, dict) or not transcriptions:
        raise PublishedError(f"{path} holds no transcriptions; {fix}")
    for name, entry in transcriptions.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("provenance"), str) \
                or not isinstance(entry.get("verified"), bool):
            raise PublishedError(f"{path}: transcription {name!r} must give its provenance (text) and whether it "
                                 f"was verified against the paper (true/false); {fix}")
        _check_tables(entry.get("tables"), f"{path}, transcription {name!r}", fix)
    if transcription is not None:
        if transcription not in transcriptions:
            raise PublishedError(f"{path} has no transcription {transcription!r}; it has "
                                 f"{', '.join(transcriptions)}")
        table["transcriptions"] = {transcription: transcriptions[transcription]}
    return table


def gap_consistency(table: dict, *, tolerance: float = 0.015) -> list[str]:
    """Published gaps that are not the difference of their bounds (beyond rounding), in every
    transcription: a transcription check. Returns one line per inconsistency (empty when all agree)."""
    problems = []
    many = len(table["transcriptions"]) > 1
    for name, entry in table["transcriptions"].items():
        for dataset, columns in entry["tables"].items():
            for family, values in columns.items():
                for gap, (upper, lower) in GAP_NAMES.items():
                    keys = (upper.format(family=family), lower.format(family=family))
                    if gap in values and all(k in values for k in keys):
                        implied = values[keys[0]] - values[keys[1]]
                        if abs(implied - values[gap]) > tolerance:
                            where = f"{name}: " if many else ""
                            problems.append(f"{where}{dataset}/{family}: {gap} {values[gap]} but "
                                            f"{keys[0]} - {keys[1]} = {implied:.2f}")
    return problems


def source_line(table: dict) -> str:
    s = table["source"]
    return f"{s['authors']}, \"{s['title']}\"{', ' + s['venue'] if s.get('venue') else ''}, {s['table']}"


def transcription_lines(table: dict) -> list[str]:
    """One line per transcription: its name, whether it was verified against the paper, its provenance."""
    return [f"transcription {name} ({'verified' if entry['verified'] else 'NOT verified against the paper'}): "
            f"{entry['provenance']}" for name, entry in table["transcriptions"].items()]


def run_dataset(summary: dict) -> str:
    return summary.get("settings", {}).get("dataset") or summary.get("data", {}).get("name", "")


def datasets_of(table: dict) -> list[str]:
    return sorted({d for entry in table["transcriptions"].values() for d in entry["tables"]})


def comparison_rows(rows: list[dict], summaries: list[dict], table: dict) -> list[dict]:
    """``rows`` of :func:`gapbench.report.tables.cross_family_rows` with the published value of each and
    the difference, ours minus published: ``published`` / ``difference`` where every transcription
    that has the number agrees (None where none has it or they disagree), and with several
    transcriptions ``published_<name>`` / ``difference_<name>`` for each."""
    datasets = {summary.get("settings", {}).get("name", ""): run_dataset(summary) for summary in summaries}
    names = list(table["transcriptions"])
    out = []
    for row in rows:
        dataset = datasets.get(row["run"], "")
        values = {name: table["transcriptions"][name]["tables"].get(dataset, {}).get(row["encoder_family"], {})
                  .get(row["quantity"]) for name in names}
        known = {v for v in values.values() if v is not None}

        def difference(value: float | None) -> float | None:
            return row["mean"] - value if value is not None and math.isfinite(row["mean"]) else None
        common = known.pop() if len(known) == 1 else None
        entry = {**row, "dataset": dataset, "published": common, "difference": difference(common)}
        if len(names) > 1:
            for name in names:
                entry[f"published_{name}"] = values[name]
                entry[f"difference_{name}"] = difference(values[name])
        entry["transcriptions_agree"] = len({v for v in values.values() if v is not None}) <= 1
        out.append(entry)
    return out


def has_published(row: dict) -> bool:
    return row["published"] is not None or not row["transcriptions_agree"]


def comparison_markdown(rows: list[dict], *, digits: int = 2) -> str:
    """Quantities down; for each model: ours (mean ± standard error), published, difference. Where the
    transcriptions disagree, the published and difference cells give each one's number by name."""
    quantities, models, cell = table_grid(rows)
    header = ["", *[part for m in models for part in (f"{m} ours", f"{m} paper", "difference")]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (3 * len(models))]

    def number(value: float | None, sign: str = "") -> str:
        return "—" if value is None or not math.isfinite(value) else f"{value:{sign}.{digits}f}"

    def each(r: dict, key: str, sign: str = "") -> str:
        names = [k[len(key) + 1:] for k in r if k.startswith(f"{key}_")]
        return " / ".join(f"{name} {number(r[f'{key}_{name}'], sign)}" for name in names)

    for q in quantities:
        cells = []
        for m in models:
            r = cell[q, m]
            ours = "—" if not math.isfinite(r["mean"]) else " ± ".join(format_mean_stderr(r["mean"], r["stderr"]))
            if r["transcriptions_agree"]:
                cells += [ours, number(r["published"]), number(r["difference"], "+")]
            else:
                cells += [ours, each(r, "published"), each(r, "difference", "+")]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
