"""log p_hat(x) without selection bias (gapbench.estimators.log_px), checked against exact log p(x) on
linear-Gaussian models with encoders of three qualities."""

import numpy as np
import pandas as pd
import pytest
import torch

import gapbench
from gapbench.estimators import Estimate
from gapbench.estimators.log_px import NO_CANDIDATE, fresh_estimate, select_estimators

from conftest import make_linear_gaussian

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_DATAPOINTS = 200
NUM_SAMPLES = 5000


@pytest.fixture(scope="module")
def model_and_data():
    return make_linear_gaussian(data_size=16, latent_size=3, num_datapoints=NUM_DATAPOINTS, seed=7)


@pytest.fixture(scope="module", params=[0.5, 6.0, 20.0], ids=["gap0.5", "gap6", "gap20"])
def measured(request, model_and_data):
    model, x = model_and_data
    encoder, gap = model.perturbed_encoder(x, request.param)
    assert gap == pytest.approx(request.param, rel=1e-3)
    frame, summary = gapbench.measure_gaps(model, encoder, x, num_samples=NUM_SAMPLES, init="encoder",
                                           generator=torch.Generator().manual_seed(1))
    return request.param, frame, summary


def test_log_px_is_not_biased_upward(measured, model_and_data):
    """mean(log p_hat - exact) <= 0.02 nats + 3 Monte Carlo stderrs, for every encoder quality."""
    model, x = model_and_data
    _, frame, summary = measured
    error = frame["log_px"].to_numpy() - model.log_marginal(x).numpy()
    mc_stderr = summary["bounds"]["log_px"]["mc_stderr"]
    assert error.mean() <= 0.02 + 3 * mc_stderr, (error.mean(), mc_stderr)
    assert np.isfinite(error).all() and (frame["fault"] == "ok").all()


def test_the_old_maximum_fails_the_same_check_with_a_poor_encoder(measured, model_and_data):
    """The check above can fail: the per-datapoint maximum of the pilot bounds (kept as the diagnostic
    column max_pilot_bound) overshoots exact log p(x) once the encoder is poor."""
    model, x = model_and_data
    amortization_gap, frame, summary = measured
    if amortization_gap < 1:
        pytest.skip("with a good encoder both proposals are tight and the maximum's bias is small")
    error = frame["max_pilot_bound"].to_numpy() - model.log_marginal(x).numpy()
    assert error.mean() > 0.02 + 3 * summary["bounds"]["log_px"]["mc_stderr"]


def test_approximation_gap_within_0_05_nats_of_exact(measured, model_and_data):
    model, x = model_and_data
    _, frame, summary = measured
    mean, var = model.optimal_diagonal(x)
    exact = (model.log_marginal(x) - model.elbo_diagonal(x, mean, var)).mean().item()
    assert abs(summary["gaps"]["approximation"]["mean"] - exact) < 0.05, (summary["gaps"]["approximation"], exact)


def test_stderr_covers_exact_log_px_at_the_nominal_rate(measured, model_and_data):
    """|log p_hat - exact| <= 2 stderr for 90-98% of 200 datapoints (nominal 95%)."""
    model, x = model_and_data
    _, frame, _ = measured
    error = np.abs(frame["log_px"].to_numpy() - model.log_marginal(x).numpy())
    coverage = np.mean(error <= 2 * frame["log_px_stderr"].to_numpy())
    assert 0.90 <= coverage <= 0.98, coverage


def test_every_bound_names_its_estimator(measured):
    _, frame, _ = measured
    assert set(frame["log_px_source"]) <= {"iwae_q", "iwae_q_star"}
    for column in ("log_px", "log_px_stderr", "log_px_ess", "max_pilot_bound"):
        assert frame[column].notna().all()


def pilot(**columns):
    """A pilot frame: name=(values, stderrs, esss)."""
    data = {}
    for name, (value, stderr, ess) in columns.items():
        data.update({name: value, f"{name}_stderr": stderr, f"{name}_ess": ess})
    return pd.DataFrame(data)


def test_selection_penalises_stderr_and_single_weight_estimates():
    frame = pilot(iwae_q=([-9.0, -9.0, -9.0, np.nan], [1.0, 0.1, 0.01, 0.1], [1.5, 50, 50, 5]),
                  iwae_q_star=([-9.5, -9.5, -9.5, np.nan], [0.01, 0.01, 0.01, 0.1], [100, 100, 100, 5]))
    chosen = select_estimators(frame, ("iwae_q", "iwae_q_star"))
    # 0: one weight (ESS < 2); 1: -9.2 against -9.52; 2: clearly better; 3: nothing finite
    assert list(chosen) == ["iwae_q_star", "iwae_q", "iwae_q", NO_CANDIDATE]
    # penalty 0 and no ESS guard: the largest pilot value
    assert list(select_estimators(frame, ("iwae_q", "iwae_q_star"), penalty=0, min_ess=0))[:3] == ["iwae_q"] * 3


def test_unhealthy_ais_is_never_chosen_and_a_missing_flag_means_healthy():
    columns = {"iwae_q": ([-10.0, -10.0], [0.01, 0.01], [100, 100]), "ais": ([-9.0, -9.0], [0.01, 0.01], [16, 16])}
    assert list(select_estimators(pilot(**columns), ("iwae_q", "ais"))) == ["ais", "ais"]
    flagged = pilot(**columns).assign(ais_unhealthy=[True, False])
    assert list(select_estimators(flagged, ("iwae_q", "ais"))) == ["iwae_q", "ais"]


def test_fresh_estimate_calls_each_chosen_estimator_once_on_its_datapoints():
    calls = {}

    def make(name, offset):
        def fn(positions):
            calls[name] = positions.tolist()
            value = positions.double() + offset
            return Estimate(value, torch.full_like(value, 0.1), torch.full_like(value, 7.0))
        return fn

    chosen = np.array(["a", "b", "a", NO_CANDIDATE])
    fresh = fresh_estimate(chosen, {"a": make("a", 100.0), "b": make("b", 200.0), "c": make("c", 0.0)})
    assert calls == {"a": [0, 2], "b": [1]}
    np.testing.assert_array_equal(fresh.value.numpy(), [100.0, 201.0, 102.0, np.nan])
    assert torch.isnan(fresh.stderr[3]) and fresh.ess[0] == 7.0
