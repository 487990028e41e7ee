"""The Python API on models gapbench has never seen."""

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import gapbench
from gapbench.data import DataError
from gapbench.models import gaussian_log_prob, standard_normal_log_prob

from conftest import make_linear_gaussian


class UserModel(nn.Module):
    """A user's own decoder: Gaussian likelihood with learned variance, sizes gapbench never uses."""

    def __init__(self, data_size=5, latent_size=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_size, 16), nn.Tanh(), nn.Linear(16, data_size))
        self.log_var = nn.Parameter(torch.full((data_size,), -1.0))

    def log_prior(self, z):
        return standard_normal_log_prob(z)

    def log_likelihood(self, x, z):
        return gaussian_log_prob(self.net(z), self.log_var, x)


class UserEncoder(nn.Module):
    def __init__(self, data_size=5, latent_size=3):
        super().__init__()
        self.net = nn.Linear(data_size, 2 * latent_size)

    def forward(self, x):
        mean, log_std = self.net(x).chunk(2, -1)
        return Independent(Normal(mean, log_std.exp()), 1)


def test_user_decoder_and_encoder_work_unchanged():
    torch.manual_seed(0)
    model, encoder = UserModel(), UserEncoder()
    x = torch.randn(7, 5)
    frame, summary = gapbench.measure_gaps(model, encoder, x, num_samples=200, init="encoder",
                                           procedure=gapbench.RefineProcedure(max_steps=200))
    assert len(frame) == 7
    for column in ("elbo_q", "elbo_q_star", "log_px", "approximation", "amortization", "inference",
                   "refine_steps", "refine_converged", "log_px_source"):
        assert column in frame
    for block, key in (("bounds", "elbo_q"), ("bounds", "elbo_q_star"), ("bounds", "log_px"),
                       ("gaps", "approximation"), ("gaps", "amortization"), ("gaps", "inference")):
        assert set(summary[block][key]) >= {"mean", "stderr"}
    # refinement from the encoder's output cannot lose much: L[q*] >= L[q] up to Monte Carlo error
    margin = 4 * torch.tensor((frame["elbo_q_stderr"] ** 2 + frame["elbo_q_star_stderr"] ** 2).to_numpy()).sqrt()
    assert torch.all(torch.tensor(frame["amortization"].to_numpy()) > -margin)


def test_gaps_on_linear_gaussian_match_closed_forms():
    model, x = make_linear_gaussian(data_size=16, latent_size=3, num_datapoints=20, seed=7)
    mean_opt, var_opt = model.optimal_diagonal(x)

    def encoder(x):  # a deliberately imperfect amortized FFG with a known closed-form ELBO
        m, v = model.optimal_diagonal(x)
        return Independent(Normal(m + 0.4, (1.5 * v).sqrt()), 1)

    q_mean, q_var = mean_opt + 0.4, 1.5 * var_opt
    log_px = model.log_marginal(x)
    exact_elbo_q = model.elbo_diagonal(x, q_mean, q_var)
    exact_elbo_q_star = model.elbo_diagonal(x, mean_opt, var_opt)
    frame, summary = gapbench.measure_gaps(model, encoder, x, num_samples=5000, init="prior",
                                           generator=torch.Generator().manual_seed(3))
    n = x.shape[0]
    exact = {
        "approximation": (log_px - exact_elbo_q_star).mean().item(),
        "amortization": (exact_elbo_q_star - exact_elbo_q).mean().item(),
        "inference": (log_px - exact_elbo_q).mean().item(),
    }
    for gap, value in exact.items():
        entry = summary["gaps"][gap]
        # Monte Carlo error of the mean over these datapoints, plus 0.02 nats of optimisation slack
        assert abs(entry["mean"] - value) < 4 * entry["mc_stderr"] + 0.02, (gap, entry, value)
    assert summary["gaps"]["approximation"]["mean"] > 0 and summary["gaps"]["amortization"]["mean"] > 0
    assert n == summary["bounds"]["log_px"]["num_datapoints"]


@pytest.mark.parametrize("value, message", [
    (float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (0.5, "neither 0 nor 1"),
])
def test_data_the_likelihood_does_not_accept_is_refused(value, message):
    torch.manual_seed(0)
    decoder, encoder = gapbench.Decoder(6, 2, (8,)), gapbench.GaussianEncoder(6, 2, (8,))
    x = torch.zeros(3, 6)
    x[1, 2] = value
    with pytest.raises(DataError, match=message):
        gapbench.measure_gaps(decoder, encoder, x, num_samples=10)
    with pytest.raises(DataError, match=r"shape \(3, 5\).*6 pixels"):
        gapbench.measure_gaps(decoder, encoder, torch.zeros(3, 5), num_samples=10)
    # a model without check_data gets the finiteness check only
    model, _ = make_linear_gaussian(data_size=6)
    with pytest.raises(DataError, match="NaN or infinite"):
        gapbench.measure_gaps(model, lambda x: model.posterior_distribution(x), torch.full((2, 6), torch.nan))
def test_ais_joins_log_px_through_the_api():
    """With ais=..., AIS from the encoder's posterior is one more candidate for log p_hat(x); on a
    linear-Gaussian model it lands on the exact log p(x) within its Monte Carlo error, and so does the
    fresh draw of whichever estimator each datapoint chose."""
    model, x = make_linear_gaussian(data_size=16, latent_size=3, num_datapoints=20, seed=7)

    def encoder(x):
        m, v = model.optimal_diagonal(x)
        return Independent(Normal(m + 0.4, (1.5 * v).sqrt()), 1)

    frame, summary = gapbench.measure_gaps(
        model, encoder, x, num_samples=500, init="encoder", procedure=gapbench.RefineProcedure(max_steps=200),
        ais=gapbench.AISProcedure(num_chains=8, num_steps=50), ais_init="encoder",
        generator=torch.Generator().manual_seed(0))
    for column in ("ais", "ais_stderr", "ais_ess", "ais_acceptance_rate", "ais_step_size", "ais_divergence_rate"):
        assert column in frame
    assert set(frame["log_px_source"]) <= {"iwae_q", "iwae_q_star", "ais"}
    assert (frame["max_pilot_bound"] == frame[["iwae_q", "iwae_q_star", "ais"]].max(axis=1)).all()
    for column in ("ais", "log_px"):
        error = torch.tensor(frame[column].to_numpy()) - model.log_marginal(x)
        assert abs(error.mean()) < 4 * error.std() / len(error) ** 0.5 + 0.02, column
    assert summary["bounds"]["log_px"]["num_datapoints"] == 20
