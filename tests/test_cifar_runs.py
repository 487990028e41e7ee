"""`gapbench run` on the CIFAR-10 experiments, end to end on tiny fake CIFAR-10 batches and a tiny
convolutional VAE: the discretised logistic likelihood, FFG and flow encoders on convolutional features,
refinement and AIS unchanged, the settings recorded, and binarisation refused."""

import json

import pytest
import torch
from test_cli import ROOT
from test_data_cifar10 import write_folder

from gapbench.cli import main
from gapbench.runner.config import load_config, parse_config
from gapbench.data import cifar10, load_dataset
from gapbench.runner.run import evaluation_data, networks_for, open_run
from gapbench.models import ConvDecoder

PER_BATCH, NUM_TEST, NUM_VALID = 8, 4, 8
TINY = ["--set", "model.conv_channels=[4, 8]", "--set", "model.latent_size=4", "--set", "model.flow_hidden=8",
        "--set", "train.epochs=2", "--set", "train.schedule=\"constant\"", "--set", "train.warmup_epochs=1",
        "--set", "train.batch_size=16", "--set", "train.valid_every=1", "--set", "eval.num_datapoints=6",
        "--set", "eval.num_samples=50", "--set", "eval.batch_size=6", "--set", "refine.max_steps=20",
        "--set", "ais.num_steps=5", "--set", "ais.num_chains=2", "--set", "ais.init=\"encoder\"", "--quiet"]


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """A folder of six tiny batches (40 training images: 32 train, 8 valid; 4 test)."""
    root = tmp_path_factory.mktemp("cifar")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("test_data_cifar10.PER_BATCH", PER_BATCH)
        patch.setattr("test_data_cifar10.NUM_TEST", NUM_TEST)
        write_folder(root / "cifar-10-batches-py", seed=0)
    return root


@pytest.fixture(autouse=True)
def small_counts(monkeypatch, tmp_path):
    monkeypatch.setattr(cifar10, "NUM_IMAGES", {"train": 5 * PER_BATCH, "test": NUM_TEST})
    monkeypatch.setattr(cifar10, "NUM_VALID", NUM_VALID)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)


@pytest.mark.parametrize("experiment, family", [("cifar10_ffg.toml", "ffg"), ("cifar10_flow.toml", "flow")])
def test_cifar_experiment_runs_end_to_end(fake_cifar, tmp_path, experiment, family):
    out = tmp_path / "run"
    args = ["run", str(ROOT / "experiments" / experiment), "--out", str(out), "--set", f"data.data_dir=\"{fake_cifar}\"",
            *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["dataset"] == "cifar10" and settings["encoder_family"] == family
    assert settings["binarization"]["mode"] == "none"
    assert settings["likelihood"] == {"name": "logistic", "num_levels": 256, "bits": 8}
    assert settings["model"]["kind"] == "conv" and settings["model"]["conv_channels"] == [4, 8]
    assert summary["faults"]["num_faulty"] == 0
    bounds = summary["bounds"]
    # log-probabilities of 3072 discrete pixels: below 0, and the bounds in order on average
    assert bounds["elbo_q"]["mean"] <= bounds["log_px"]["mean"] < 0
    assert bounds["elbo_q_star_ffg"]["mean"] <= bounds["log_px"]["mean"]
    assert "elbo_q_star_flow" in bounds and "ais" in summary["other_bounds"]
    # the run reopens: conv decoder, evaluation data are the pixel levels k / 255 of the first images
    _, decoder, _, x = open_run(out)
    assert isinstance(decoder, ConvDecoder) and x.shape == (6, 3072)
    assert torch.equal(x * 255, (x * 255).round())


def test_cifar_binarisation_is_refused(fake_cifar, tmp_path, capsys):
    out = tmp_path / "refused"
    args = ["run", str(ROOT / "experiments" / "cifar10_ffg.toml"), "--out", str(out),
            "--set", "data.binarization=\"dynamic\"", *TINY]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "data.binarization = 'dynamic' does not apply to model.likelihood = \"logistic\"" in error
    assert not out.exists()


def test_logistic_evaluation_data_are_the_levels_unchanged():
    """With the discretised logistic nothing is binarised: the evaluation data are the split's first
    datapoints as they are (digits: 17 levels k / 16), and the MLP decoder accepts them."""
    config = parse_config({"name": "l", "model": {"likelihood": "logistic"}, "eval": {"num_datapoints": 30}})
    assert config.data.binarization == "none"
    dataset = load_dataset("digits")
    x = evaluation_data(config, dataset)
    assert torch.equal(x, dataset.train[:30]) and dataset.num_levels == 17
    decoder, _ = networks_for(config, dataset)
    decoder.check_data(x)
    assert decoder.log_likelihood(x, torch.zeros(2, 30, config.model.latent_size)).shape == (2, 30)


def test_binarised_cifar_with_bernoulli_and_3_bit_cifar_configs():
    """The authors' code binarised CIFAR-10 for a Bernoulli decoder: that is model.likelihood = "bernoulli"
    (binarisation then defaults to dynamic); 3-bit CIFAR is data.bits = 3."""
    path = ROOT / "experiments" / "cifar10_ffg.toml"
    bernoulli = load_config(path, ["model.likelihood=\"bernoulli\"", "data.binarization=\"static\""])
    assert bernoulli.model.likelihood == "bernoulli" and bernoulli.data.binarization == "static"
    assert load_config(path, ["data.bits=3"]).data.bits == 3
