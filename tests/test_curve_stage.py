"""The curve stage of `gapbench run`, its figure, semi-amortized runs, and run folders from before
the curve and semi-amortized keys existed."""

import json
import re
import shlex
import shutil

import pandas as pd
import pytest
import torch
from test_cli import DIGITS, QUICK

from gapbench.cli import main
from gapbench.runner.rundir import section_hash



def figure_main(args: list[str]) -> int:
    """gapbench figure curve ARGS."""
    return main(["figure", "curve", *args])


CURVE = ["--set", "curve.enabled=true", "--set", "curve.steps=[0,1,3,10]", "--set", "curve.eval_samples=50"]

pytestmark = pytest.mark.slow  # trains a model end to end (module fixtures)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def curve_run(plain_run, tmp_path_factory):
    """The plain run with the curve switched on afterwards: only the curve and report stages run."""
    out = tmp_path_factory.mktemp("curve") / "run"
    shutil.copytree(plain_run, out)
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, *CURVE]) == 2  # a config change: refused
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, *CURVE, "--force"]) == 0
    return out


def test_switching_the_curve_on_runs_only_the_curve_and_report(plain_run, curve_run):
    before = json.loads((plain_run / "stages.json").read_text())
    after = json.loads((curve_run / "stages.json").read_text())
    for stage in ("train", "amortized", "local", "ais"):
        assert after[stage] == before[stage], stage
    assert set(after) == set(before) | {"curve"}
    # everything but the curve is the plain run's
    plain, curved = (json.loads((run / "summary.json").read_text()) for run in (plain_run, curve_run))
    assert curved["bounds"] == plain["bounds"] and curved["gaps"] == plain["gaps"]
    assert "curve" not in plain and "curve" not in plain["settings"]


def test_curve_csv_and_summary(curve_run):
    frame = pd.read_csv(curve_run / "curve.csv")
    assert list(frame.columns) == ["datapoint", "step", "elbo", "stderr", "gain", "gain_stderr", "diverged",
                                   "gap_closed"]
    assert len(frame) == 24 * 4 and sorted(frame["step"].unique()) == [0, 1, 3, 10]
    local = pd.read_csv(curve_run / "local.csv")
    start = frame[frame["step"] == 0].set_index("datapoint")["elbo"]
    last = frame[frame["step"] == 10].set_index("datapoint")
    expected = (last["elbo"] - start) / (local["elbo_q_star_ffg"] - start)
    pd.testing.assert_series_equal(last["gap_closed"], expected, check_names=False)
    summary = json.loads((curve_run / "summary.json").read_text())
    curve = summary["curve"]
    assert curve["steps"] == [0, 1, 3, 10] and curve["num_datapoints"] == 24
    assert curve["fraction_closed"][0] == 0.0 and curve["mean_gain"][0] == 0.0
    assert curve["mean_gain"][-1] > 0  # ten steps from the encoder's output gain
    assert curve["mean_elbo_q_star"] == pytest.approx(summary["bounds"]["elbo_q_star"]["mean"])
    assert summary["settings"]["curve"] == {"enabled": True, "steps": [0, 1, 3, 10], "num_samples": 10,
                                            "learning_rate": 0.05, "gradient": "stl", "eval_samples": 50}


def test_curve_figure(curve_run, plain_run, tmp_path, capsys):
    out = tmp_path / "figures" / "curve.png"
    assert figure_main([str(curve_run), str(curve_run), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.with_suffix(".pdf").stat().st_size > 1000
    assert figure_main([str(plain_run), "--out", str(out)]) == 2
    assert "curve.enabled=true" in capsys.readouterr().err


def test_the_hint_for_a_missing_curve_works(plain_run, tmp_path, capsys):
    """The command the curve figure suggests for a run without a curve adds the curve stage and keeps the rest."""
    run = tmp_path / "plain"
    shutil.copytree(plain_run, run)
    assert figure_main([str(run), "--out", str(tmp_path / "c.png")]) == 2
    command = re.search(r"`gapbench (run .*?)`", capsys.readouterr().err).group(1)
    assert main([*shlex.split(command), "--quiet", "--set", "curve.steps=[0,1,3]", "--set", "curve.eval_samples=20"]) == 0
    err = capsys.readouterr().err
    assert "[train] skipped" in err and "[local] skipped" in err and (run / "curve.csv").is_file()
    assert figure_main([str(run), "--out", str(tmp_path / "c.png")]) == 0


def test_bad_curve_config_is_refused(tmp_path, capsys):
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "x"), *QUICK, "--set", "curve.steps=[0,5,5]"]) == 2
    assert "curve.steps must list distinct step counts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_folder_from_before_the_new_keys_keeps_every_stage(plain_run, tmp_path, capsys):
    """config.json and checkpoint.pt without [curve] and train.semi_amortized_* (as an older gapbench
    wrote them; their stage hashes were made without those keys): the run resumes with every stage
    skipped and the same summary."""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    config = json.loads((run / "config.json").read_text())
    del config["curve"]
    config["train"] = {k: v for k, v in config["train"].items() if not k.startswith("semi_amortized_")}
    (run / "config.json").write_text(json.dumps(config))
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["config"] = config
    torch.save(checkpoint, run / "checkpoint.pt")
    records = json.loads((run / "stages.json").read_text())
    assert records["train"]["config_sha256"] == section_hash(config, "train")  # the old form's hash
    for record in records.values():  # older versions recorded no sha256 of the outputs
        record.pop("outputs_sha256")
    (run / "stages.json").write_text(json.dumps(records))
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK]) == 0
    err = capsys.readouterr().err
    for stage in ("train", "amortized", "local", "ais", "report"):
        assert f"[{stage}] skipped" in err, err
    assert (run / "summary.json").read_text() == (plain_run / "summary.json").read_text()


def test_semi_amortized_run_records_its_settings(tmp_path):
    out = tmp_path / "semi"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", "train.semi_amortized_steps=2",
                 "--set", 'train.semi_amortized_gradient="stop"']) == 0
    train = json.loads((out / "summary.json").read_text())["settings"]["train"]
    assert train["semi_amortized_steps"] == 2 and train["semi_amortized_gradient"] == "stop"
    assert train["semi_amortized_lr"] == 0.01 and train["semi_amortized_max_grad_norm"] == 5.0
