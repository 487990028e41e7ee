"""The 2-D posterior figure's numbers against closed forms, and the figure on a small saved run."""

import pytest

from gapbench.posteriors import DiagonalGaussian
from gapbench.cli import main as gapbench
from gapbench.report.figures.posterior import kl_on_grid, true_posterior_grid

from conftest import make_linear_gaussian


def test_grid_posterior_matches_the_linear_gaussian_closed_forms():
    """On a linear-Gaussian model with a correlated 2-D posterior: the grid's log p(x) is the exact
    marginal, and the grid KL of the optimal diagonal Gaussian is its exact gap, log p(x) - ELBO."""
    model, x = make_linear_gaussian(data_size=6, latent_size=2, num_datapoints=3, seed=2)
    for i in range(3):
        xi = x[i:i + 1]
        grid = true_posterior_grid(model, xi, size=200)
        exact = float(model.log_marginal(xi)[0])
        assert grid["log_px"] == pytest.approx(exact, abs=1e-3)
        mean, var = model.optimal_diagonal(xi)
        q = DiagonalGaussian(mean, var.log())
        log_q = q.log_prob(grid["zz"].unsqueeze(1).to(mean.dtype))[:, 0]
        gap = exact - float(model.elbo_diagonal(xi, mean, var)[0])
        assert gap > 0.05  # the posterior is correlated: the FFG has a real gap to get right
        assert kl_on_grid(log_q, grid["log_post"], grid["area"]) == pytest.approx(gap, abs=2e-3)


def test_figure_of_a_run_without_a_2d_latent_is_refused(tmp_path, capsys):
    from test_cli import DIGITS, QUICK

    run = tmp_path / "run"
    assert gapbench(["run", str(DIGITS), "--out", str(run), *QUICK, "--quiet"]) == 0
    assert gapbench(["figure", "posterior", str(run), "--out", str(tmp_path / "fig")]) == 2
    assert "needs 2-D" in capsys.readouterr().err


def test_posterior_figure_is_written(tmp_path):
    from test_cli import QUICK
    from pathlib import Path

    experiment = Path(__file__).resolve().parents[1] / "experiments" / "digits_2d.toml"
    run = tmp_path / "run"
    assert gapbench(["run", str(experiment), "--out", str(run), *QUICK, "--set", "model.flow_hidden=8",
                     "--quiet"]) == 0
    assert gapbench(["figure", "posterior", str(run), "--datapoints", "0", "5", "--out", str(tmp_path / "posterior")]) == 0
    for suffix in (".png", ".pdf"):
        assert (tmp_path / f"posterior{suffix}").stat().st_size > 5000
