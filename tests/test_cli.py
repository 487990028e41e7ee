"""The `gapbench run` command end to end on digits, and every bad input it must refuse."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gapbench.cli import main
from gapbench.runner.run import open_run
from gapbench.report.tables import format_mean_stderr

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
QUICK = ["--set", "train.epochs=3", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=24",
         "--set", "eval.num_samples=200", "--set", "refine.max_steps=100", "--set", "ais.num_steps=20",
         "--set", "ais.num_chains=4", "--quiet"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0
    return out


def test_run_writes_every_file(quick_run, capsys):
    for name in ("config.json", "checkpoint.pt", "train_history.csv", "amortized.csv", "local.csv",
                 "local.pt", "ais.csv", "log_px.csv", "datapoints.csv", "summary.json", "table.md", "stages.json"):
        assert (quick_run / name).is_file(), name
    assert not [p for p in quick_run.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((quick_run / "summary.json").read_text())
    for block, keys in (("bounds", ("elbo_q", "elbo_q_star", "log_px")),
                        ("gaps", ("approximation", "amortization", "inference"))):
        for key in keys:
            assert set(summary[block][key]) >= {"mean", "stderr", "mc_stderr"}
    settings = summary["settings"]
    assert settings["split"] == "train" and settings["num_datapoints"] == 24
    assert settings["num_samples"]["iwae_k"] == 200
    assert settings["binarization"]["mode"] == "dynamic"
    assert settings["refinement"]["procedures"]["ffg"]["max_steps"] == 100
    assert settings["refinement"]["init"] == "encoder" and settings["refinement"]["families"] == ["ffg"]
    assert settings["ais"] == {"enabled": True, "num_chains": 4, "num_steps": 20, "schedule": "sigmoid",
                               "init": "encoder", "num_leapfrog": 10, "target_acceptance": 0.65, "step_size": 0.05,
                               "adaptation": "datapoint", "adaptation_rate": 0.1, "min_step_size": 1e-4,
                               "max_step_size": 0.5}  # calibration and health keys at their defaults: left out
    assert "fresh draw" in settings["log_px"] and "iwae_q, iwae_q_star_ffg, ais" in settings["log_px"]
    assert set(summary["other_bounds"]) == {"iwae_q", "iwae_q_star_ffg", "ais"}
    assert set(summary["diagnostics"]) == {"max_pilot_bound"}
    assert set(summary["estimators"]) >= set(summary["bounds"]) | set(summary["other_bounds"]) | {"max_pilot_bound"}
    assert 0 < summary["ais"]["mean_acceptance_rate"] < 1
    assert {"torch", "numpy", "gapbench", "python"} <= set(summary["versions"])
    assert summary["data"]["split"]["sizes"]["train"] == 1197
    # the table holds the numbers of the summary
    table = (quick_run / "table.md").read_text()
    mean, stderr = format_mean_stderr(summary['bounds']['elbo_q']['mean'], summary['bounds']['elbo_q']['stderr'])
    assert f"| L[q] | {mean} | {stderr} |" in table


def test_run_leaves_readable_figures(quick_run, capsys):
    from PIL import Image

    for name in ("gap_bars", "gap_distributions", "gap_scatter"):
        with Image.open(quick_run / "figures" / f"{name}.png") as image:
            image.verify()  # a whole PNG, not a truncated file
            assert image.format == "PNG" and min(image.size) > 300, name
        assert (quick_run / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"


def test_figures_change_no_number_or_stage_hash(quick_run, tmp_path, capsys):
    """--no-figures is not config: the same numbers and stage hashes as quick_run's, and a folder whose
    report finished without figures keeps it as it is. Each stage says how many threads it takes."""
    out = tmp_path / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--no-figures"]) == 0
    err = capsys.readouterr().err
    for stage in ("train", "amortized", "local", "ais"):
        assert f"[{stage}] 1 torch thread (" in err, stage  # a tiny model: one thread everywhere
    assert "GFLOP per step; --threads N to override)" in err
    assert not (out / "figures").exists()
    assert (out / "summary.json").read_bytes() == (quick_run / "summary.json").read_bytes()
    hashes = lambda run: {k: v["config_sha256"] for k, v in json.loads((run / "stages.json").read_text()).items()}  # noqa: E731
    assert hashes(out) == hashes(quick_run)
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0  # figures wanted now: the report is kept
    assert "[report] skipped" in capsys.readouterr().err and not (out / "figures").exists()


def test_threads_follow_the_size_of_a_step_and_threads_overrides():
    import torch

    from gapbench.runner.config import load_config
    from gapbench.runner.device import FLOP_PER_THREAD, stage_flop, stage_threads, use_stage_threads

    assert stage_threads(0.5 * FLOP_PER_THREAD) == 1
    assert stage_threads(1e3 * FLOP_PER_THREAD) >= 1  # never more than torch's default (the cores)
    assert stage_threads(1e6, threads=3) == 3
    config = load_config(DIGITS)
    flops = {stage: stage_flop(config, stage, 64) for stage in ("train", "amortized", "local", "ais", "curve")}
    assert flops["train"] < flops["amortized"] < flops["local"]  # a minibatch < 4096 IWAE rows < 10 x 1000 with backward
    assert max(flops.values()) < FLOP_PER_THREAD  # the main job takes one thread throughout
    messages = []
    before = torch.get_num_threads()
    assert use_stage_threads(config, "local", 64, device=torch.device("cpu"), threads=2, log=messages.append) == 2
    assert torch.get_num_threads() == 2 and messages == ["[local] 2 torch threads (--threads)"]
    torch.set_num_threads(before)


def test_force_help_says_only_the_affected_stages_are_redone(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "redo only the stages the change affects" in help_text and "redo every stage" not in help_text


@pytest.mark.parametrize("args", [["bdmc", "RUN", "--num-datapoints", "-3"], ["bdmc", "RUN", "--num-chains", "0"],
                                  ["track", "RUN", "--num-samples", "x"], ["run", "E.toml", "--threads", "0"]])
def test_counts_below_one_exit_2_with_a_message(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err or "expected a whole number" in err


def test_a_bad_set_is_named_as_coming_from_set(tmp_path, capsys):
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "x"), "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration in --set train.epoch=3 (on top of" in err
    assert "did you mean train.epochs?" in err and not (tmp_path / "x").exists()


def test_ci_quick_uses_families_with_the_baselines_config():
    """refine.family -> refine.families in ci_quick.toml: the same resolved config as the baseline's,
    so the same stage hashes and numbers."""
    from gapbench.runner.config import load_config, read_raw
    from gapbench.runner.stage_table import STAGES, section_hash

    path = ROOT / "experiments" / "ci_quick.toml"
    assert "family" not in read_raw(path)["refine"] and read_raw(path)["refine"]["families"] == ["ffg"]
    resolved = load_config(path).model_dump(mode="json")
    baseline = json.loads((ROOT / "results" / "baselines" / "ci_quick.json").read_text())["config"]
    assert {s: section_hash(resolved, s) for s in STAGES} == {s: section_hash(baseline, s) for s in STAGES}


def test_report_output_in_the_checkout_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("report/gap_table.md", "report/gap_bars.png"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_rerun_skips_finished_stages(quick_run, capsys):
    before = json.loads((quick_run / "stages.json").read_text())
    mtime = (quick_run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["run", str(DIGITS), "--out", str(quick_run), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "[train] skipped" in err and "[amortized] skipped" in err and "[local] skipped" in err
    assert "[ais] skipped" in err
    after = json.loads((quick_run / "stages.json").read_text())
    assert after["train"] == before["train"] and after["local"] == before["local"] and after["ais"] == before["ais"]
    assert (quick_run / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_same_config_gives_same_summary(quick_run, tmp_path):
    out = tmp_path / "again"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0
    # the whole file, byte for byte: timings live in stages.json, not in the summary
    assert (quick_run / "summary.json").read_text() == (out / "summary.json").read_text()


def test_log_px_is_a_fresh_draw_of_the_estimator_chosen_per_datapoint(quick_run):
    """The report stage combines the pilot bounds with the same code as measure_gaps; the fresh draw
    (log_px.csv) is not one of the pilot values, and the table says how log p_hat was made."""
    from gapbench.estimators.log_px import select_estimators
    frame = pd.read_csv(quick_run / "datapoints.csv")
    candidates = ("iwae_q", "iwae_q_star_ffg", "ais")
    assert np.array_equal(frame["log_px_source"].to_numpy(), select_estimators(frame, candidates))
    assert np.array_equal(frame["max_pilot_bound"].to_numpy(), frame[list(candidates)].max(axis=1).to_numpy())
    assert not np.isin(frame["log_px"].to_numpy(), frame[list(candidates)].to_numpy()).any()
    assert frame["log_px_stderr"].notna().all() and frame["log_px_ess"].notna().all()
    assert "log p̂(x): per datapoint, a fresh draw" in (quick_run / "table.md").read_text()
    for column in ("ais_stderr", "ais_ess", "ais_acceptance_rate", "ais_step_size", "ais_divergence_rate"):
        assert column in frame and frame[column].notna().all()


def test_only_a_missing_ais_stage_is_redone(quick_run, tmp_path, capsys):
    """A folder written before the AIS stage existed (no [ais] in config.json, no ais.csv) resumes:
    the finished stages are kept and only AIS runs."""
    old = tmp_path / "old"
    shutil.copytree(quick_run, old)
    config = json.loads((old / "config.json").read_text())
    del config["ais"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "ais.csv").unlink()
    assert main(["run", str(DIGITS), "--out", str(old), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "[local] skipped" in err and "[ais] skipped" not in err
    assert (old / "ais.csv").read_text() == (quick_run / "ais.csv").read_text()


def test_ais_stage_can_be_disabled(tmp_path):
    out = tmp_path / "no_ais"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", "ais.enabled=false"]) == 0
    assert not (out / "ais.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["log_px"].endswith("among iwae_q, iwae_q_star_ffg (pilot ESS >= 2); pilot: the IWAE "
                                                  "and AIS runs of the amortized, local and ais stages")
    assert "ais" not in summary
    assert "ais" not in pd.read_csv(out / "datapoints.csv")


def test_ais_from_the_refined_posterior(tmp_path):
    out = tmp_path / "q_star"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", "ais.init=\"q_star\""]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["ais"]["init"] == "q_star"
    frame = pd.read_csv(out / "datapoints.csv")
    assert np.isfinite(frame["ais"]).all() and frame["ais_ess"].between(1, 4).all()
    # annealing from q* toward the posterior improves on q*'s own ELBO
    difference = frame["ais"] - frame["elbo_q_star"]
    assert difference.mean() > 0


def test_bdmc_command_prints_the_sandwich(quick_run, tmp_path, capsys):
    out = tmp_path / "bdmc.csv"
    assert main(["bdmc", str(quick_run), "--num-datapoints", "6", "--num-steps", "15", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BDMC gap" in printed and "4 chains, 15 sigmoid steps" in printed and "from the encoder" in printed
    frame = pd.read_csv(out)
    assert len(frame) == 6
    np.testing.assert_allclose(frame["gap"], frame["upper"] - frame["lower"])


def test_open_run_tolerates_keys_of_other_versions(quick_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(quick_run, other)
    config = json.loads((other / "config.json").read_text())
    config["flows"] = {"num_layers": 4}
    config["refine"]["newer_option"] = 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="ignoring keys") as record:
        loaded, _, _, x = open_run(other, num_datapoints=3)
    assert "flows" in str(record[0].message) and "refine.newer_option" in str(record[0].message)
    assert loaded.name == "digits" and x.shape == (3, 64)


def test_different_config_in_same_folder_is_refused(quick_run, capsys):
    before = (quick_run / "summary.json").read_text()
    code = main(["run", str(DIGITS), "--out", str(quick_run), *QUICK, "--set", "eval.num_samples=300"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different config" in err and "eval.num_samples" in err and "--force" in err
    assert (quick_run / "summary.json").read_text() == before


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "train.epochz: unknown key"),
    ("train.epochs=\"many\"", "train.epochs"),
    ("eval.num_samples=0", "eval.num_samples"),
    ("refine.max_steps=-5", "refine.max_steps"),
    ("ais.num_chains=0", "ais.num_chains"),
    ("ais.schedule=\"cosine\"", "ais.schedule"),
    ("ais.init=\"posterior\"", "ais.init"),
    ("ais.step_size=2.0", "step_size <= max_step_size"),
    ("data.dataset=\"cifar\"", "data.dataset"),
    ("eval.num_datapoints=5000", "has only 1197 datapoints"),
    ("notakeyvalue", "KEY=VALUE"),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "never"
    code = main(["run", str(DIGITS), "--out", str(out), "--quiet", "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_or_broken_experiment_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    assert main(["run", str(broken), "--quiet"]) == 2
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["run", str(DIGITS), "--out", str(locked / "run"), *QUICK]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_output_folder_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", str(DIGITS), "--out", str(blocker / "run"), *QUICK]) == 2
    assert "cannot write" in capsys.readouterr().err
