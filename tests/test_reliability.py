"""No silent wrong results (issue 12): a damaged or edited output is redone or refused, never turned
into numbers; an impossible size is refused before anything is written or moved; a broken AIS is
flagged and left out of log p_hat; every other bad input gets exit 2 with the file and the fix."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gapbench.runner.stages as stages
import gapbench.runner.training as training
from gapbench.runner.rundir import RunError
import gapbench.runner.rundir as rundir
from gapbench.cli import EXIT_ALL_FAULTY, main
from gapbench.runner.config import parse_config
from gapbench.estimators.health import AIS_FLAG_DEFAULTS, ais_flags
from gapbench.outputs import index_problem
from gapbench.runner.resources import memory_problems, stage_memory
from gapbench.runner.rundir import section_hash

ROOT = Path(__file__).resolve().parents[1]
QUICK_TOML = ROOT / "experiments" / "ci_quick.toml"
TINY = ["--set", "train.epochs=2", "--set", "eval.num_datapoints=12", "--set", "eval.num_samples=50",
        "--set", "refine.max_steps=20", "--set", "ais.num_steps=5", "--set", "ais.num_chains=4", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def run(out: Path, *extra: str) -> int:
    return main(["run", str(QUICK_TOML), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "quick"
    assert run(out) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("gapbench: error: ") == 1, err
    return err[err.index("gapbench: error: "):]


# --- 1: per-datapoint files: the index column, row checks, sha256 in the stage records -----------------

def drop_rows(path: Path) -> None:
    frame = pd.read_csv(path)
    frame.drop(index=range(3, 6)).to_csv(path, index=False)


def test_outputs_carry_the_index_and_records_their_sha256(finished):
    for name in ("amortized.csv", "local.csv", "ais.csv", "datapoints.csv"):
        assert pd.read_csv(finished / name)["index"].tolist() == list(range(12)), name
    records = json.loads((finished / "stages.json").read_text())
    assert set(records["report"]["outputs_sha256"]) == {"datapoints.csv", "summary.json", "table.md"}


@pytest.mark.parametrize("name", ["amortized.csv", "local.csv", "ais.csv", "summary.json"])
def test_a_changed_output_is_redone_to_the_same_numbers(finished, copy, capsys, name):
    if name == "summary.json":  # truncated (item 5) and, separately below, edited (item 11)
        (copy / name).write_text((copy / name).read_text()[:100])
    else:
        drop_rows(copy / name)
    assert run(copy) == 0
    assert f"{copy / name} changed after the stage finished" in capsys.readouterr().err
    assert (copy / "summary.json").read_bytes() == (finished / "summary.json").read_bytes()
    assert pd.read_csv(copy / "datapoints.csv").equals(pd.read_csv(finished / "datapoints.csv"))


def test_an_edited_summary_is_not_trusted(finished, copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["gaps"]["approximation"]["mean"] = 0.001
    (copy / "summary.json").write_text(json.dumps(summary))
    assert run(copy) == 0
    assert (copy / "summary.json").read_bytes() == (finished / "summary.json").read_bytes()


def legacy(folder: Path) -> None:
    """The folder as the previous version wrote it: no index column, no sha256 in the records."""
    for name in ("amortized.csv", "local.csv", "ais.csv"):
        pd.read_csv(folder / name).drop(columns="index").to_csv(folder / name, index=False)
    records = json.loads((folder / "stages.json").read_text())
    for record in records.values():
        record.pop("outputs_sha256")
    (folder / "stages.json").write_text(json.dumps(records))


def test_an_older_folder_resumes_when_its_counts_match(finished, copy, capsys):
    legacy(copy)
    assert run(copy) == 0
    err = capsys.readouterr().err
    assert "[local] skipped" in err and "redoing" not in err


def test_an_older_file_with_missing_rows_is_redone_not_joined_by_position(finished, copy, capsys):
    legacy(copy)
    drop_rows(copy / "local.csv")
    assert run(copy, "--force", "--set", 'name="other"') == 0  # the report alone would be redone
    assert "local.csv does not match its stage record: it has 9 rows and no index column" in capsys.readouterr().err
    mine, theirs = json.loads((copy / "summary.json").read_text()), json.loads((finished / "summary.json").read_text())
    assert mine["bounds"] == theirs["bounds"] and mine["gaps"] == theirs["gaps"]


def test_a_changed_checkpoint_is_refused(copy, capsys):
    checkpoint = torch.load(copy / "checkpoint.pt", weights_only=True)  # other weights, a valid checkpoint
    first = next(iter(checkpoint["decoder"]))
    checkpoint["decoder"][first] = checkpoint["decoder"][first] + 1.0
    torch.save(checkpoint, copy / "checkpoint.pt")
    before = files(copy)
    assert run(copy) == 2
    assert "checkpoint.pt changed after the stage finished" in error_of(capsys)
    assert files(copy) == before


def test_index_problem():
    ok = pd.DataFrame({"index": [2, 0, 1], "x": [1.0, 2.0, 3.0]})
    assert index_problem(ok, 3) is None
    assert "2 distinct datapoints" in index_problem(ok.assign(index=[0, 0, 1]), 3)
    assert "1 missing" in index_problem(ok.iloc[:2], 3)
    assert index_problem(ok.drop(columns="index"), 3) is None
    assert "no index column" in index_problem(ok.drop(columns="index"), 4)


# --- 2: memory, --force --------------------------------------------------------------------------------

def test_an_impossible_size_is_refused_before_force_moves_anything(copy, capsys):
    before = files(copy)
    assert run(copy, "--force", "--set", "ais.num_chains=1000000000") == 2
    assert "the ais stage needs about" in error_of(capsys)
    assert files(copy) == before and not (copy / rundir.REPLACED).exists()


@pytest.mark.parametrize("setting", ["model.latent_size=100000000", "model.decoder_hidden=[200000, 200000]",
                                     "eval.chunk_size=1000000000"])
def test_an_impossible_model_leaves_no_folder(tmp_path, capsys, setting):
    extra = ["--set", "eval.num_samples=1000000000"] if setting.startswith("eval.chunk") else []
    assert run(tmp_path / "run", "--set", setting, *extra) == 2
    assert "cannot fit in memory" in error_of(capsys)
    assert not (tmp_path / "run").exists()


def test_memory_estimate_counts_the_ais_chains():
    config = parse_config({"name": "x"})
    ais = {s.stage: s.num_bytes for s in stage_memory(config, 784)}["ais"]
    bigger = parse_config({"name": "x", "ais": {"num_chains": 1600}})
    assert {s.stage: s.num_bytes for s in stage_memory(bigger, 784)}["ais"] > 10 * ais  # the chains dominate
    assert memory_problems(config, 784, torch.device("cpu")) == []  # the defaults fit this machine


def test_a_folder_where_nothing_finished_takes_a_corrected_config(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RunError("stop")
    monkeypatch.setattr(training, "train", fail)
    assert run(tmp_path / "run", "--set", "model.latent_size=4") == 2
    monkeypatch.undo()
    assert run(tmp_path / "run", "--set", "train.epochs=1") == 0
    assert "no stage of the run" in capsys.readouterr().err


def test_force_puts_back_what_it_replaced_when_the_new_run_fails(copy, capsys, monkeypatch):
    before = files(copy)

    def fail(*args, **kwargs):
        raise RunError("AIS failed")
    monkeypatch.setattr(stages, "ais_of", fail)
    assert run(copy, "--force", "--set", "ais.num_steps=6") == 2
    assert "are back in" in capsys.readouterr().err
    assert files(copy) == before and not (copy / rundir.REPLACED).exists()
    monkeypatch.undo()
    assert run(copy, "--force", "--set", "ais.num_steps=6") == 0  # and on success, the old outputs go
    assert not (copy / rundir.REPLACED).exists()
    assert (copy / "ais.csv").read_bytes() != before["ais.csv"]


def test_force_keeps_the_new_runs_progress_when_it_stops_at_a_time_limit(copy, capsys, monkeypatch):
    """A forced run stopped by the time limit (or SIGTERM) inside a later stage is not a failure: its
    new config and finished stages stay, and the same command continues it without redoing them."""
    from gapbench.deadline import StopRequested
    before = files(copy)

    def stop(*args, **kwargs):
        raise StopRequested("0 of 24 datapoints done")
    monkeypatch.setattr(stages, "ais_of", stop)
    command = ("--force", "--set", "ais.num_steps=6", "--set", "refine.max_steps=60")
    assert run(copy, *command, "--time-limit", "1h") == 3
    assert "are back in" not in capsys.readouterr().err
    assert json.loads((copy / "config.json").read_text())["refine"]["max_steps"] == 60  # the new config stays
    records = json.loads((copy / "stages.json").read_text())
    assert {"train", "amortized", "local"} <= set(records) and "ais" not in records
    assert not (copy / rundir.REPLACED).exists()  # local finished under the new config: no way back
    local = (copy / "local.csv").read_bytes()
    assert local != before["local.csv"]
    monkeypatch.undo()
    assert run(copy, *command) == 0
    assert "[local] skipped: finished" in capsys.readouterr().err  # finished under the new config: not redone
    assert (copy / "local.csv").read_bytes() == local and not (copy / rundir.REPLACED).exists()


def test_a_failure_after_a_forced_run_finished_a_stage_keeps_that_stage(copy, capsys, monkeypatch):
    """A forced run stopped at a time limit, continued (finishing a stage under the new config), then failing
    in a later stage keeps its new config and finished stages: nothing of the old run is put back over
    them (that once deleted a trained flow model's evaluation, hours of work, after a calibration crash)."""
    from gapbench.deadline import StopRequested
    command = ("--force", "--set", "ais.num_steps=6", "--set", "refine.max_steps=60")

    def stop(*args, **kwargs):
        raise StopRequested("stopped in the local stage")
    monkeypatch.setattr(stages, "local_posterior", stop)
    assert run(copy, *command, "--time-limit", "1h") == 3
    assert (copy / rundir.REPLACED).is_dir()  # nothing finished under the new config yet
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise RunError("AIS failed")
    monkeypatch.setattr(stages, "ais_of", fail)
    assert run(copy, *command) == 2
    assert "are back in" not in capsys.readouterr().err
    records = json.loads((copy / "stages.json").read_text())
    assert "local" in records and "ais" not in records
    assert json.loads((copy / "config.json").read_text())["refine"]["max_steps"] == 60
    local = (copy / "local.csv").read_bytes()
    monkeypatch.undo()
    assert run(copy, *command) == 0
    assert "[local] skipped: finished" in capsys.readouterr().err and (copy / "local.csv").read_bytes() == local


@pytest.mark.parametrize("init", ["encoder", "q_star"])
def test_a_lost_local_pt_redoes_ais_only_when_ais_starts_from_q_star(copy, capsys, init):
    """local.pt (every datapoint's q*, hundreds of MB for local flows) is the one output a committed run
    folder leaves out; redoing the local stage then redoes AIS only if AIS reads q* from it."""
    assert run(copy, "--force", "--set", f'ais.init="{init}"') == 0
    ais = (copy / "ais.csv").read_bytes()
    capsys.readouterr()
    (copy / "local.pt").unlink()
    assert run(copy, "--set", f'ais.init="{init}"') == 0
    err = capsys.readouterr().err
    assert "[local] skipped" not in err and "[log_px] skipped" not in err
    assert ("[ais] skipped: finished" in err) == (init == "encoder")
    if init == "encoder":
        assert (copy / "ais.csv").read_bytes() == ais


# --- 3: gapbench check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda b: b["summary"].update(bounds={}, gaps={}, other_bounds={}), "holds no bound or gap"),
    (lambda b: b.update(format_version=99), "format_version 99"),
    (lambda b: b["summary"]["bounds"]["log_px"].update(mean="-23.3"), "bounds.log_px.mean is '-23.3'"),
    (lambda b: b["summary"].update(bounds={"other": b["summary"]["bounds"]["log_px"]}, gaps={}, other_bounds={}),
     "no bound or gap in common"),
])
def test_check_refuses_a_baseline_it_cannot_compare(finished, tmp_path, capsys, damage, message):
    baseline = tmp_path / "baseline.json"
    assert main(["check", str(finished), "--baseline", str(baseline), "--update"]) == 0
    data = json.loads(baseline.read_text())
    damage(data)
    baseline.write_text(json.dumps(data))
    assert main(["check", str(finished), "--baseline", str(baseline)]) == 2
    assert message in error_of(capsys)


