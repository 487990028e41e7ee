"""Runs killed with SIGKILL in every stage resume with the same command, redo nothing finished, and
end with the same summary.json as a run that was never interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gapbench.cli import main


ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
KILL_AT = Path(__file__).with_name("kill_at.py")
# two batches of 12 datapoints, so the evaluation stages can be killed between batches
ARGS = ["--set", "train.epochs=5", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=24",
        "--set", "eval.batch_size=12", "--set", "eval.num_samples=200", "--set", "refine.max_steps=100",
        "--set", "curve.enabled=true", "--set", "curve.steps=[0,1,5,10]", "--set", "curve.eval_samples=50", "--quiet"]
RESULTS = ("summary.json", "datapoints.csv", "table.md", "amortized.csv", "local.csv", "ais.csv", "log_px.csv",
           "curve.csv")

# slow: each test kills a real run in a fresh process (torch import, training) and reruns it to the end
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 0
    return out


def gapbench_subprocess(*args: str) -> subprocess.Popen:
    # this checkout's gapbench first: an environment whose editable install points at another checkout
    # (a git worktree) would otherwise run that one's code in the killed process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, str(KILL_AT), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_nothing_half_written(folder: Path) -> None:
    """Every file under its own name is whole; a kill leaves at most hidden temporary files."""
    for path in folder.iterdir():
        if path.is_dir() and path.name == "figures":  # the report stage's: PNG and PDF, whole
            assert all(p.suffix in (".png", ".pdf") for p in path.iterdir()), list(path.iterdir())
            continue
        if path.name == "partial":  # finished units of the stage that was killed (gapbench.runner.partial)
            for unit in path.glob("*/*"):
                assert unit.suffix == ".tmp" or torch.load(unit, weights_only=True)["format"] == "gapbench-partial"
        elif path.name.startswith("."):
            assert path.name == ".lock" or path.name.endswith(".tmp"), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path)) > 0
        elif path.suffix != ".md":
            raise AssertionError(f"unexpected file {path}")


def assert_same_results(folder: Path, reference: Path) -> None:
    for name in RESULTS:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    history = pd.read_csv(folder / "train_history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history, pd.read_csv(reference / "train_history.csv").drop(columns="seconds"))
    assert not (folder / "train_state.pt").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# point: (stages recorded when the process died, what the rerun says about each stage)
POINTS = {
    "train": ([], {"train": "resuming after epoch 2"}),
    "trained": (["train"], {"train": "skipped"}),
    "amortized": (["train"], {"train": "skipped"}),
    "local": (["train", "amortized"], {"train": "skipped", "amortized": "skipped"}),
    "ais": (["train", "amortized", "local"], {"train": "skipped", "amortized": "skipped", "local": "skipped"}),
    "log_px": (["train", "amortized", "local", "ais"],
               {"train": "skipped", "amortized": "skipped", "local": "skipped", "ais": "skipped"}),
    "curve": (["train", "amortized", "local", "ais", "log_px"],
              {"train": "skipped", "amortized": "skipped", "local": "skipped", "ais": "skipped", "log_px": "skipped"}),
    "report": (["train", "amortized", "local", "ais", "log_px", "curve"],
               {"train": "skipped", "amortized": "skipped", "local": "skipped", "ais": "skipped", "log_px": "skipped",
                "curve": "skipped"}),
}


@pytest.mark.parametrize("point", POINTS)
def test_killed_run_resumes_to_the_same_result(point, whole_run, tmp_path, capsys):
    out = tmp_path / "run"
    process = gapbench_subprocess(point, str(torch.get_num_threads()), "run", str(DIGITS), "--out", str(out), *ARGS)
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err
    assert_nothing_half_written(out)
    recorded, said = POINTS[point]
    before = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    assert sorted(before) == sorted(recorded)

    assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 0  # the same command
    log = capsys.readouterr().err
    for stage, message in said.items():
        assert f"[{stage}] {message}" in log, log
    after = json.loads((out / "stages.json").read_text())
    for stage in recorded:  # finished stages were not redone
        assert after[stage] == before[stage]
    assert_same_results(out, whole_run)


def test_killed_from_outside_at_any_moment(whole_run, tmp_path, capsys):
    """A real SIGKILL from another process, twice, at moments the test does not choose."""
    out = tmp_path / "run"
    for wait_for in ("train_state.pt", "amortized.csv"):
        process = gapbench_subprocess("none", str(torch.get_num_threads()), "run", str(DIGITS), "--out",
                                      str(out), *ARGS)
        deadline = time.monotonic() + 120
        while not (out / wait_for).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert_nothing_half_written(out)
    assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 0
    assert_same_results(out, whole_run)


def test_a_second_process_in_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running gapbench process holds it
        assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 2
    assert "another gapbench process is running" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_ctrl_c_exits_130_and_the_same_command_resumes(whole_run, tmp_path, capsys, monkeypatch):
    import gapbench.runner.stages as stages

    out = tmp_path / "run"
    local_posterior = stages.local_posterior

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "local_posterior", interrupted)
    assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(stages, "local_posterior", local_posterior)
    assert main(["run", str(DIGITS), "--out", str(out), *ARGS]) == 0
    assert "[amortized] skipped" in capsys.readouterr().err
    assert_same_results(out, whole_run)


@pytest.mark.parametrize("override, kept, redone", [
    ("eval.num_samples=300", ["train"], ["amortized", "local", "log_px", "report"]),
    ("refine.max_steps=150", ["train", "amortized"], ["local", "log_px", "report"]),
    ('name="renamed"', ["train", "amortized", "local", "log_px"], ["report"]),
    ("curve.learning_rate=0.1", ["train", "amortized", "local", "ais", "log_px"], ["curve", "report"]),
    ("train.epochs=4", [], ["train", "amortized", "local", "log_px", "report"]),
])
def test_force_redoes_only_the_stages_a_change_affects(whole_run, tmp_path, capsys, override, kept, redone):
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    before = json.loads((run / "stages.json").read_text())
    assert main(["run", str(DIGITS), "--out", str(run), *ARGS, "--set", override]) == 2
    assert f"redo the {redone[0]}" in capsys.readouterr().err
    assert main(["run", str(DIGITS), "--out", str(run), *ARGS, "--set", override, "--force"]) == 0
    err = capsys.readouterr().err
    after = json.loads((run / "stages.json").read_text())
    for stage in kept:
        assert f"[{stage}] skipped" in err and after[stage] == before[stage]
    for stage in redone:
        assert f"[{stage}] skipped" not in err and after[stage]["config_sha256"] != before[stage]["config_sha256"]
    # the result is what a fresh run with the new config gives
    fresh = tmp_path / "fresh"
    assert main(["run", str(DIGITS), "--out", str(fresh), *ARGS, "--set", override]) == 0
    assert (run / "summary.json").read_text() == (fresh / "summary.json").read_text()


def test_a_run_folder_from_before_config_hashes_is_resumed_not_redone(whole_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    stages = json.loads((run / "stages.json").read_text())
    (run / "stages.json").write_text(json.dumps({k: {"seconds": v["seconds"], "finished_at": v["finished_at"]}
                                                 for k, v in stages.items() if k != "report"}))
    local = pd.read_csv(run / "local.csv")
    # as written before refinement flagged divergence and before flows suffixed the family
    old_names = {c: c.replace("_ffg", "") for c in local.columns}
    local.drop(columns="refine_diverged_ffg").rename(columns=old_names).to_csv(run / "local.csv", index=False)
    assert main(["run", str(DIGITS), "--out", str(run), *ARGS]) == 0
    err = capsys.readouterr().err
    assert "[train] skipped" in err and "[amortized] skipped" in err and "[local] skipped" in err
    adopted = {k: v for k, v in stages["train"].items() if k != "outputs_sha256"}  # older records had none
    assert json.loads((run / "stages.json").read_text())["train"] == adopted
    assert (run / "summary.json").read_text() == (whole_run / "summary.json").read_text()


def test_a_run_folder_from_before_a_new_key_is_resumed_not_redone(whole_run, tmp_path, capsys):
    """A folder written by a version without model.posterior (its records hash the config without
    that key): the key takes its default, the records are re-hashed, and nothing is redone."""
    from gapbench.runner.rundir import STAGES, section_hash

    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    config = json.loads((run / "config.json").read_text())
    for key in ("posterior", "flow_steps", "flow_hidden"):
        del config["model"][key]
    (run / "config.json").write_text(json.dumps(config))
    stages = json.loads((run / "stages.json").read_text())
    old = {stage: {**stages[stage], "config_sha256": section_hash(config, stage)} for stage in STAGES if stage in stages}
    assert old["train"]["config_sha256"] != stages["train"]["config_sha256"]
    (run / "stages.json").write_text(json.dumps(old))
    assert main(["run", str(DIGITS), "--out", str(run), *ARGS]) == 0
    err = capsys.readouterr().err
    for stage in ("train", "amortized", "local", "report"):
        assert f"[{stage}] skipped" in err, stage
    assert json.loads((run / "stages.json").read_text()) == stages
