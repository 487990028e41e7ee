"""`gapbench run` with the two-layer model (model.kind = "hierarchical") end to end on digits, its config
rules, and one-layer configs that read exactly as before the second layer existed."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cli import QUICK

from gapbench.cli import main
from gapbench.runner.config import parse_config
from gapbench.runner.run import open_run
from gapbench.models import HierarchicalDecoder
from gapbench.posteriors import HierarchicalPosterior

ROOT = Path(__file__).resolve().parents[1]
HIERARCHICAL = ROOT / "experiments" / "digits_hierarchical.toml"
SMALL = ["--set", "model.encoder_hidden=[32]", "--set", "model.decoder_hidden=[32]",
         "--set", "model.prior_hidden=[16]", "--set", "model.latent_size=6", "--set", "model.latent_size_2=3"]


@pytest.fixture(scope="module")
def hierarchical_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hier"
    assert main(["run", str(HIERARCHICAL), "--out", str(out), *QUICK, *SMALL]) == 0
    return out


def test_hierarchical_run_measures_every_bound(hierarchical_run):
    summary = json.loads((hierarchical_run / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["model"]["kind"] == "hierarchical"
    assert settings["model"]["latent_size_2"] == 3 and settings["model"]["prior_hidden"] == [16]
    assert settings["encoder_family"] == "hierarchical" and settings["refinement"]["families"] == ["hierarchical"]
    assert settings["refinement"]["procedures"]["hierarchical"]["learning_rate"] == 0.2  # the FFG's preset
    assert summary["faults"]["num_faulty"] == 0
    assert set(summary["other_bounds"]) == {"iwae_q", "iwae_q_star_hierarchical", "ais"}
    frame = pd.read_csv(hierarchical_run / "datapoints.csv")
    assert len(frame) == 24 and frame[["elbo_q", "elbo_q_star", "ais", "log_px"]].notna().all().all()
    # refinement starts at the encoder's posterior, so it cannot end clearly below it
    gap = summary["gaps"]["amortization"]
    assert gap["mean"] > -3 * gap["mc_stderr"]
    # q* holds every parameter per datapoint: q(z1)'s and the conditional network's
    q_star = torch.load(hierarchical_run / "local.pt", weights_only=True)["hierarchical"]
    assert q_star["mean"].shape == (24, 6) and q_star["weight_0"].shape == (24, 16, 6)
    assert q_star["weight_1"].shape == (24, 6, 16)


def test_hierarchical_run_reopens_with_its_networks(hierarchical_run):
    _, decoder, encoder, x = open_run(hierarchical_run, num_datapoints=5)
    assert isinstance(decoder, HierarchicalDecoder) and decoder.latent_size == 9
    q = encoder(x)
    assert isinstance(q, HierarchicalPosterior)
    z, log_q = q.rsample_and_log_prob(3, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 5, 9) and torch.isfinite(log_q).all()


@pytest.mark.parametrize("overrides, message", [
    (["--set", 'refine.families=["ffg"]'], 'leave model.posterior and refine.families out'),
    (["--set", 'model.posterior="flow"'], 'leave model.posterior and refine.families out'),
    (["--set", 'model.kind="mlp"', "--set", 'refine.families=["hierarchical"]'], 'needs a two-layer model'),
    (["--set", "model.prior_hidden=[0]"], "prior_hidden widths must be positive"),
    (["--set", "model.latent_size_2=0"], "model.latent_size_2"),
])
def test_bad_hierarchical_config_exits_2(tmp_path, capsys, overrides, message):
    out = tmp_path / "never"
    assert main(["run", str(HIERARCHICAL), "--out", str(out), "--quiet", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_one_layer_config_has_no_second_layer_keys():
    """So config.json, stage hashes, checkpoints and baselines of one-layer runs are as before."""
    resolved = parse_config({"name": "x"}).model_dump(mode="json")
    assert not {"latent_size_2", "prior_hidden"} & set(resolved["model"])
    assert parse_config(resolved).model.kind == "mlp"


def test_ais_from_the_refined_hierarchical_posterior(hierarchical_run, tmp_path):
    """ais.init = "q_star" rebuilds each batch's q(z1) q(z2|z1) from local.pt (it needs log q at any z)."""
    import shutil
    run = tmp_path / "hier"
    shutil.copytree(hierarchical_run, run)
    assert main(["run", str(HIERARCHICAL), "--out", str(run), *QUICK, *SMALL, "--set", 'ais.init="q_star"',
                 "--force"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["settings"]["ais"]["init"] == "q_star" and summary["faults"]["num_faulty"] == 0
    assert 0 < summary["ais"]["mean_acceptance_rate"] < 1
