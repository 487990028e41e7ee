"""Sweeps: [sweep] expands into runs; gapbench aggregate gives mean and spread over seeds."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_cli import DIGITS, QUICK

from gapbench.cli import main
from gapbench.runner.config import ConfigError
from gapbench.runner.sweep import aggregate, expand, run_folders

SWEEP = DIGITS.read_text() + """
[sweep]
seed = [0, 1]
refine.check_every = [25, 50]
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    return path


def test_expand_gives_the_product_with_labels(sweep_file):
    points = expand(sweep_file, ["train.epochs=2"])
    assert [p.label for p in points] == ["seed=0,refine.check_every=25", "seed=0,refine.check_every=50",
                                         "seed=1,refine.check_every=25", "seed=1,refine.check_every=50"]
    assert [(p.config.seed, p.config.refine.check_every) for p in points] == [(0, 25), (0, 50), (1, 25), (1, 50)]
    assert all(p.config.train.epochs == 2 for p in points)
    assert expand(DIGITS)[0].label == ""  # no [sweep]: one plain run


@pytest.mark.parametrize("table, overrides, message", [
    ("[sweep]\nseed = 3\n", [], "must be a non-empty list"),
    ("[sweep]\nseed = []\n", [], "must be a non-empty list"),
    ("[sweep]\nseed = [1, 1]\n", [], "lists a value twice"),
    ("[sweep]\nrefine.max_step = [1, 2]\n", [], "refine.max_step: unknown key"),
    ("[sweep]\nseed = [-1, 2]\n", [], "seed"),
    ("[sweep]\nseed = [1, 2]\n", ["seed=3"], "--set seed conflicts with \\[sweep\\] seed"),
])
def test_bad_sweeps_are_refused_with_the_key(tmp_path, table, overrides, message, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(DIGITS.read_text() + "\n" + table)
    with pytest.raises(ConfigError, match=message):
        expand(path, overrides)
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["run", str(path), "--out", str(tmp_path / "out"), *args, "--quiet"]) == 2
    assert "gapbench: error:" in capsys.readouterr().err


def test_sweep_runs_and_aggregates_over_seeds(sweep_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["run", str(sweep_file), "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "sweep of 4 runs" in printed
    index = json.loads((out / "sweep.json").read_text())
    assert [r["values"] for r in index["runs"]][1] == {"seed": 0, "refine.check_every": 50}
    folders = run_folders([out])
    assert len(folders) == 4
    table = aggregate(folders).set_index("refine.check_every")
    assert sorted(table.index) == [25, 50] and (table["num_seeds"] == 2).all()
    for steps in (25, 50):
        summaries = [json.loads((out / f"seed={s},refine.check_every={steps}" / "summary.json").read_text())
                     for s in (0, 1)]
        values = np.array([s["gaps"]["amortization"]["mean"] for s in summaries])
        row = table.loc[steps]
        assert row["amortization"] == pytest.approx(values.mean())
        assert row["amortization_sd"] == pytest.approx(values.std(ddof=1))
        assert row["amortization_se"] == pytest.approx(values.std(ddof=1) / math.sqrt(2))
        assert summaries[0]["settings"]["refinement"]["procedures"]["ffg"]["check_every"] == steps
    # the command prints the same table, and writes it as CSV
    assert main(["aggregate", str(out), "--out", str(tmp_path / "agg.csv")]) == 0
    printed = capsys.readouterr().out
    assert "| refine.check_every | seeds |" in printed and printed.count("\n| 25 | 2 |") == 1
    assert len(pd.read_csv(tmp_path / "agg.csv")) == 2
    # a rerun resumes every run (nothing to redo)
    assert main(["run", str(sweep_file), "--out", str(out), *QUICK]) == 0
    assert capsys.readouterr().err.count("[report] skipped") == 4


def test_aggregate_refuses_folders_without_runs(tmp_path, capsys):
    assert main(["aggregate", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
