"""Gaps over training: snapshots during training, `gapbench track`, and its figure."""

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.cli import main

from test_cli import DIGITS, QUICK


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    run = tmp_path_factory.mktemp("track") / "run"
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK, "--set", "train.snapshot_every=2", "--quiet"]) == 0
    assert main(["track", str(run), "--num-datapoints", "6", "--num-samples", "50", "--quiet"]) == 0
    return run


def test_snapshots_every_n_epochs_and_the_last(tracked):
    names = sorted(p.name for p in (tracked / "snapshots").iterdir())
    assert names == ["epoch_00002.pt", "epoch_00003.pt"]  # QUICK trains 3 epochs
    snapshot = torch.load(tracked / "snapshots" / "epoch_00003.pt", weights_only=True)
    assert snapshot["epoch"] == 3 and {"decoder", "encoder"} <= set(snapshot)


def test_track_csv_holds_bounds_and_gaps_per_epoch_and_split(tracked, capsys):
    frame = pd.read_csv(tracked / "track.csv")
    assert sorted(frame.epoch.unique()) == [2, 3] and sorted(frame.split.unique()) == ["train", "valid"]
    wide = frame.pivot_table(index=["epoch", "split"], columns="quantity", values="mean")
    np.testing.assert_allclose(wide["approximation"], wide["log_px"] - wide["elbo_q_star"], atol=1e-9)
    np.testing.assert_allclose(wide["amortization"], wide["elbo_q_star"] - wide["elbo_q"], atol=1e-9)
    assert (wide["log_px"] >= wide["elbo_q_star"] - 1e-9).all()
    assert not np.allclose(wide.xs(2, level="epoch")["elbo_q"], wide.xs(3, level="epoch")["elbo_q"])
    for suffix in (".png", ".pdf"):
        assert (tracked / f"gaps_over_training{suffix}").stat().st_size > 5000


def test_figure_track_redraws_from_track_csv(tracked, tmp_path, capsys):
    """gapbench figure track draws the same figure from track.csv alone, without the snapshots."""
    run = tmp_path / "copy"
    run.mkdir()
    (run / "track.csv").write_bytes((tracked / "track.csv").read_bytes())
    assert main(["figure", "track", str(run)]) == 0
    assert (run / "gaps_over_training.png").stat().st_size > 5000
    assert main(["figure", "track", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere.pdf").stat().st_size > 5000
    capsys.readouterr()
    assert main(["figure", "track", str(tmp_path)]) == 2
    assert f"make it with gapbench track {tmp_path}" in capsys.readouterr().err


def test_track_without_snapshots_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(DIGITS), "--out", str(run), *QUICK, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["track", str(run), "--quiet"]) == 2
    assert "train.snapshot_every" in capsys.readouterr().err
