"""Refinement curves against closed forms: zero steps are the amortized ELBO (same noise, same number),
the expected ELBO does not fall along the curve, and it approaches the exact L[q*] of a
linear-Gaussian model; the fraction of the gap closed and its delta-method standard error."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_linear_gaussian
from torch.distributions import Independent, Normal

from gapbench.inference.curves import curve_frame, ratio_of_means, refinement_curve, summarize_curve
from gapbench.estimators import elbo
from gapbench.posteriors import fork_seed

STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200)


def shifted_encoder(model, shift=0.7, var_factor=2.0):
    """A diagonal-Gaussian encoder that misses the optimal diagonal Gaussian by a known amount."""
    def encoder(x):
        mean, var = model.optimal_diagonal(x)
        return Independent(Normal(mean + shift, (var_factor * var).sqrt()), 1)
    return encoder


@pytest.fixture(scope="module")
def lg_curve():
    model, x = make_linear_gaussian(data_size=20, latent_size=4, num_datapoints=200, seed=3)
    encoder = shifted_encoder(model)
    curve = refinement_curve(model, encoder, x, steps=STEPS, num_samples=10, learning_rate=0.05,
                             eval_samples=200, generator=torch.Generator().manual_seed(0))
    mean, var = model.optimal_diagonal(x)
    return model, x, encoder, curve, model.elbo_diagonal(x, mean, var)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_zero_steps_give_exactly_the_amortized_elbo(chunk_size):
    model, x = make_linear_gaussian(num_datapoints=30, seed=1)
    encoder = shifted_encoder(model)
    curve = refinement_curve(model, encoder, x, steps=(3, 0), eval_samples=50, chunk_size=chunk_size,
                             generator=torch.Generator().manual_seed(11))
    seed = fork_seed(torch.Generator().manual_seed(11))  # the evaluation noise is the stream's first draw
    amortized = elbo(model, encoder(x), x, num_samples=50, chunk_size=chunk_size,
                     generator=torch.Generator().manual_seed(seed))
    assert curve.steps.tolist() == [0, 3]
    assert torch.equal(curve.elbo[0], amortized.value)
    assert torch.equal(curve.stderr[0], amortized.stderr)
    assert torch.all(curve.gain_stderr[0] == 0)
    assert not torch.equal(curve.elbo[1], curve.elbo[0])


def test_estimates_agree_with_the_closed_form_elbo(lg_curve):
    """At k = 0 the estimate is the exact ELBO of the encoder's q within its Monte Carlo error."""
    model, x, encoder, curve, _ = lg_curve
    q = encoder(x)
    exact = model.elbo_diagonal(x, q.base_dist.loc, q.base_dist.scale.square())
    z = (curve.elbo[0] - exact) / curve.stderr[0]  # (B,)
    assert abs(float(z.mean())) * math.sqrt(len(z)) < 4  # mean z-score
    assert float(z.std()) == pytest.approx(1.0, abs=0.2)


def test_expected_elbo_does_not_fall_along_the_curve(lg_curve):
    """Between consecutive step counts the mean ELBO change over datapoints is not below zero beyond
    3 standard errors (of that mean change, over datapoints)."""
    _, _, _, curve, _ = lg_curve
    change = curve.elbo[1:] - curve.elbo[:-1]  # (S - 1, B)
    mean = change.mean(1)
    stderr = change.std(1) / math.sqrt(change.shape[1])
    assert torch.all(mean > -3 * stderr), (mean, stderr)
    assert float(mean[:4].min()) > 0  # the first steps clearly gain


def test_curve_approaches_the_exact_optimum(lg_curve):
    _, _, _, curve, best = lg_curve
    mean_best = float(best.mean())
    mc = curve.stderr.square().mean(1).sqrt() / math.sqrt(curve.elbo.shape[1])  # (S,) Monte Carlo stderr of the means
    # never above the optimum beyond noise, and at 200 steps within 0.05 nats of it
    assert torch.all(curve.elbo.mean(1) < mean_best + 4 * mc)
    assert float(curve.elbo[-1].mean()) > mean_best - 0.05
    frame = curve_frame(curve, best)
    summary = summarize_curve(frame, best.numpy())
    assert summary["steps"] == list(STEPS) and summary["num_datapoints"] == 200
    assert summary["fraction_closed"][0] == 0.0
    assert summary["fraction_closed"][-1] > 0.95
    assert summary["fraction_closed"][-1] < 1 + 4 * summary["fraction_closed_stderr"][-1] + 0.01


def test_curve_frame_long_form():
    model, x = make_linear_gaussian(num_datapoints=3, seed=2)
    curve = refinement_curve(model, shifted_encoder(model), x, steps=(0, 2, 4), eval_samples=20,
                             generator=torch.Generator().manual_seed(0))
    best = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    frame = curve_frame(curve, best, offset=10)
    assert list(frame.columns) == ["datapoint", "step", "elbo", "stderr", "gain", "gain_stderr", "diverged",
                                   "gap_closed"]
    assert frame["datapoint"].tolist() == [10, 10, 10, 11, 11, 11, 12, 12, 12]
    assert frame["step"].tolist() == [0, 2, 4] * 3
    row = frame.iloc[4]  # datapoint 11, step 2
    assert row["elbo"] == curve.elbo[1, 1].item()
    assert row["gain"] == pytest.approx(curve.elbo[1, 1].item() - curve.elbo[0, 1].item())
    assert row["gap_closed"] == pytest.approx(row["gain"] / (1.0 - curve.elbo[0, 1].item()))


