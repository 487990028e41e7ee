"""Published numbers and our runs side by side.

A published table is a JSON file (``results/published/*.json``) that names its source (authors,
title, venue, table), how it was transcribed, its units and settings, and holds
``tables[dataset][encoder_family][quantity]`` in nats, with quantities named as in ``summary.json``:
``log_px``, ``elbo_q_star_<family>``, ``elbo_q``, ``approximation``, ``amortization``, ``inference``.
A run is matched to a published column by its dataset (``summary.json`` settings) and its encoder's
family; the difference is ours minus published.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .tables import format_mean_stderr, table_grid

PUBLISHED_FORMAT = "gapbench-published"
GAP_NAMES = {"approximation": ("log_px", "elbo_q_star_{family}"), "amortization": ("elbo_q_star_{family}", "elbo_q"),
             "inference": ("log_px", "elbo_q")}


class PublishedError(ValueError):
    """A published table that cannot be used; the message names the problem and the fix."""


def load_published(path: str | Path) -> dict:
    """Read and check a published table (see the module docstring)."""
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
    source = table.get("source")
    if not isinstance(source, dict) or not {"authors", "title", "table"} <= set(source):
        raise PublishedError(f"{path} does not name its source (source.authors, .title, .table); {fix}")
    tables = table.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise PublishedError(f"{path} holds no tables; {fix}")
    for dataset, columns in tables.items():
        for family, values in (columns or {}).items():
            bad = [k for k, v in (values or {}).items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if not isinstance(values, dict) or bad:
                raise PublishedError(f"{path}: tables.{dataset}.{family} must map quantities to numbers "
                                     f"(not numbers: {', '.join(bad) or 'the whole entry'}); {fix}")
    return table


def gap_consistency(table: dict, *, tolerance: float = 0.015) -> list[str]:
    """Published gaps that are not the difference of their bounds (beyond rounding): a transcription
    check. Returns one line per inconsistency (empty when all agree)."""
    problems = []
    for dataset, columns in table["tables"].items():
        for family, values in columns.items():
            for gap, (upper, lower) in GAP_NAMES.items():
                keys = (upper.format(family=family), lower.format(family=family))
                if gap in values and all(k in values for k in keys):
                    implied = values[keys[0]] - values[keys[1]]
                    if abs(implied - values[gap]) > tolerance:
                        problems.append(f"{dataset}/{family}: {gap} {values[gap]} but {keys[0]} - {keys[1]} = {implied:.2f}")
    return problems


def source_line(table: dict) -> str:
    s = table["source"]
    return f"{s['authors']}, \"{s['title']}\"{', ' + s['venue'] if s.get('venue') else ''}, {s['table']}"


def run_dataset(summary: dict) -> str:
    return summary.get("settings", {}).get("dataset") or summary.get("data", {}).get("name", "")


def comparison_rows(rows: list[dict], summaries: list[dict], table: dict) -> list[dict]:
    """``rows`` of :func:`gapbench.report.tables.cross_family_rows` with the published value of each
    (None where the paper has no such number) and the difference, ours minus published."""
    datasets = {summary.get("settings", {}).get("name", ""): run_dataset(summary) for summary in summaries}
    out = []
    for row in rows:
        dataset = datasets.get(row["run"], "")
        published = table["tables"].get(dataset, {}).get(row["encoder_family"], {}).get(row["quantity"])
        difference = row["mean"] - published if published is not None and math.isfinite(row["mean"]) else None
        out.append({**row, "dataset": dataset, "published": published, "difference": difference})
    return out


def comparison_markdown(rows: list[dict], *, digits: int = 2) -> str:
    """Quantities down; for each model: ours (mean ± standard error), published, difference."""
    quantities, models, cell = table_grid(rows)
    header = ["", *[part for m in models for part in (f"{m} ours", f"{m} paper", "difference")]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (3 * len(models))]

    def number(value: float | None) -> str:
        return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    for q in quantities:
        cells = []
        for m in models:
            r = cell[q, m]
            ours = "—" if not math.isfinite(r["mean"]) else " ± ".join(format_mean_stderr(r["mean"], r["stderr"]))
            diff = r["difference"]
            cells += [ours, number(r["published"]), "—" if diff is None else f"{diff:+.{digits}f}"]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