# --- 4: AIS health -------------------------------------------------------------------------------------

def test_ais_flags_thresholds():
    frame = pd.DataFrame({"ais_acceptance_rate": [0.65, 0.0, 0.7, 0.6, np.nan],
                          "ais_divergence_rate": [0.0, 0.0, 0.9, 0.0, 0.0],
                          "ais_ess": [10.0, 10.0, 10.0, 1.2, 10.0]})
    flags = ais_flags(frame, target_acceptance=0.65, num_chains=16, **AIS_FLAG_DEFAULTS)
    assert flags["ais_acceptance_off"].tolist() == [False, True, False, False, True]
    assert flags["ais_diverging"].tolist() == [False, False, True, False, False]
    assert flags["ais_ess_collapsed"].tolist() == [False, False, False, True, False]
    assert flags["ais_unhealthy"].tolist() == [False, True, True, True, True]


def test_a_broken_ais_is_flagged_and_left_out_of_log_px(copy, capsys):
    assert run(copy, "--force", "--set", "ais.step_size=50", "--set", "ais.max_step_size=100",
               "--set", "ais.adaptation_rate=0") == 0
    assert "AIS was flagged unhealthy for 12 of 12 datapoints" in capsys.readouterr().err
    frame = pd.read_csv(copy / "datapoints.csv")
    assert frame["ais_unhealthy"].dtype == bool and frame["ais_unhealthy"].all()
    assert (frame["log_px_source"] != "ais").all() and (frame["fault"] == "ok").all()
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["ais"]["unhealthy"]["num_unhealthy"] == 12 and "ais" not in summary["log_px_source_counts"]


