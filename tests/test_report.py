"""gapbench report: published tables, the side-by-side comparison, and the figures, on small saved runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gapbench.cli import main
from gapbench.report.figures.common import family_gaps, read_datapoints
from gapbench.report.published import PublishedError, gap_consistency, load_published
from gapbench.report.tables import format_mean_stderr

from test_cli import DIGITS, QUICK

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "results" / "published" / "cremer2018_table2.json"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    both = [*QUICK, "--set", "model.flow_hidden=8", "--set", 'refine.families=["ffg", "flow"]', "--quiet"]
    assert main(["run", str(DIGITS), "--out", str(root / "ffg"), *both]) == 0
    assert main(["run", str(DIGITS), "--out", str(root / "flow"), *both, "--set", 'model.posterior="flow"']) == 0
    return root / "ffg", root / "flow"


def test_the_committed_published_table_names_its_source_and_is_self_consistent():
    table = load_published(PAPER)
    assert table["source"]["table"].startswith("Table 2") and "Cremer" in table["source"]["authors"]
    assert table["verified"] is False  # nobody here has checked it against the PDF
    assert set(table["transcriptions"]) == {"A", "B"}
    for entry in table["transcriptions"].values():
        assert entry["verified"] is False and entry["provenance"]
        assert set(entry["tables"]) == {"mnist", "fashion-mnist"}
    assert gap_consistency(table) == []  # every gap is the difference of its bounds, to rounding


def test_the_two_transcriptions_differ_exactly_in_the_rows_issue_14_names():
    """A and B agree on log p(x) and both L[q*] rows; they differ in L[q] (and the gaps made from it) of
    Fashion-MNIST FFG and flow and of MNIST flow."""
    a, b = (load_published(PAPER)["transcriptions"][name]["tables"] for name in ("A", "B"))
    differ = {(d, f, q) for d in a for f in a[d] for q in a[d][f] if a[d][f][q] != b[d][f][q]}
    assert differ == {(d, f, q) for d, f in [("fashion-mnist", "ffg"), ("fashion-mnist", "flow"), ("mnist", "flow")]
                      for q in ("elbo_q", "amortization", "inference")}
    assert b["fashion-mnist"]["ffg"]["elbo_q"] == -104.75 and a["fashion-mnist"]["ffg"]["elbo_q"] == -101.60


def test_one_transcription_can_be_chosen_and_an_unknown_one_is_refused():
    table = load_published(PAPER, transcription="B")
    assert list(table["transcriptions"]) == ["B"]
    with pytest.raises(PublishedError, match="has no transcription 'C'; it has A, B"):
        load_published(PAPER, transcription="C")


def test_gap_consistency_catches_a_mistyped_number():
    table = load_published(PAPER)
    table["transcriptions"]["B"]["tables"]["mnist"]["ffg"]["amortization"] = 1.43
    assert gap_consistency(table) == ["B: mnist/ffg: amortization 1.43 but elbo_q_star_ffg - elbo_q = 1.34"]


def _published(tmp_path, tables) -> Path:
    path = tmp_path / "paper.json"
    path.write_text(json.dumps({"format": "gapbench-published", "format_version": 1,
                                "source": {"authors": "A. Author", "title": "A test table", "table": "Table 9"},
                                "tables": tables}))
    return path


def test_report_puts_ours_beside_the_published_numbers(two_runs, tmp_path, capsys):
    ffg_run, flow_run = two_runs
    paper = _published(tmp_path, {"digits": {"ffg": {"log_px": -30.0, "amortization": 1.5},
                                             "flow": {"elbo_q": -33.25}}})
    out = tmp_path / "report"
    assert main(["report", str(ffg_run), str(flow_run), "--compare", str(paper), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summaries = [json.loads((run / "summary.json").read_text()) for run in two_runs]
    assert "A. Author" in printed and "Table 9" in printed
    rows = pd.read_csv(out / "comparison.csv")
    row = rows[(rows.quantity == "log_px") & (rows.encoder_family == "ffg")].iloc[0]
    assert row.published == -30.0 and row.difference == pytest.approx(summaries[0]["bounds"]["log_px"]["mean"] + 30.0)
    row = rows[(rows.quantity == "elbo_q") & (rows.encoder_family == "flow")].iloc[0]
    assert row["mean"] == summaries[1]["bounds"]["elbo_q"]["mean"]  # full precision
    assert row.difference == pytest.approx(summaries[1]["bounds"]["elbo_q"]["mean"] + 33.25)
    assert rows[rows.quantity == "inference"].published.isna().all()  # the paper has no such number
    markdown = (out / "comparison.md").read_text()
    amortization = summaries[0]["gaps"]["amortization"]["mean"]
    shown = format_mean_stderr(amortization, summaries[0]["gaps"]["amortization"]["stderr"])[0]
    assert f"| {shown} ± " in markdown and f"| 1.50 | {amortization - 1.5:+.2f} |" in markdown
    for name in ("gap_table.md", "gap_table.csv", "gap_table.tex", "gap_bars.png", "gap_bars.pdf",
                 "gap_distributions.png", "gap_distributions.pdf", "gap_scatter.png", "gap_scatter.pdf"):
        assert (out / name).stat().st_size > 1000 or name.endswith((".md", ".csv", ".tex")), name
    assert (out / "gap_bars.png").read_bytes()[:4] == b"\x89PNG" and (out / "gap_bars.pdf").read_bytes()[:4] == b"%PDF"


def test_where_transcriptions_disagree_the_comparison_shows_each_by_name(two_runs, tmp_path, capsys):
    ffg_run, flow_run = two_runs
    path = tmp_path / "two.json"
    column = {"log_px": -30.0, "elbo_q": -31.0}
    path.write_text(json.dumps({
        "format": "gapbench-published", "format_version": 2, "verified": False,
        "source": {"authors": "A. Author", "title": "A test table", "table": "Table 9"},
        "transcriptions": {
            "first": {"provenance": "typed in", "verified": False, "tables": {"digits": {"ffg": column}}},
            "second": {"provenance": "remembered", "verified": True,
                       "tables": {"digits": {"ffg": {**column, "elbo_q": -32.5}}}}}}))
    out = tmp_path / "report"
    assert main(["report", str(ffg_run), str(flow_run), "--compare", str(path), "--out", str(out),
                 "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "NOT verified against the paper: first" in printed and "remembered" in printed
    elbo_q = json.loads((ffg_run / "summary.json").read_text())["bounds"]["elbo_q"]["mean"]
    assert f"| first -31.00 / second -32.50 | first {elbo_q + 31:+.2f} / second {elbo_q + 32.5:+.2f} |" in printed
    rows = pd.read_csv(out / "comparison.csv")
    row = rows[(rows.quantity == "elbo_q") & (rows.encoder_family == "ffg")].iloc[0]
    assert np.isnan(row.published) and not row.transcriptions_agree  # no single "paper" number
    assert row.published_second == -32.5 and row.difference_first == pytest.approx(elbo_q + 31.0)
    row = rows[(rows.quantity == "log_px") & (rows.encoder_family == "ffg")].iloc[0]
    assert row.published == -30.0 and row.transcriptions_agree
    assert "transcriptions first, second" in (out / "comparison.md").read_text()
    # one of them only
    assert main(["report", str(ffg_run), "--compare", str(path), "--transcription", "second", "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "first" not in printed and f"| -32.50 | {elbo_q + 32.5:+.2f} |" in printed


def test_figure_numbers_are_the_summarys(two_runs):
    """The bars of the encoder's own family are the summary's gaps."""
    for run in two_runs:
        summary = json.loads((run / "summary.json").read_text())
        own = summary["settings"]["encoder_family"]
        gaps = family_gaps(read_datapoints(run))
        for gap in ("approximation", "amortization"):
            values = gaps[(gaps.family == own) & (gaps.gap == gap)]["value"]
            assert np.isclose(values.mean(), summary["gaps"][gap]["mean"], rtol=0, atol=1e-9), (run, gap)


def test_report_against_a_table_for_another_dataset_exits_2(two_runs, capsys):
    assert main(["report", *map(str, two_runs), "--compare", str(PAPER), "--no-figures"]) == 2
    assert "has no numbers for these runs (datasets digits" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "cannot be read as JSON"),
    ('{"format": "other"}', "is not a gapbench published table"),
    ('{"format": "gapbench-published", "tables": {"digits": {}}}', "does not name its source"),
    ('{"format": "gapbench-published", "format_version": 7}', "has format_version 7, which this gapbench does not read"),
    ('{"format": "gapbench-published", "format_version": 2, "source": {"authors": "a", "title": "t", "table": "1"}, '
     '"transcriptions": {"A": {"tables": {"digits": {"ffg": {"log_px": -90}}}}}}', "must give its provenance"),
    ('{"format": "gapbench-published", "source": {"authors": "a", "title": "t", "table": "1"}, '
     '"tables": {"digits": {"ffg": {"log_px": "-90"}}}}', "must map quantities to numbers (not numbers: log_px)"),
])
def test_bad_published_tables_are_refused(tmp_path, content, message):
    path = tmp_path / "paper.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PublishedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_published(path)


def test_report_of_an_unfinished_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no summary.json" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path):
    from gapbench.runner.config import load_config

    config = load_config(path)
    assert config.name == path.stem  # the default output folder runs/<name> matches the file
