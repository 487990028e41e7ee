"""Runs with flow encoders and several local families, the cross-family table, and configs (and
checkpoints) written before flows existed."""

import csv
import io
import json

import pandas as pd
import pytest
import torch

from gapbench.cli import main
from gapbench.runner.config import ConfigError, parse_config
from gapbench.runner.migrate import comparable_config
from gapbench.runner.run import build_networks, load_checkpoint
from gapbench.posteriors import AuxiliaryCouplingFlow, AuxiliaryFlowEncoder
from gapbench.report.tables import format_mean_stderr

from test_cli import DIGITS, QUICK

FLOW_QUICK = [*QUICK, "--set", "model.flow_hidden=16"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A model trained with an FFG encoder and one trained with the auxiliary flow; both refine the
    FFG and the flow locally (the two columns of Cremer et al., 2018, Table 2)."""
    root = tmp_path_factory.mktemp("table2")
    both = ["--set", 'refine.families=["ffg", "flow"]']
    assert main(["run", str(DIGITS), "--out", str(root / "ffg"), *FLOW_QUICK, *both]) == 0
    assert main(["run", str(DIGITS), "--out", str(root / "flow"), *FLOW_QUICK, *both,
                 "--set", 'model.posterior="flow"']) == 0
    return root / "ffg", root / "flow"


@pytest.mark.slow  # two_runs trains two models and refines local flows (96 s on a loaded 2-core machine)
def test_flow_run_uses_its_encoder_family(two_runs):
    _, flow_run = two_runs
    columns = (flow_run / "local.csv").read_text().splitlines()[0].split(",")
    for name in ("elbo_q_star_ffg", "iwae_q_star_flow", "refine_steps_flow", "refine_diverged_ffg"):
        assert name in columns, name
    summary = json.loads((flow_run / "summary.json").read_text())
    assert summary["settings"]["encoder_family"] == "flow"
    assert summary["settings"]["refinement"]["families"] == ["ffg", "flow"]
    assert summary["settings"]["refinement"]["procedures"]["flow"]["learning_rate"] == 0.1  # the flows' preset
    bounds, gaps = summary["bounds"], summary["gaps"]
    assert bounds["elbo_q_star"] == bounds["elbo_q_star_flow"]  # the run's gaps use L[q*_Flow]
    assert gaps["amortization"]["mean"] == pytest.approx(bounds["elbo_q_star_flow"]["mean"] - bounds["elbo_q"]["mean"])
    assert gaps["approximation"]["mean"] == pytest.approx(bounds["log_px"]["mean"] - bounds["elbo_q_star_flow"]["mean"])
    assert "iwae_q_star_ffg" in summary["other_bounds"] and "iwae_q_star_flow" in summary["other_bounds"]
    # the checkpoint records the family and reloads into the flow encoder
    checkpoint = torch.load(flow_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["posterior"] == "flow" and checkpoint["config"]["model"]["posterior"] == "flow"
    config = parse_config(checkpoint["config"])
    _, encoder = build_networks(config, 64)
    encoder.load_state_dict(checkpoint["encoder"])
    assert isinstance(encoder, AuxiliaryFlowEncoder)
    assert isinstance(encoder(torch.rand(2, 64)), AuxiliaryCouplingFlow)
    # the local q* parameters are per datapoint
    params = torch.load(flow_run / "local.pt", weights_only=True)["flow"]
    assert all(v.shape[0] == 24 for v in params.values()) and params["c0.v.w1"].shape == (24, 16, 16)


@pytest.mark.slow  # two_runs, as above
def test_cross_family_table(two_runs, tmp_path, capsys):
    ffg_run, flow_run = two_runs
    out = tmp_path / "table"
    assert main(["table", str(ffg_run), str(flow_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summaries = [json.loads((run / "summary.json").read_text()) for run in (ffg_run, flow_run)]
    markdown = (out / "gap_table.md").read_text()
    assert markdown.splitlines()[0] == "| | q_FFG | q_Flow |"
    labels = [line.split("|")[1].strip() for line in markdown.splitlines()[2:] if line.startswith("|")]
    assert labels == ["log p̂(x)", "L[q*_Flow]", "L[q*_FFG]", "L[q]", "approximation", "amortization", "inference"]
    s = summaries[1]
    flow = summaries[0]['bounds']['elbo_q_star_flow']
    assert f"| L[q*_Flow] | {format_mean_stderr(flow['mean'], flow['stderr'])[0]} ±" in markdown
    assert " ± ".join(format_mean_stderr(s['gaps']['amortization']['mean'], s['gaps']['amortization']['stderr'])) \
        + " |" in markdown
    assert markdown.splitlines()[0] in printed
    rows = list(csv.DictReader(io.StringIO((out / "gap_table.csv").read_text())))
    assert len(rows) == 7 * 2
    by_key = {(r["quantity"], r["encoder_family"]): float(r["mean"]) for r in rows}
    assert by_key["elbo_q_star_ffg", "ffg"] == summaries[0]["bounds"]["elbo_q_star_ffg"]["mean"]  # full precision
    assert by_key["inference", "flow"] == s["gaps"]["inference"]["mean"]
    latex = (out / "gap_table.tex").read_text()
    assert latex.startswith(r"\begin{tabular}{lrr}") and r"$q_{\mathrm{Flow}}$" in latex
    assert r"$\mathcal{L}[q^*_{\mathrm{FFG}}]$" in latex and latex.count(r"\\") == 8


def test_table_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["table", str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err


# --- configuration -------------------------------------------------------------------------------------

def test_families_default_to_the_encoders_and_the_old_key_still_reads():
    assert parse_config({"name": "a"}).refine.families == ["ffg"]
    assert parse_config({"name": "a", "model": {"posterior": "iaf"}}).refine.families == ["iaf"]
    assert parse_config({"name": "a", "refine": {"family": "ffg"}}).refine.families == ["ffg"]
    assert "family" not in parse_config({"name": "a", "refine": {"family": "ffg"}}).model_dump()["refine"]


def test_flow_init_at_its_default_leaves_old_folders_alone():
    """refine.flow_init at its default is not in the resolved config (so folders made before it existed keep
    their stage hashes); set, it is, and it changes the local stage's hash."""
    from gapbench.runner.stage_table import section_hash
    default = parse_config({"name": "a", "refine": {"families": ["ffg", "flow"]}})
    on_ffg = parse_config({"name": "a", "refine": {"families": ["ffg", "flow"], "flow_init": "q_star_ffg"}})
    assert "flow_init" not in default.model_dump(mode="json")["refine"]
    assert on_ffg.model_dump(mode="json")["refine"]["flow_init"] == "q_star_ffg"
    assert section_hash(default.model_dump(mode="json"), "local") != section_hash(on_ffg.model_dump(mode="json"), "local")
    assert section_hash(default.model_dump(mode="json"), "ais") == section_hash(on_ffg.model_dump(mode="json"), "ais")


@pytest.mark.slow  # trains a small model and refines the FFG and the flow (~30 s)
def test_local_flows_start_on_the_local_ffg(tmp_path):
    """refine.flow_init = "q_star_ffg": each local flow starts at the identity on top of the FFG's q* of the
    same run (recomputed from the FFG's streams), so L[q*_Flow] is not below L[q*_FFG] beyond noise, the
    FFG's own numbers are those of a run without the option, and the summary records the setting."""
    both = ["--set", 'refine.families=["ffg", "flow"]', "--set", "ais.enabled=false"]
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "prior"), *FLOW_QUICK, *both]) == 0
    assert main(["run", str(DIGITS), "--out", str(tmp_path / "on_ffg"), *FLOW_QUICK, *both,
                 "--set", 'refine.flow_init="q_star_ffg"']) == 0
    prior, on_ffg = (pd.read_csv(tmp_path / run / "local.csv").set_index("index") for run in ("prior", "on_ffg"))
    pd.testing.assert_series_equal(prior["elbo_q_star_ffg"], on_ffg["elbo_q_star_ffg"])
    gain = on_ffg["elbo_q_star_flow"] - on_ffg["elbo_q_star_ffg"]
    noise = (on_ffg["elbo_q_star_flow_stderr"] ** 2 + on_ffg["elbo_q_star_ffg_stderr"] ** 2) ** 0.5
    assert (gain > -4 * noise).all(), gain[gain <= -4 * noise]
    assert not prior["elbo_q_star_flow"].equals(on_ffg["elbo_q_star_flow"])
    summary = json.loads((tmp_path / "on_ffg" / "summary.json").read_text())
    assert summary["settings"]["refinement"]["flow_init"] == "q_star_ffg"
    assert "flow_init" not in json.loads((tmp_path / "prior" / "summary.json").read_text())["settings"]["refinement"]