def test_the_new_ais_keys_at_their_defaults_change_no_stage_hash():
    resolved = parse_config({"name": "x"}).model_dump(mode="json")
    without = json.loads(json.dumps(resolved))
    for key in AIS_FLAG_DEFAULTS:
        without["ais"].pop(key)
    for stage in rundir.STAGES:
        assert section_hash(resolved, stage) == section_hash(without, stage), stage
    changed = parse_config({"name": "x", "ais": {"flag_divergence_rate": 0.1}}).model_dump(mode="json")
    assert section_hash(changed, "ais") == section_hash(resolved, "ais")  # AIS is not redone for a threshold
    assert section_hash(changed, "report") != section_hash(resolved, "report")
    assert rundir.affected_stages({"ais.flag_divergence_rate"}) == ["report"]


# --- 5-11: every other bad input gets exit 2 with the file and the fix ---------------------------------

@pytest.mark.parametrize("command", ["report", "aggregate"])
def test_report_and_aggregate_refuse_a_damaged_summary(copy, capsys, command):
    (copy / "summary.json").write_text('{"bounds": {"log_px": {"mean": "x"}}, "gaps": {}}')
    args = [command, str(copy)] + (["--no-figures"] if command == "report" else [])
    assert main(args) == 2
    assert "summary.json cannot be used: bounds.log_px.mean is 'x'" in error_of(capsys)


