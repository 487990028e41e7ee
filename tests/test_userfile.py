"""A user's dataset from an array file: formats, the split, the declared domain, and every bad file refused
with one message (exit 2 through `gapbench run`, nothing written)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gapbench.cli import main
from gapbench.data import DataError, load_dataset
from gapbench.data.userfile import load_file_dataset

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.toml"
QUICK = ["--set", "train.epochs=2", "--set", "train.warmup_epochs=1", "--set", "eval.num_datapoints=12",
         "--set", "eval.num_samples=100", "--set", "refine.max_steps=50", "--set", "ais.enabled=false", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def digit_levels() -> np.ndarray:
    """The digits as uint8 levels 0..16, (1797, 8, 8)."""
    import sklearn.datasets
    return sklearn.datasets.load_digits().images.astype(np.uint8)


def test_an_integer_image_file_is_split_by_the_fixed_rule(tmp_path):
    path = tmp_path / "digits.npy"
    levels = digit_levels()
    np.save(path, levels)
    dataset = load_file_dataset(path, domain="levels", num_levels=17)
    assert dataset.image_shape == (8, 8) and dataset.num_levels == 17 and dataset.name == "file:digits.npy"
    perm = np.random.default_rng(0).permutation(1797)  # train 2/3, valid 1/6, test the rest
    x = torch.from_numpy(levels.reshape(1797, 64) / 16).float()
    for split, part in (("train", perm[:1198]), ("valid", perm[1198:1497]), ("test", perm[1497:])):
        assert torch.equal(dataset.split(split), x[part])
    assert torch.equal(dataset.test, load_dataset("digits").test)  # the digits' own rule has the same test split
    assert dataset.provenance["split"]["sizes"] == {"train": 1198, "valid": 299, "test": 300}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_own_splits_and_float_levels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    splits = {name: (rng.integers(0, 4, size=(n, 2, 3, 3)) / 3).astype(np.float32)
              for name, n in (("train", 10), ("valid", 4), ("test", 5))}  # (N, C, H, W), 4 levels
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, **splits)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in splits.items()}, path)
    dataset = load_file_dataset(path, domain="levels", num_levels=4)
    assert dataset.image_shape == (2, 3, 3) and dataset.test.shape == (5, 18)
    assert torch.equal(dataset.valid, torch.from_numpy(splits["valid"]).reshape(4, 18))


def test_binary_vectors(tmp_path):
    path = tmp_path / "bits.pt"
    torch.save((torch.rand(30, 7, generator=torch.Generator().manual_seed(0)) > 0.5), path)
    dataset = load_file_dataset(path, domain="binary")
    assert dataset.data_size == 7 and dataset.num_levels == 2 and set(dataset.train.unique().tolist()) <= {0.0, 1.0}


def nan_array():
    x = np.full((12, 4), 0.5, dtype=np.float32)
    x[3, 1] = np.nan
    return x


@pytest.mark.parametrize("array, domain, message", [
    (nan_array(), "levels", "1 of 48 values are NaN or infinite"),
    (np.full((12, 4), 0.3, dtype=np.float32), "levels", "not among the 256 levels"),
    (np.full((12, 4), 0.5, dtype=np.float32), "binary", "neither 0 nor 1"),
    (np.full((12, 4), 300, dtype=np.int64), "levels", "integer values span [300, 300]"),
    (np.full((12, 4), 2.0, dtype=np.float32), "levels", "outside [0, 1]"),
    (np.zeros(12, dtype=np.float32), "levels", "shape (12,)"),
    (np.zeros((3, 4), dtype=np.float32), "levels", "too few to split"),
    (np.array(["a", "b"] * 6).reshape(12, 1), "levels", "is not numeric"),
])
def test_bad_values_and_shapes_are_refused(tmp_path, array, domain, message):
    path = tmp_path / "x.npy"
    np.save(path, array)
    with pytest.raises(DataError, match="Fix") as caught:
        load_file_dataset(path, domain=domain)
    assert message in str(caught.value)


def test_pickles_are_never_loaded(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 12, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot be read"):
        load_file_dataset(tmp_path / "objects.npy", domain="levels")
    torch.save({"x": torch.zeros(12, 3), "note": object()}, tmp_path / "objects.pt")
    with pytest.raises(DataError, match="cannot be read"):
        load_file_dataset(tmp_path / "objects.pt", domain="levels")
    np.savez(tmp_path / "two.npz", a=np.zeros((12, 3)), b=np.zeros((12, 3)))
    with pytest.raises(DataError, match="'train', 'valid' and 'test'"):
        load_file_dataset(tmp_path / "two.npz", domain="levels")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown suffix"):
        load_file_dataset(tmp_path / "x.csv", domain="levels")


def test_a_built_in_model_runs_on_a_file(tmp_path, capsys):
    path = tmp_path / "digits.npz"
    np.savez(path, x=digit_levels())
    out = tmp_path / "run"
    args = ["run", str(DIGITS), "--out", str(out), *QUICK, "--set", 'data.dataset="file"',
            "--set", f'data.file="{path}"', "--set", 'data.domain="levels"', "--set", "data.num_levels=17"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["dataset"] == "file:digits.npz" and summary["data"]["domain"] == "levels"
    config = json.loads((out / "config.json").read_text())["data"]
    assert config["file"] == str(path) and config["num_levels"] == 17


@pytest.mark.parametrize("settings, message", [
    (['data.dataset="file"'], "data.dataset = \"file\" needs data.file"),
    (['data.file="x.npy"'], "data.file applies to data.dataset = \"file\" only"),
    (['data.dataset="file"', 'data.file="missing.npy"'], "data.file missing.npy does not exist"),
    (['data.dataset="file"', 'data.file="x.npy"', 'data.domain="binary"', 'model.likelihood="logistic"',
      'data.binarization="none"'],
     "data.domain = \"binary\" holds 0/1 values"),
])
def test_bad_data_settings_exit_2(tmp_path, capsys, settings, message):
    out = tmp_path / "run"
    args = ["run", str(DIGITS), "--out", str(out), *QUICK]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_file_exits_2_before_anything_is_written(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, nan_array())
    out = tmp_path / "run"
    assert main(["run", str(DIGITS), "--out", str(out), *QUICK, "--set", 'data.dataset="file"',
                 "--set", f'data.file="{path}"']) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert not out.exists()