@pytest.mark.slow  # trains a small flow model and refines the FFG and the flow (~30 s)
def test_local_flows_start_from_a_flow_encoder(tmp_path):
    """refine.flow_init = "encoder" with refine.init = "prior": the local flow starts at the flow encoder's
    own q (its output as per-datapoint parameters), so L[q*_Flow] does not fall below L[q] beyond noise."""
    assert main(["run", str(DIGITS), "--out", str(tmp_path), *FLOW_QUICK, "--set", 'model.posterior="flow"',
                 "--set", 'refine.families=["ffg", "flow"]', "--set", "ais.enabled=false",
                 "--set", 'refine.init="prior"', "--set", 'refine.flow_init="encoder"']) == 0
    frame = pd.read_csv(tmp_path / "amortized.csv").set_index("index").join(
        pd.read_csv(tmp_path / "local.csv").set_index("index"))
    gain = frame["elbo_q_star_flow"] - frame["elbo_q"]
    noise = (frame["elbo_q_star_flow_stderr"] ** 2 + frame["elbo_q_stderr"] ** 2) ** 0.5
    assert (gain > -4 * noise).all(), gain[gain <= -4 * noise]
    refinement = json.loads((tmp_path / "summary.json").read_text())["settings"]["refinement"]
    assert refinement["init"] == "prior" and refinement["flow_init"] == "encoder"