def test_a_full_disk_while_saving_a_torch_file_is_exit_2(tmp_path, capsys, monkeypatch):
    def full(obj, file):
        file.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    assert run(tmp_path / "run") == 2
    error = error_of(capsys)
    assert ".pt: writing the torch file failed ([enforce fail" in error and "is the disk full?" in error
    assert not list((tmp_path / "run").glob(".*.tmp")) and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "a/b", "..", "."])
def test_a_run_name_that_is_a_path_is_refused(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(QUICK_TOML), *TINY, "--set", f'name="{name}"']) == 2
    assert "is not a plain folder name" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["bdmc", "--num-steps", "2", "--quiet"], ["aggregate"]])
def test_an_unwritable_out_is_refused_before_computing(finished, capsys, monkeypatch, command):
    import gapbench.commands.bdmc as sandwich
    monkeypatch.setattr(sandwich, "bdmc_run", lambda *a, **k: pytest.fail("computed before checking --out"))
    assert main([command[0], str(finished), *command[1:], "--out", "/proc/no/such/file.csv"]) == 2
    assert "cannot write --out /proc/no/such/file.csv" in error_of(capsys)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_a_bad_local_pt_is_refused_without_suggesting_weights_only_false(copy, capsys, kind):
    assert run(copy, "--force", "--set", 'ais.init="q_star"') == 0
    if kind == "malicious":
        torch.save({"ffg": Payload()}, copy / "local.pt")
    else:
        (copy / "local.pt").write_bytes((copy / "local.pt").read_bytes()[:200])
    records = json.loads((copy / "stages.json").read_text())  # as an older version recorded it: no sha256
    for record in records.values():
        record.pop("outputs_sha256")
    (copy / "stages.json").write_text(json.dumps(records))
    (copy / "ais.csv").unlink()
    assert run(copy, "--set", 'ais.init="q_star"') == 2
    error = error_of(capsys)
    assert "local.pt" in error and "weights_only=False" not in error and "make room" not in error
    assert ("damaged" in error) == (kind == "truncated")


