"""The AIS/BDMC figure command (gapbench figure ais) runs end to end on a tiny setting."""

import pandas as pd

from gapbench import io
from gapbench.cli import main as gapbench


def main(args: list[str]) -> int:
    """gapbench figure ais ARGS."""
    return gapbench(["figure", "ais", *args])


def test_figure_and_its_numbers_are_written(tmp_path):
    out = tmp_path / "fig.png"
    assert main(["--out", str(out), "--data-size", "6", "--latent-size", "2", "--num-datapoints", "5",
                 "--num-chains", "3", "--steps", "2", "5"]) == 0
    assert out.stat().st_size > 1000
    frame = io.read_csv(out.with_suffix(".csv"))
    assert list(frame["num_steps"]) == [2, 5]
    assert ((frame["reverse"] - frame["forward"]) - frame["gap"]).abs().max() < 1e-9
    out.unlink()
    assert main(["--out", str(out), "--replot"]) == 0 and out.exists()
    assert isinstance(frame, pd.DataFrame)