@pytest.mark.parametrize("raw, message", [
    ({"refine": {"family": "ffg", "families": ["ffg"]}}, "refine.family and refine.families are both given"),
    ({"model": {"posterior": "flow"}, "refine": {"families": ["ffg"]}}, "must include the encoder's family"),
    ({"refine": {"families": ["ffg", "ffg"]}}, "lists a family twice"),
    ({"refine": {"families": []}}, "refine.families is empty"),
    ({"refine": {"families": ["maf"]}}, "refine.families.0"),
    ({"model": {"posterior": "real-nvp"}}, "model.posterior"),
    ({"refine": {"flow_init": "q_star_ffg"}}, "refine.flow_init = \"q_star_ffg\" sets where local flows start"),
    ({"refine": {"families": ["ffg", "flow"], "flow_init": "prior"}}, "refine.flow_init"),
])
def test_bad_family_settings_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config({"name": "a", **raw})


def test_run_folders_from_before_flows_still_open(tmp_path):
    """A config.json written before model.posterior and refine.families existed (as runs/fm100's):
    the new keys take their defaults, refine.family becomes refine.families, and its checkpoint
    matches the resolved config."""
    old = {"name": "old", "seed": 0,
           "data": {"dataset": "digits", "data_dir": None, "download": True, "binarization": "dynamic",
                    "threshold": 0.5},
           "model": {"latent_size": 4, "encoder_hidden": [8], "decoder_hidden": [8], "activation": "elu"},
           "train": {"epochs": 1, "batch_size": 100, "learning_rate": 0.001, "adam_eps": 1e-8,
                     "warmup_epochs": 0.0, "schedule": "constant", "valid_every": 1, "valid_num_samples": 10,
                     "early_stopping_patience": 0},
           "eval": {"split": "train", "num_datapoints": 5, "num_samples": 10, "chunk_size": None, "batch_size": 1000},
           "refine": {"family": "ffg", "init": "prior", "procedure": "gapbench", "num_samples": None,
                      "learning_rate": None, "max_steps": None, "check_every": None, "patience": None,
                      "lr_decay": None, "min_improvement": None, "gradient": None}}
    config = parse_config(old)
    assert config.model.posterior == "ffg" and config.refine.families == ["ffg"]
    current = config.model_dump(mode="json")
    assert comparable_config(old, current) == current
    decoder, encoder = build_networks(config, 64)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "gapbench-checkpoint", "format_version": 1, "config": old, "data_size": 64,
                "decoder": decoder.state_dict(), "encoder": encoder.state_dict(), "best_epoch": 1,
                "best_valid_elbo": -40.0, "epochs_run": 1}, path)
    load_checkpoint(path, config, 64)  # no "different config" error