def test_a_malicious_snapshot_is_refused(copy, capsys):
    (copy / "snapshots").mkdir()
    torch.save({"epoch": 1, "decoder": Payload(), "encoder": {}}, copy / "snapshots" / "epoch_00001.pt")
    assert main(["track", str(copy), "--num-datapoints", "2", "--quiet"]) == 2
    error = error_of(capsys)
    assert "epoch_00001.pt" in error and "weights_only=False" not in error


@pytest.mark.parametrize("args, message", [
    (["run", "BAD_TOML"], "is not UTF-8 text"),
    (["run", str(QUICK_TOML), "--set", f"seed={2 ** 64}"], "seed"),
    (["bdmc", "RUN", "--num-chains", "0"], "--num-chains: must be at least 1, got 0"),
    (["bdmc", "RUN", "--num-datapoints", "-1"], "--num-datapoints: must be at least 1, got -1"),
    (["track", "RUN", "--num-samples", "0"], "--num-samples: must be at least 1, got 0"),
])
def test_bad_arguments_are_exit_2(finished, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "x\xff"\n')
    args = [str(bad) if a == "BAD_TOML" else str(finished) if a == "RUN" else a for a in args]
    try:
        code = main(args + (["--out", str(tmp_path / "out")] if args[0] == "run" else []))
    except SystemExit as exit:  # argparse refuses a count below 1 (gapbench.commands.arguments.positive_int)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_incomplete_data_dir_is_refused(tmp_path, capsys):
    from gapbench.data import write_idx
    from gapbench.data.mnist import TRAIN_IMAGES, TRAIN_LABELS
    write_idx(tmp_path / TRAIN_IMAGES, np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / TRAIN_LABELS, np.zeros(5, np.uint8))
    assert run(tmp_path / "run", "--set", 'data.dataset="fashion-mnist"', "--set", f'data.data_dir="{tmp_path}"',
               "--set", "data.download=false") == 2
    error = error_of(capsys)
    assert f"{tmp_path} (data_dir / --data-dir): missing t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" \
        in error and "does not fall back to another copy" in error


def test_a_finished_run_on_a_read_only_disk_prints_its_table(finished, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(rundir.os, "open", read_only)
    monkeypatch.setattr(rundir.io, "write_json", lambda *a: pytest.fail("wrote to a read-only folder"))
    assert run(finished) == 0
    assert "| approximation gap |" in capsys.readouterr().out


def test_a_run_where_every_datapoint_is_faulty_has_its_own_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "find_faults",
                        lambda frame, *a, **k: pd.Series("elbo_q_not_finite", index=frame.index, name="fault"))
    assert run(tmp_path / "run") == EXIT_ALL_FAULTY == 4
    assert "every one of the 12 datapoints" in capsys.readouterr().err