def test_ratio_of_means_and_its_delta_method_stderr():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 1.0, 400)
    ratio, stderr = ratio_of_means(a, np.full(400, 4.0))  # b constant: se = sd(a) / sqrt(n) / b
    assert ratio == pytest.approx(a.mean() / 4.0)
    assert stderr == pytest.approx(a.std(ddof=1) / 20 / 4.0)
    # with noisy b, the delta method agrees with the spread of the ratio over repeated draws
    ratios, stderrs = [], []
    for _ in range(300):
        b = rng.normal(4.0, 1.0, 200)
        a = 0.5 * b + rng.normal(0.0, 0.5, 200)
        r, s = ratio_of_means(a, b)
        ratios.append(r), stderrs.append(s)
    assert np.std(ratios) == pytest.approx(np.mean(stderrs), rel=0.15)


def test_summary_leaves_out_diverged_datapoints():
    frame = pd.DataFrame({"datapoint": [0, 0, 1, 1, 2, 2], "step": [0, 5] * 3,
                          "elbo": [-10.0, -9.0, -20.0, -18.0, -5.0, np.nan], "stderr": [0.1] * 6,
                          "gain": [0.0, 1.0, 0.0, 2.0, 0.0, np.nan], "gain_stderr": [0.0, 0.1] * 3,
                          "diverged": [False, False, False, False, True, True]})
    summary = summarize_curve(frame, np.array([-8.0, -16.0, 0.0]))
    assert summary["num_datapoints"] == 2 and summary["num_diverged"] == 1
    assert summary["mean_elbo"] == [-15.0, -13.5]
    assert summary["mean_gain"] == [0.0, 1.5]
    assert summary["fraction_closed"] == [0.0, pytest.approx(3.0 / 6.0)]
    assert summary["mean_gain_mc_stderr"][1] == pytest.approx(math.sqrt(0.02) / 2)


def test_bad_settings_are_refused():
    model, x = make_linear_gaussian(num_datapoints=2)
    for bad in ({"steps": ()}, {"steps": (0, 0)}, {"steps": (-1,)}, {"learning_rate": 0.0}, {"gradient": "x"}):
        with pytest.raises(ValueError):
            refinement_curve(model, shifted_encoder(model), x, generator=None, **bad)
    with pytest.raises(TypeError, match="diagonal Gaussian"):
        refinement_curve(model, lambda x: model.posterior_distribution(x), x, generator=None)


class BlowsUp:
    """A linear-Gaussian model whose likelihood is NaN where z_1 < ``threshold``: refinement that
    wanders there diverges."""

    def __init__(self, model, threshold):
        self.model, self.threshold = model, threshold

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_likelihood(self, x, z):
        value = self.model.log_likelihood(x, z)  # (K, B)
        return torch.where(z[..., 0] < self.threshold, torch.nan, value)


def test_a_diverging_datapoint_stops_where_it_was_finite_and_the_others_go_on():
    """The encoder starts 0.7 above the optimum in every coordinate; the likelihood is NaN below a
    threshold that some datapoints' paths to the optimum cross."""
    model, x = make_linear_gaussian(data_size=20, latent_size=4, num_datapoints=40, seed=3)
    encoder = shifted_encoder(model, shift=0.7, var_factor=0.01)
    optimum, _ = model.optimal_diagonal(x)
    threshold = float(optimum[:, 0].median()) + 0.35
    def run(steps):
        return refinement_curve(BlowsUp(model, threshold), encoder, x, steps=steps, eval_samples=20,
                                generator=torch.Generator().manual_seed(0))
    curve, longer = run((0, 20, 100)), run((0, 20, 100, 200))  # the same trajectories, one 100 steps longer
    diverged = curve.is_diverged
    assert 0 < int(diverged.sum()) < 40
    assert torch.all(diverged[optimum[:, 0] < threshold - 0.1])  # their optimum lies in the NaN region
    # a datapoint stopped within 100 steps stays where it stopped: the same ELBO (same noise) at 200
    assert torch.equal(longer.elbo[2, diverged].nan_to_num(), longer.elbo[3, diverged].nan_to_num())
    assert torch.isfinite(longer.elbo[3, diverged]).any()  # kept at their last finite parameters, not NaN ones
    assert torch.equal(longer.elbo[:3].nan_to_num(), curve.elbo.nan_to_num())
    assert torch.all(torch.isfinite(curve.elbo[:, ~diverged]))
    summary = summarize_curve(curve_frame(curve))
    assert summary["num_diverged"] == int(diverged.sum()) and summary["num_datapoints"] == 40 - int(diverged.sum())
