"""`gapbench check`: the z-test on Monte Carlo standard errors, its threshold, and the command."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gapbench.commands.check import CheckError, compare, z_threshold
from gapbench.cli import main
from gapbench.outputs import sha256_file


ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
QUICK = ["--set", "train.epochs=3", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=24",
         "--set", "eval.num_samples=200", "--set", "refine.max_steps=100", "--quiet"]
QUANTITIES = {"bounds": ("elbo_q", "elbo_q_star", "log_px"), "gaps": ("approximation", "amortization", "inference"),
              "other_bounds": ("iwae_q", "iwae_q_star")}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def summary(means: dict[str, float] | None = None, mc_stderr: float = 0.01, **extra) -> dict:
    means = means or {}
    return {
        **{block: {name: {"mean": means.get(f"{block}.{name}", -10.0), "stderr": 0.5, "mc_stderr": mc_stderr,
                          "num_datapoints": 100} for name in names} for block, names in QUANTITIES.items()},
        "faults": {"num_datapoints": 100, "num_faulty": 0, "counts": {}},
        "settings": {"name": "a", "num_samples": {"iwae_k": 1000}},
        "versions": {"torch": "2.13.0"},
        **extra,
    }


def test_threshold_is_bonferroni_over_the_quantities():
    assert z_threshold(0.01, 8) == pytest.approx(3.2272, abs=1e-4)  # Phi^-1(1 - 0.01 / 16)
    assert z_threshold(0.05, 1) == pytest.approx(1.9600, abs=1e-4)
    with pytest.raises(CheckError, match="alpha"):
        z_threshold(1.5, 8)


def test_z_uses_both_runs_monte_carlo_errors():
    base = summary(mc_stderr=0.03)
    run = summary({"gaps.amortization": -10.0 + 0.1}, mc_stderr=0.04)  # 0.1 / 0.05 = 2 standard errors
    result = compare(run, base)
    row = next(r for r in result.rows if r.quantity == "gaps.amortization")
    assert row.stderr == pytest.approx(0.05) and row.z == pytest.approx(2.0) and not row.is_moved
    assert not result.is_moved and len(result.rows) == 8
    moved = compare(summary({"gaps.amortization": -10.0 + 0.2}, mc_stderr=0.04), base)  # 4 standard errors
    assert moved.is_moved and [r.quantity for r in moved.rows if r.is_moved] == ["gaps.amortization"]
    # a floor in nats: significant but too small to matter
    assert not compare(summary({"gaps.amortization": -9.8}, mc_stderr=0.04), base, min_difference=0.25).is_moved


def test_false_alarm_rate_under_the_null_is_at_most_alpha():
    """Two honest evaluations: every mean off by Monte Carlo noise of its stated size."""
    rng = np.random.default_rng(0)
    alpha, trials = 0.01, 4000
    alarms = 0
    for _ in range(trials):
        noise = rng.normal(0.0, 0.01, size=(2, 8))  # (run, baseline) x quantity
        names = [f"{b}.{n}" for b, ns in QUANTITIES.items() for n in ns]
        result = compare(summary(dict(zip(names, -10 + noise[0]))), summary(dict(zip(names, -10 + noise[1]))),
                         alpha=alpha)
        alarms += result.is_moved
    rate, se = alarms / trials, math.sqrt(alpha * (1 - alpha) / trials)
    assert rate < alpha + 4 * se and rate > alpha - 4 * se  # independent quantities: Bonferroni is near exact


def test_what_else_counts_as_a_change():
    base = summary()
    assert compare(summary({"bounds.log_px": math.nan}), base).is_moved  # a NaN mean
    faulty = summary(faults={"num_datapoints": 100, "num_faulty": 3, "counts": {"refine_diverged": 3}})
    result = compare(faulty, base)
    assert result.is_moved and any("numerical faults: 3 datapoints" in n for n in result.notes)
    less = summary()
    del less["other_bounds"]["iwae_q"]
    result = compare(less, base)
    assert result.is_moved and "other_bounds.iwae_q is in the baseline but not in the run" in result.notes
    more = summary()
    more["bounds"]["ais"] = dict(more["bounds"]["log_px"])
    result = compare(more, base)
    assert not result.is_moved and "bounds.ais is new (not in the baseline); not checked" in result.notes
    newer = compare(summary(versions={"torch": "2.14.0"}), base)
    assert not newer.is_moved and newer.notes == ["torch 2.13.0 in the baseline, 2.14.0 in the run"]
    with pytest.raises(CheckError, match=r"different settings \(num_samples.iwae_k\).*--update"):
        compare(summary(settings={"name": "a", "num_samples": {"iwae_k": 5000}}), base)
    assert not compare(summary(settings={"name": "b", "num_samples": {"iwae_k": 1000}}), base).is_moved


# --- the command, on real runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check")
    run, file = folder / "run", folder / "baseline.json"
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK]) == 0
    assert main(["check", str(run), "--baseline", str(file), "--update"]) == 0
    return run, file


def test_update_writes_a_baseline_with_the_config(baseline):
    run, file = baseline
    data = json.loads(file.read_text())
    assert data["format"] == "gapbench-baseline" and data["config"] == json.loads((run / "config.json").read_text())
    assert data["summary"] == json.loads((run / "summary.json").read_text())


def test_a_rerun_passes(baseline, tmp_path, capsys):
    run, file = baseline
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "again"), *QUICK]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "again"), "--baseline", str(file)]) == 0
    out = capsys.readouterr().out
    # 10 quantities (3 bounds and L[q*_FFG], 3 gaps, IWAE-q, IWAE-q*_FFG, AIS): Bonferroni at alpha 0.01
    assert f"over 10 quantities at alpha = 0.01, |z| > {z_threshold(0.01, 10):.2f} counts as moved" in out
    assert "PASS" in out and "MOVED" not in out


def test_a_re_evaluation_with_other_random_numbers_passes(baseline, tmp_path, capsys):
    """The same model and datapoints, other Monte Carlo draws (batches of 7 datapoints, not 24)."""
    run, file = baseline
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert main(["run", str(DIGITS), "--out", str(other), *QUICK, "--set", "eval.batch_size=7", "--force"]) == 0
    capsys.readouterr()
    assert main(["check", str(other), "--baseline", str(file)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    before = json.loads((run / "summary.json").read_text())["gaps"]["amortization"]["mean"]
    after = json.loads((other / "summary.json").read_text())["gaps"]["amortization"]["mean"]
    assert before != after  # the numbers did move, by chance


def test_a_weakened_decoder_fails(baseline, tmp_path, capsys):
    run, file = baseline
    weak = tmp_path / "weak"
    shutil.copytree(run, weak)
    checkpoint = torch.load(weak / "checkpoint.pt", weights_only=True)
    last = [k for k in checkpoint["decoder"] if k.endswith("weight")][-1]
    checkpoint["decoder"][last] = 0.8 * checkpoint["decoder"][last]  # blurrier pixel probabilities
    torch.save(checkpoint, weak / "checkpoint.pt")
    records = json.loads((weak / "stages.json").read_text())  # as if training had made this model
    records["train"]["outputs_sha256"]["checkpoint.pt"] = sha256_file(weak / "checkpoint.pt")
    (weak / "stages.json").write_text(json.dumps(records))
    for name in ("amortized.csv", "local.csv"):  # evaluate the weakened model
        (weak / name).unlink()
    assert main(["run", str(DIGITS), "--out", str(weak), *QUICK]) == 0
    capsys.readouterr()
    assert main(["check", str(weak), "--baseline", str(file)]) == 1
    out = capsys.readouterr().out
    assert "| bounds.elbo_q |" in out and "MOVED" in out and "FAIL" in out and "--update" in out


def test_check_refuses_what_it_cannot_compare(baseline, tmp_path, capsys):
    run, file = baseline
    cases = [
        (["check", str(tmp_path), "--baseline", str(file)], "holds no summary"),
        (["check", str(run), "--baseline", str(tmp_path / "none.json")], "does not exist; make it"),
        (["check", str(run), "--baseline", str(file), "--alpha", "0"], "alpha must be in (0, 1)"),
        (["check", str(run), "--baseline", str(run / "config.json")], "neither a gapbench summary.json nor a baseline"),
        (["check", str(run), "--baseline", str(run / "table.md")], "is not readable JSON"),
    ]
    for args, message in cases:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert main(["run", str(DIGITS), "--out", str(other), *QUICK, "--set", "eval.num_datapoints=20", "--force"]) == 0
    capsys.readouterr()
    assert main(["check", str(other), "--baseline", str(file)]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "num_datapoints" in err and "evaluation_data_sha256" in err
    (tmp_path / "blocker").write_text("a file")
    assert main(["check", str(run), "--baseline", str(tmp_path / "blocker" / "b.json"), "--update"]) == 2
    assert "cannot write the baseline" in capsys.readouterr().err
