"""Gap decomposition, log p_hat(x) selection, summaries and the Markdown table."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.estimators import Estimate, elbo, iwae
from gapbench.gaps import decompose, gap_frame, summarize, summarize_column
from gapbench.estimators.log_px import selected_log_px
from gapbench.posteriors import DiagonalGaussian
from gapbench.report import gap_table_markdown
from gapbench.report.tables import format_mean_stderr

from conftest import make_linear_gaussian


def est(values, stderrs):
    v = torch.tensor(values, dtype=torch.float64)
    return Estimate(v, torch.tensor(stderrs, dtype=torch.float64), torch.ones_like(v))


def fresh_fn(values):
    """A stand-in fresh estimator: fixed values at the given positions, stderr 0.05."""
    def fn(positions):
        v = torch.tensor(values, dtype=torch.float64)[positions]
        return Estimate(v, torch.full_like(v, 0.05), torch.full_like(v, 100.0))
    return fn


FRESH = {"iwae_q": fresh_fn([-8.25, -17.75, -29.25, -38.25]), "iwae_q_star": fresh_fn([-8.75, -17.25, -28.25, -38.75])}


def test_gap_frame_decomposes_exactly():
    frame = gap_frame(
        {"elbo_q": est([-10.0, -20.0, -30.0], [0.1, 0.1, 0.1]),
         "elbo_q_star": est([-9.0, -18.0, -29.5], [0.2, 0.2, 0.2]),
         "iwae_q": est([-8.0, -17.5, -29.0], [0.3, 0.3, 0.3]),
         "iwae_q_star": est([-8.5, -17.0, -28.0], [0.4, 0.5, 0.6])},
        log_px=lambda pilot: selected_log_px(pilot, ("iwae_q", "iwae_q_star"), FRESH),
    )
    # pilot minus 2 stderrs: iwae_q -8.6, -18.1, -29.6; iwae_q_star -9.3, -18.0, -29.2
    assert list(frame["log_px_source"]) == ["iwae_q", "iwae_q_star", "iwae_q_star"]
    np.testing.assert_allclose(frame["log_px"], [-8.25, -17.25, -28.25])  # the fresh draws
    np.testing.assert_allclose(frame["max_pilot_bound"], [-8.0, -17.0, -28.0])
    np.testing.assert_allclose(frame["log_px_stderr"], [0.05, 0.05, 0.05])
    np.testing.assert_allclose(frame["approximation"], [0.75, 0.75, 1.25])
    np.testing.assert_allclose(frame["amortization"], [1.0, 2.0, 0.5])
    np.testing.assert_allclose(frame["inference"], [1.75, 2.75, 1.75])  # log_px - elbo_q
    np.testing.assert_allclose(frame["amortization_stderr"], np.hypot(0.2, 0.1))


def test_gaps_of_a_linear_gaussian_model_are_the_closed_form_divergences():
    """On a linear-Gaussian model p(z|x) = N(m(x), Lambda^-1) with Lambda = I + W^T W / sigma^2. The best
    diagonal Gaussian q* = N(m, diag(1 / Lambda_ii)) has KL(q* || p(z|x)) = (sum_i log Lambda_ii -
    log det Lambda) / 2 for every x: the approximation gap. An encoder q = N(m + delta, diag(1 / Lambda_ii))
    has KL(q || p) - KL(q* || p) = delta^T Lambda delta / 2: the amortization gap. The gap frame, from
    Monte Carlo ELBO and IWAE estimates, must match both within its standard errors."""
    model, x = make_linear_gaussian(data_size=12, latent_size=3, num_datapoints=30, seed=2)
    weight, bias, sigma = model.weight, model.bias, model.sigma
    precision = torch.eye(3, dtype=torch.float64) + weight.T @ weight / sigma**2  # Lambda (Z, Z)
    post_mean = (x - bias) @ weight @ torch.linalg.inv(precision) / sigma**2  # m(x) (B, Z)
    log_var = -torch.diagonal(precision).log().expand_as(post_mean)  # (B, Z)
    delta = torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)
    q_star, q = DiagonalGaussian(post_mean, log_var), DiagonalGaussian(post_mean + delta, log_var)
    approximation = 0.5 * (torch.diagonal(precision).log().sum() - torch.logdet(precision)).item()
    amortization = 0.5 * (delta @ precision @ delta).item()
    assert approximation > 0.05 and amortization > 0.05  # large enough to be told from zero

    g = torch.Generator().manual_seed(0)
    bounds = {"elbo_q": elbo(model, q, x, num_samples=2000, generator=g),
              "elbo_q_star": elbo(model, q_star, x, num_samples=2000, generator=g),
              "iwae_q": iwae(model, q, x, num_samples=2000, generator=g),
              "iwae_q_star": iwae(model, q_star, x, num_samples=2000, generator=g)}

    def fresh(posterior):
        return lambda positions: iwae(model, DiagonalGaussian(posterior.mean[positions], posterior.log_var[positions]),
                                      x[positions], num_samples=2000, generator=g)

    frame = gap_frame(bounds, log_px=lambda pilot: selected_log_px(
        pilot, ("iwae_q", "iwae_q_star"), {"iwae_q": fresh(q), "iwae_q_star": fresh(q_star)}))
    # log p_hat(x) is a fresh IWAE draw: within its standard errors of the exact log p(x)
    z_log_px = (frame["log_px"] - model.log_marginal(x).numpy()) / frame["log_px_stderr"]
    assert z_log_px.abs().max() < 4.5, z_log_px.abs().max()
    for gap, exact in (("approximation", approximation), ("amortization", amortization),
                       ("inference", approximation + amortization)):
        z = (frame[gap] - exact) / frame[f"{gap}_stderr"]  # per datapoint
        assert z.abs().max() < 4.5, (gap, z.abs().max())
        summary = summarize_column(frame[gap], frame[f"{gap}_stderr"])
        assert abs(summary["mean"] - exact) < 4 * summary["mc_stderr"], (gap, summary, exact)


def test_summaries_match_numpy():
    rng = np.random.default_rng(0)
    values = pd.Series(rng.normal(size=50))
    se = pd.Series(np.full(50, 0.2))
    s = summarize_column(values, se)
    assert s["mean"] == pytest.approx(values.mean())
    assert s["stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(50))
    assert s["mc_stderr"] == pytest.approx(0.2 / math.sqrt(50))
    assert s["num_datapoints"] == 50
    with_nan = pd.Series([1.0, np.nan, 3.0])
    assert summarize_column(with_nan)["mean"] == 2.0 and summarize_column(with_nan)["num_datapoints"] == 2


def test_table_holds_the_summary_numbers():
    frame = decompose(pd.DataFrame({
        "elbo_q": [-10.0, -12.0], "elbo_q_stderr": [0.0, 0.0],
        "elbo_q_star": [-9.0, -11.0], "elbo_q_star_stderr": [0.0, 0.0],
        "log_px": [-8.5, -10.0], "log_px_stderr": [0.0, 0.0],
    }))
    summary = summarize(frame)
    table = gap_table_markdown(summary)
    # each mean to the decimal of its standard error's second significant digit
    assert "| L[q] | -11.0 | 1.0 |" in table  # datapoints -10, -12: stderr 1.0
    assert "| L[q*] | -10.0 | 1.0 |" in table
    assert "| approximation gap | 0.75 | 0.25 |" in table  # 0.5, 1.0
    assert "| amortization gap | 1.0 | 0.0 |" not in table and "| amortization gap | 1.000 | 0.000 |" in table
    assert "| inference gap | 1.75 | 0.25 |" in table


@pytest.mark.parametrize("mean, stderr, shown", [
    (0.31234, 0.0025, ("0.3123", "0.0025")),  # the stderr that "0.31 ± 0.00" rounded away
    (-88.1234, 0.314, ("-88.12", "0.31")),
    (12.34, 1.54, ("12.3", "1.5")),
    (1234.7, 151.0, ("1235", "151")),  # no negative decimals: whole nats at most
    (0.5, 0.0, ("0.500", "0.000")),  # no spread at all: three decimals
    (0.5, float("nan"), ("0.500", "nan")),
])
def test_numbers_are_shown_to_the_precision_their_stderr_warrants(mean, stderr, shown):
    assert format_mean_stderr(mean, stderr) == shown


def test_faults_are_flagged_counted_and_left_out_of_every_mean():
    frame = gap_frame(
        {"elbo_q": est([-10.0, np.nan, -30.0, -40.0], [0.1] * 4),
         "elbo_q_star": est([-9.0, -18.0, -29.5, -39.0], [0.2] * 4),
         "iwae_q": est([-8.0, -17.5, np.inf, -38.0], [0.3] * 4),
         "iwae_q_star": est([-8.5, -17.0, -28.0, -38.5], [0.4] * 4)},
        log_px=lambda pilot: selected_log_px(pilot, ("iwae_q", "iwae_q_star"), FRESH),
        extra={"refine_diverged": torch.tensor([False, False, False, True])},
    )
    assert list(frame["fault"]) == ["ok", "elbo_q_not_finite", "iwae_q_not_finite", "refine_diverged"]
    summary = summarize(frame)
    assert summary["faults"] == {"num_datapoints": 4, "num_faulty": 3,
                                 "counts": {"elbo_q_not_finite": 1, "iwae_q_not_finite": 1, "refine_diverged": 1}}
    # the means cover the same (fault-free) datapoints, so the gaps of the means are the means of the gaps
    for block in ("bounds", "gaps"):
        assert all(entry["num_datapoints"] == 1 for entry in summary[block].values())
    assert summary["bounds"]["elbo_q"]["mean"] == -10.0 and summary["gaps"]["amortization"]["mean"] == 1.0
    table = gap_table_markdown(summary)
    assert "3 of 4 datapoints had numerical faults" in table
