"""The AIS/BDMC figure: its data against the exact log p(x), and the command (gapbench figure ais) end to end
on a tiny setting."""

from gapbench import io
from gapbench.cli import main as gapbench
from gapbench.report.figures.ais import sandwich_by_steps


def main(args: list[str]) -> int:
    """gapbench figure ais ARGS."""
    return gapbench(["figure", "ais", *args])


def test_the_sandwich_closes_on_the_exact_column():
    """At many annealing steps forward and reverse AIS are within Monte Carlo error of the frame's exact
    log p(x) (a wrong exact column or a broken AIS moves them out); at one step the sandwich is wide."""
    frame = sandwich_by_steps(data_size=6, latent_size=2, num_datapoints=20, num_chains=8, steps=(1, 200), seed=0,
                              log=lambda message: None)
    one, many = frame.iloc[0], frame.iloc[1]
    assert many.forward_error_stderr < 0.1 and many.reverse_error_stderr < 0.1  # tight enough to tell
    assert abs(many.forward_error) < 4 * many.forward_error_stderr, many.forward_error
    assert abs(many.reverse_error) < 4 * many.reverse_error_stderr, many.reverse_error
    # one step: the upper bound far above the exact value, and the sandwich far wider
    assert one.reverse_error > 4 * one.reverse_error_stderr
    assert many.gap < one.gap - 3 * one.gap_stderr


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
