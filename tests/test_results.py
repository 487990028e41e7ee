"""The committed results: every figure is made by a command in results/README.md, and every number in
a committed gap table is the one in the committed summary.json it came from."""

import json
from pathlib import Path

import pandas as pd
import pytest

from gapbench.report.tables import format_mean_stderr, local_bound

RESULTS = Path(__file__).resolve().parents[1] / "results"
TABLES = sorted(RESULTS.glob("**/gap_table.csv"))


@pytest.mark.parametrize("figure", sorted(p.relative_to(RESULTS) for p in RESULTS.glob("**/*.png")), ids=str)
def test_every_committed_figure_has_its_command_in_results_readme(figure):
    readme = (RESULTS / "README.md").read_text()
    assert str(figure) in readme or str(figure.with_suffix("")) in readme, f"{figure} is not in results/README.md"


def _value(summary: dict, quantity: str) -> dict:
    if quantity.startswith("elbo_q_star_"):
        return local_bound(summary, quantity.removeprefix("elbo_q_star_"))
    block = "gaps" if quantity in summary["gaps"] else "bounds"
    return summary[block][quantity]


@pytest.mark.parametrize("table", TABLES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_tables_hold_the_committed_summaries_numbers(table):
    """gap_table.csv sits beside summaries/<run name>.json, copied from the run folders."""
    rows = pd.read_csv(table)
    summaries = {p.stem: json.loads(p.read_text()) for p in (table.parent / "summaries").glob("*.json")}
    assert set(rows["run"]) <= set(summaries), f"{table}: summaries missing for {set(rows['run']) - set(summaries)}"
    for row in rows.itertuples():
        entry = _value(summaries[row.run], row.quantity)
        assert row.mean == entry["mean"] and row.stderr == entry["stderr"], (row.run, row.quantity)
    markdown = (table.parent / "gap_table.md").read_text()
    for row in rows.itertuples():
        # to the precision the standard error warrants (the report's formatter), or to 2 decimals (the
        # format of tables committed before that formatter)
        shown = " ± ".join(format_mean_stderr(row.mean, row.stderr))
        assert shown in markdown or f"{row.mean:.2f} ± {row.stderr:.2f}" in markdown, (row.run, row.quantity)
