"""gapbench run --time-limit and SIGTERM: every stage stops at a safe point with exit code 3, and the
same command, repeated until it finishes, ends with the files of a run that was never stopped.

The clock is injected (each reading one second later than the last), so where the runs stop does not
depend on the machine's speed. With a limit of a few readings, refinement, AIS and the curve are also
stopped inside a batch (the deadline is read at every step), and that batch is redone on resume."""

import os
import shutil
import signal
from pathlib import Path

import pytest

import gapbench.deadline
from gapbench.cli import EXIT_STOPPED, main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "ci_quick.toml"
# two batches of 10 datapoints; the amortized stage in units of 5 (AMORTIZED_UNIT_ROWS // 200 is more)
ARGS = ["--set", "train.epochs=6", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=20",
        "--set", "eval.batch_size=10", "--set", "eval.num_samples=200", "--set", "refine.max_steps=60",
        "--set", "ais.enabled=true", "--set", "ais.num_steps=20", "--set", "ais.num_chains=4",
        "--set", "curve.enabled=true", "--set", "curve.steps=[0,1,5,10]", "--set", "curve.eval_samples=50",
        "--quiet"]
RESULTS = ("amortized.csv", "local.csv", "local.pt", "ais.csv", "curve.csv", "datapoints.csv", "table.md")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


class Counter:
    """A clock one second later at every reading; ``on_reading(n)`` is called with the reading."""

    def __init__(self, on_reading=lambda n: None):
        self.n = 0
        self.on_reading = on_reading

    def __call__(self) -> float:
        self.n += 1
        self.on_reading(self.n)
        return float(self.n)


REAL_DEADLINE = gapbench.deadline.Deadline


def use_clock(monkeypatch, make_clock) -> None:
    """gapbench run's deadline on a clock from ``make_clock()``, without a margin."""
    monkeypatch.setattr(gapbench.deadline, "Deadline",
                        lambda seconds=None: REAL_DEADLINE(seconds, clock=make_clock(), margin=0.0))


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["run", str(EXPERIMENT), "--out", str(out), *ARGS]) == 0
    return out


def assert_same_results(folder: Path, reference: Path) -> None:
    for name in RESULTS:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert (folder / "train_history.csv").read_text().count("\n") == 7
    assert not (folder / "partial").exists() and not (folder / "train_state.pt").exists()


def test_a_run_stopped_many_times_ends_as_one_never_stopped(whole_run, tmp_path, capsys, monkeypatch):
    use_clock(monkeypatch, Counter)
    out = tmp_path / "run"
    stops = []
    for _ in range(60):
        code = main(["run", str(EXPERIMENT), "--out", str(out), *ARGS, "--time-limit", "4s"])
        err = capsys.readouterr().err
        if code != EXIT_STOPPED:
            break
        stops.append(err.strip().splitlines()[-1])
        assert "Run the same command again to continue" in stops[-1]
    assert code == 0, err
    where = [line.split(" stage:")[0].split(" the ")[-1] for line in stops]
    for stage in ("train", "amortized", "local", "ais", "curve"):  # every stage was stopped at least once
        assert stage in where, "\n".join(stops)
    assert any("[local_ffg] 0 of 20 datapoints done" in line for line in stops)
    assert_same_results(out, whole_run)


def test_sigterm_stops_at_the_next_safe_point_and_the_run_resumes(whole_run, tmp_path, capsys, monkeypatch):
    def sigterm_at(reading):
        return lambda: Counter(lambda n: n == reading and os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "run"
    use_clock(monkeypatch, sigterm_at(3))  # during training, without a time limit
    assert main(["run", str(EXPERIMENT), "--out", str(out), *ARGS, "--time-limit", "1h"]) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "stopped at SIGTERM in the train stage: [train] 2 of 6 epochs done" in err
    assert (out / "train_state.pt").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    use_clock(monkeypatch, Counter)
    assert main(["run", str(EXPERIMENT), "--out", str(out), *ARGS]) == 0
    assert "[train] resuming after epoch" in capsys.readouterr().err
    assert_same_results(out, whole_run)


def test_sigterm_stops_the_calibration_stage_inside_its_annealing(whole_run, tmp_path, capsys, monkeypatch):
    """BDMC on simulated data takes minutes at real settings: SIGTERM stops it at its next AIS step."""
    import gapbench.runner.stages as stages
    real = stages.calibrate_ais
    steps = []

    def terminated_after_one_step(*args, callback, **kwargs):
        def counting(step):
            steps.append(step)
            if len(steps) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            callback(step)
        return real(*args, callback=counting, **kwargs)
    monkeypatch.setattr(stages, "calibrate_ais", terminated_after_one_step)
    out = tmp_path / "run"
    shutil.copytree(whole_run, out, ignore=shutil.ignore_patterns(".lock"))
    calibrated = [*ARGS, "--set", "ais.calibration_datapoints=3"]
    assert main(["run", str(EXPERIMENT), "--out", str(out), *calibrated, "--force", "--time-limit", "1h"]) == EXIT_STOPPED
    assert "stopped at SIGTERM in the calibration stage" in capsys.readouterr().err
    assert len(steps) == 1 and not (out / "ais_calibration.json").exists()
    monkeypatch.setattr(stages, "calibrate_ais", real)
    assert main(["run", str(EXPERIMENT), "--out", str(out), *calibrated]) == 0
    assert (out / "ais_calibration.json").exists()


def test_exit_code_3_from_the_command_line_and_the_environment(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", str(EXPERIMENT), "--out", str(out), *ARGS, "--time-limit", "0.001s"]) == EXIT_STOPPED
    assert "[train] 1 of 6 epochs done, 5 remain" in capsys.readouterr().err  # one unit, then the stop
    monkeypatch.setenv("GAPBENCH_TIME_LIMIT", "0.001")
    assert main(["run", str(EXPERIMENT), "--out", str(out), *ARGS]) == EXIT_STOPPED
    assert "[train] 2 of 6 epochs done" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("limit", ["soon", "-5m", "0s"])
def test_a_bad_time_limit_is_refused(limit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(EXPERIMENT), "--out", str(tmp_path / "run"), f"--time-limit={limit}"])
    assert exit_info.value.code == 2
    assert "2h30m" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
