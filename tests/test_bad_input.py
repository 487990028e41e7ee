"""Every bad input to `gapbench run` gets one message naming the problem and the fix, exit code 2,
and leaves nothing half-written; numerical faults inside a run are flagged, not fatal."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gapbench.data.mnist as mnist
import gapbench.runner.build as build
import gapbench.runner.stages as stages
import gapbench.io as io
from gapbench.cli import main

from gapbench.data import load_dataset, write_idx

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
QUICK = ["--set", "train.epochs=3", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=24",
         "--set", "eval.num_samples=200", "--set", "refine.max_steps=100", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK]) == 0
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its sub-folders (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"} if folder.exists() else {}


def refused(capsys, args, *messages, folder: Path | None = None) -> str:
    """Run gapbench; it must exit 2 with one message holding ``messages`` and change nothing in ``folder``."""
    before = snapshot(folder) if folder else None
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("gapbench: error: ") == 1, err  # after the log lines of the stages that ran, if any
    error = err[err.index("gapbench: error: "):]
    for message in messages:
        assert message in error, error
    if folder is not None:
        assert snapshot(folder) == before
    return error


# --- dataset files -----------------------------------------------------------------------------


@pytest.fixture
def mnist_dir(monkeypatch, tmp_path):
    """Four small but well-formed MNIST IDX files (the loader is told to expect that many images)."""
    monkeypatch.setattr(mnist, "NUM_IMAGES", {"train": 12, "test": 5})
    monkeypatch.setattr(mnist, "NUM_VALID", 4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)
    rng = np.random.default_rng(0)
    directory = tmp_path / "mnist"
    directory.mkdir()
    for name, shape in ((mnist.TRAIN_IMAGES, (12, 28, 28)), (mnist.TRAIN_LABELS, (12,)),
                        (mnist.TEST_IMAGES, (5, 28, 28)), (mnist.TEST_LABELS, (5,))):
        write_idx(directory / name, rng.integers(0, 10 if len(shape) == 1 else 256, size=shape, dtype=np.uint8))
    return directory


def mnist_args(directory: Path, out: Path) -> list[str]:
    return ["run", str(DIGITS), "--out", str(out), *QUICK, "--set", 'data.dataset="mnist"',
            "--set", f'data.data_dir="{directory}"', "--set", "data.download=false",
            "--set", "eval.num_datapoints=4"]


def test_the_small_mnist_files_are_fine(mnist_dir):
    assert load_dataset("mnist", data_dir=mnist_dir, download=False).train.shape == (8, 784)


def test_missing_dataset_files(mnist_dir, tmp_path, capsys):
    (mnist_dir / mnist.TEST_LABELS).unlink()
    refused(capsys, mnist_args(mnist_dir, tmp_path / "out"), "MNIST files not found",
            "missing t10k-labels-idx1-ubyte.gz", "Fix: provide the four files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "the gzip stream is truncated or corrupt"),
    ("magic", "wrong IDX magic number 0x00000801"),
    ("count", "holds an array of shape (11, 28, 28), expected (12, 28, 28)"),
])
def test_corrupt_dataset_files(mnist_dir, tmp_path, capsys, damage, message):
    images = mnist_dir / mnist.TRAIN_IMAGES
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:500])
    elif damage == "magic":  # a labels file where the images should be
        write_idx(images, np.zeros(12, dtype=np.uint8))
    else:
        write_idx(images, np.zeros((11, 28, 28), dtype=np.uint8))
    refused(capsys, mnist_args(mnist_dir, tmp_path / "out"), str(images), message, "Fix")
    assert not (tmp_path / "out").exists()


# --- data values -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    (float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (3.0, "outside [0, 1]"),
])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_data_values_the_likelihood_does_not_accept(monkeypatch, tmp_path, capsys, value, message, split):
    dataset = load_dataset("digits")  # checked when made; then something changes it
    dataset.split(split)[5, 7] = value
    monkeypatch.setattr(build, "load_dataset", lambda *args, **kwargs: dataset)
    refused(capsys, ["run", str(DIGITS), "--out", str(tmp_path / "out"), *QUICK], f"digits {split} split",
            message, "Fix")
    assert not (tmp_path / "out").exists()


# --- checkpoints -------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tamper_checkpoint(path: Path, kind: str, tmp_path: Path) -> None:
    good = torch.load(path, weights_only=True)
    if kind == "pickle that runs code":
        torch.save({**good, "extra": Exploit(tmp_path / "pwned")}, path)
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "foreign torch file":
        torch.save({"state_dict": good["decoder"]}, path)
    elif kind == "incomplete":
        torch.save({k: v for k, v in good.items() if k != "encoder"}, path)
    elif kind == "other data size":
        torch.save({**good, "data_size": 784}, path)
    elif kind == "other config":
        config = json.loads(json.dumps(good["config"]))
        config["model"]["latent_size"] = 3
        torch.save({**good, "config": config}, path)
    elif kind == "weights of other shapes":
        decoder = dict(good["decoder"])
        first = next(iter(decoder))
        decoder[first] = torch.zeros(7, 3)
        torch.save({**good, "decoder": decoder}, path)


@pytest.mark.parametrize("kind, messages", [
    ("pickle that runs code", ["refuses to unpickle", "could run code", "delete it to retrain"]),
    ("garbage", ["is not a readable gapbench checkpoint", "delete it to retrain"]),
    ("truncated", ["is not a readable gapbench checkpoint", "delete it to retrain"]),
    ("foreign torch file", ["is not a gapbench checkpoint", "delete it to retrain"]),
    ("incomplete", ["incomplete gapbench checkpoint (missing encoder)"]),
    ("other data size", ["trained on data of 784 pixels, but this dataset has 64", "new --out"]),
    ("other config", ["trained with a different [model] config", "delete it to retrain"]),
    ("weights of other shapes", ["does not fit the networks of this config", "delete it to retrain"]),
])
def test_checkpoints_that_do_not_fit(finished_run, tmp_path, capsys, kind, messages):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "amortized.csv").unlink()  # a stage to redo, so that a bad checkpoint would be used
    tamper_checkpoint(run / "checkpoint.pt", kind, tmp_path)
    refused(capsys, ["run", str(DIGITS), "--out", str(run), *QUICK], str(run / "checkpoint.pt"), *messages,
            folder=run)
    assert not (tmp_path / "pwned").exists()


def test_a_training_state_that_would_run_code(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoint.pt").unlink()  # training must be redone, from train_state.pt if it fits
    torch.save({"config_sha256": "x", "payload": Exploit(tmp_path / "pwned")}, run / "train_state.pt")
    refused(capsys, ["run", str(DIGITS), "--out", str(run), *QUICK], "train_state.pt is not a gapbench training "
            "state", "refuses to unpickle", "delete it to start training from scratch", folder=run)
    assert not (tmp_path / "pwned").exists()


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("nonsense.key=1", "nonsense: unknown key"),
    ("model.latent_size=0", "model.latent_size"),
    ("model.decoder_hidden=[128, 0]", "decoder_hidden widths must be positive"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=inf", "train.learning_rate"),
    ("train.warmup_epochs=-1", "train.warmup_epochs"),
    ("train.valid_num_samples=0", "train.valid_num_samples"),
    ("eval.num_datapoints=0", "eval.num_datapoints"),
    ("eval.chunk_size=0", "eval.chunk_size"),
    ("refine.check_every=-10", "refine.check_every"),
    ("refine.check_samples=0", "refine.check_samples"),
    ("refine.lr_decay=1.5", "refine.lr_decay"),
    ("refine.learning_rate=nan", "refine.learning_rate"),
    ("data.threshold=1", "data.threshold"),
    ("data.download=\"yes\"", "data.download"),
    ("seed=-1", "seed"),
])
def test_impossible_config_values(tmp_path, capsys, override, message):
    refused(capsys, ["run", str(DIGITS), "--out", str(tmp_path / "out"), "--quiet", "--set", override],
            "invalid configuration", message)
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_the_experiment_file(tmp_path, capsys):
    experiment_file = tmp_path / "exp.toml"
    experiment_file.write_text('name = "x"\n[train]\nepochs = 3\nlearning_rat = 0.1\n')
    refused(capsys, ["run", str(experiment_file), "--out", str(tmp_path / "out")],
            "train.learning_rat: unknown key; remove it or check its spelling (did you mean train.learning_rate?)")


# --- the output folder -------------------------------------------------------------------------


def test_output_folder_that_cannot_be_created(capsys):
    refused(capsys, ["run", str(DIGITS), "--out", "/proc/gapbench-run", *QUICK], "cannot write the run folder",
            "choose a writable --out")


def test_output_folder_that_holds_something_else(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    refused(capsys, ["run", str(DIGITS), "--out", str(tmp_path), *QUICK], "is not empty (notes.txt)",
            "holds no gapbench run", folder=tmp_path)


def test_disk_full_in_the_middle_of_a_stage(finished_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("amortized.csv", "local.csv"):
        (run / name).unlink()
    write_csv = io.write_csv

    def disk_full(path, frame):
        with io._atomic_path(Path(path)) as tmp:
            tmp.write_text("elbo_q,elbo_q_stderr\n-1")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "write_csv", disk_full)
    refused(capsys, ["run", str(DIGITS), "--out", str(run), *QUICK], f"cannot write {run / 'amortized.csv'}",
            "No space left on device", "rerun the same command to resume")
    assert not (run / "amortized.csv").exists() and not list(run.glob(".*.tmp"))
    assert "amortized" not in json.loads((run / "stages.json").read_text())
    monkeypatch.setattr(io, "write_csv", write_csv)
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK]) == 0
    assert "[train] skipped" in capsys.readouterr().err
    assert (run / "summary.json").read_bytes() == (finished_run / "summary.json").read_bytes()


# --- numerical faults inside a run -------------------------------------------------------------


def test_a_nan_elbo_is_flagged_not_fatal(finished_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "amortized.csv").unlink()
    bounds_of = stages.bounds_of

    def nan_for_datapoint_2(*args, **kwargs):
        pair = bounds_of(*args, **kwargs)
        pair.elbo.value[2] = torch.nan  # what an overflow in the decoder does to one datapoint
        return pair

    monkeypatch.setattr(stages, "bounds_of", nan_for_datapoint_2)
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK]) == 0
    assert "1 of 24 datapoints had numerical faults (elbo_q_not_finite: 1)" in capsys.readouterr().err
    frame = pd.read_csv(run / "datapoints.csv")
    assert frame["fault"][2] == "elbo_q_not_finite"
    assert (frame["fault"].drop(index=2) == "ok").all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["faults"]["num_faulty"] == 1
    assert summary["bounds"]["elbo_q"]["num_datapoints"] == 23
    assert np.isfinite(summary["gaps"]["amortization"]["mean"])
    assert "1 of 24 datapoints had numerical faults" in (run / "table.md").read_text()
