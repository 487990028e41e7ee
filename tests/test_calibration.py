"""AIS calibration (gapbench.calibration): the BDMC sandwich of a run's AIS settings, its config keys
and its line under the gap table."""

import json

import numpy as np
import pytest
import torch

from gapbench.calibration import calibrate_ais, calibration_lines
from gapbench.cli import main
from gapbench.runner.config import parse_config
from gapbench.estimators import AISProcedure, simulate
from gapbench.runner.rundir import STAGES, section_hash

from conftest import make_linear_gaussian
from test_cli import DIGITS, QUICK

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_sandwiches_exact_log_px_on_simulated_data():
    model, _ = make_linear_gaussian(data_size=8, latent_size=2, num_datapoints=2, seed=1)
    procedure = AISProcedure(num_chains=4, num_steps=30)
    result = calibrate_ais(model, None, num_datapoints=24, procedure=procedure, init="prior",
                           dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x, _ = simulate(model, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # the same draws
    exact = model.log_marginal(x).mean().item()
    slack = 3 * result["width_stderr"] + 0.02
    assert result["mean_lower"] <= exact + slack and result["mean_upper"] >= exact - slack, (result, exact)
    assert result["mean_width"] == pytest.approx(result["mean_upper"] - result["mean_lower"])
    assert result["is_within_tolerance"] == (result["mean_width"] <= 0.2)
    strict = calibrate_ais(model, None, num_datapoints=24, procedure=procedure, init="prior", tolerance=1e-6,
                           dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert not strict["is_within_tolerance"] and calibration_lines(strict)[-1].startswith("WARNING")
    assert len(calibration_lines(result)) == 1 + (not result["is_within_tolerance"])


def test_calibration_keys_at_their_defaults_leave_every_stage_hash_unchanged():
    """Folders written before ais.calibration_* existed keep every finished stage; enabling calibration
    redoes the calibration and report stages only (AIS itself does not use the keys)."""
    resolved = parse_config({"name": "x"}).model_dump(mode="json")
    older = json.loads(json.dumps(resolved))
    for key in ("calibration_datapoints", "calibration_tolerance"):
        del older["ais"][key]
    assert all(section_hash(resolved, s) == section_hash(older, s) for s in STAGES)
    enabled = parse_config({"name": "x", "ais": {"calibration_datapoints": 32}}).model_dump(mode="json")
    changed = [s for s in STAGES if section_hash(enabled, s) != section_hash(resolved, s)]
    assert changed == ["calibration", "report"]


def test_a_run_records_the_calibration_and_warns_under_the_table(tmp_path, capsys):
    out = tmp_path / "calibrated"
    command = ["run", str(DIGITS), "--out", str(out), *QUICK, "--set", "ais.calibration_datapoints=6",
               "--set", "ais.calibration_tolerance=0.0001"]
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    calibration = summary["ais_calibration"]
    assert calibration["num_datapoints"] == 6 and calibration["num_steps"] == 20 and calibration["num_chains"] == 4
    assert np.isfinite(calibration["mean_width"]) and calibration["tolerance"] == 0.0001
    assert not calibration["is_within_tolerance"]
    table = (out / "table.md").read_text()
    assert "AIS calibration: BDMC on 6 datapoints" in table and "WARNING: the AIS sandwich is wider" in table
    assert json.loads((out / "ais_calibration.json").read_text()) == calibration
    capsys.readouterr()
    assert main(command) == 0  # the same command again: every stage, the calibration too, read back
    err = capsys.readouterr().err
    assert "[calibration] skipped: finished" in err and "[report] skipped: finished" in err
    assert json.loads((out / "summary.json").read_text())["ais_calibration"] == calibration


def test_a_flow_encoders_run_is_calibrated_from_its_fitted_gaussian(tmp_path):
    """A flow encoder's q(z|x) has no tractable log-density (the auxiliary flow); the calibration starts its
    chains, as the run's AIS does, from the diagonal Gaussian fitted to q's samples (it raised TypeError)."""
    out = tmp_path / "flow"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", 'model.posterior="flow"',
                 "--set", "model.flow_hidden=8", "--set", 'refine.families=["ffg", "flow"]',
                 "--set", "ais.calibration_datapoints=4"]) == 0
    calibration = json.loads((out / "ais_calibration.json").read_text())
    assert calibration["init"] == "encoder" and np.isfinite(calibration["mean_width"])
