"""``gapbench report``: the cross-family table of finished runs, optionally beside a published table,
and their figures, written as Markdown, CSV, LaTeX, PNG and PDF."""

from __future__ import annotations

import json
from pathlib import Path

from gapbench import io
from gapbench.errors import GapbenchError
from gapbench.outputs import summary_problem
from gapbench.report.published import (PublishedError, comparison_csv, comparison_markdown, comparison_rows,
    datasets_of, gap_consistency, has_published, load_published, source_line, transcription_lines)
from gapbench.report.tables import (column_labels, cross_family_csv, cross_family_latex, cross_family_markdown,
    cross_family_rows)

NOTE = "(mean ± standard error over datapoints, nats; gaps use each model's encoder family)"


class ReportError(GapbenchError, ValueError):
    """Runs that cannot be reported; the message names the problem and the fix."""


def read_summaries(run_dirs: list[str | Path]) -> list[dict]:
    summaries = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise ReportError(f"{run_dir} has no summary.json; finish the run first (gapbench run ... --out {run_dir})")
        problem = summary_problem(path)
        if problem is not None:
            raise ReportError(f"{path} cannot be used: {problem}; rerun the run's command to redo its report stage")
        summaries.append(json.loads(path.read_text()))
    return summaries


def pairing_note(summaries: list[dict]) -> str:
    hashes = {s.get("settings", {}).get("evaluation_data_sha256") for s in summaries}
    return "" if len(hashes) == 1 else (
        "\nnote: the runs were evaluated on different datapoints (evaluation_data_sha256 differs); "
        "their columns are not paired.\n")


def provenance_note(table: dict) -> str:
    """Which transcriptions of the published table the comparison uses, and whether each was verified."""
    names = list(table["transcriptions"])
    unverified = [n for n in names if not table["transcriptions"][n]["verified"]]
    head = (f"transcription{'s' if len(names) > 1 else ''} {', '.join(names)}"
            + (" (where they differ, each is shown by name)" if len(names) > 1 else ""))
    warning = (f"; NOT verified against the paper: {', '.join(unverified)}" if unverified else "")
    return head + warning + ".\n" + "\n".join(f"- {line}" for line in transcription_lines(table))


def make_report(run_dirs: list[str | Path], out: str | Path | None, *, compare: str | Path | None = None,
                transcription: str | None = None, figures: bool = True) -> tuple[str, list[Path]]:
    """The report's text (printed by the CLI) and the files written under ``out`` (none without it).

    ``compare``: a published table; ``transcription``: compare with that one of its transcriptions only
    (default: all, with every one's number where they disagree)."""
    summaries = read_summaries(run_dirs)
    table = load_published(compare, transcription=transcription) if compare is not None else None
    rows = cross_family_rows(summaries)
    note = pairing_note(summaries)
    text = cross_family_markdown(rows) + "\n" + NOTE + note
    comparison = None
    if table is not None:
        comparison = comparison_rows(rows, summaries, table)
        if not any(has_published(r) for r in comparison):
            datasets = sorted({r["dataset"] for r in comparison})
            raise PublishedError(f"{compare} has no numbers for these runs (datasets {', '.join(datasets)}; it has "
                                 f"{', '.join(datasets_of(table))}); compare with a table for the same dataset")
        text += ("\n\nBeside " + source_line(table) + " (difference: ours − paper), "
                 + provenance_note(table) + "\n\n" + comparison_markdown(comparison))
        for problem in gap_consistency(table):
            text += f"\nwarning: published table not self-consistent: {problem}"
    written: list[Path] = []
    if out is None:
        return text, written
    out = Path(out)
    try:
        for name, content in (("gap_table.md", cross_family_markdown(rows) + note), ("gap_table.csv", cross_family_csv(rows)),
                              ("gap_table.tex", cross_family_latex(rows))):
            io.write_text(out / name, content)
            written.append(out / name)
        if comparison is not None:
            io.write_text(out / "comparison.md", comparison_markdown(comparison) + "\n" + provenance_note(table) + "\n")
            io.write_text(out / "comparison.csv", comparison_csv(comparison))
            written += [out / "comparison.md", out / "comparison.csv"]
        if figures:
            from gapbench.report.figures.common import read_datapoints, run_figures

            frames = [read_datapoints(run_dir) for run_dir in run_dirs]
            written += run_figures(frames, summaries, column_labels(summaries), out)
    except OSError as error:
        raise ReportError(f"cannot write to {out}: {error.strerror}; choose a writable --out") from None
    return text, written
