"""ELBO and IWAE against the exact log p(x) of a linear-Gaussian model."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from gapbench.estimators import elbo, iwae
from gapbench.posteriors import DiagonalGaussian

from conftest import make_linear_gaussian


def test_elbo_of_exact_posterior_is_log_px(linear_gaussian, generator):
    model, x = linear_gaussian
    est = elbo(model, model.posterior_distribution(x), x, num_samples=50, generator=generator)
    torch.testing.assert_close(est.value, model.log_marginal(x), rtol=0, atol=1e-8)
    assert torch.all(est.stderr < 1e-8)
    torch.testing.assert_close(est.ess, torch.full_like(est.ess, 50.0))


def test_elbo_matches_closed_form_within_standard_error(linear_gaussian, generator):
    model, x = linear_gaussian
    mean, var = model.optimal_diagonal(x)
    mean = mean + 0.3  # some other diagonal Gaussian
    var = var * 2.0
    est = elbo(model, DiagonalGaussian(mean, var.log()), x, num_samples=4000, generator=generator)
    exact = model.elbo_diagonal(x, mean, var)
    z_scores = (est.value - exact) / est.stderr
    assert torch.all(z_scores.abs() < 4.5), z_scores


def poor_posterior(model, x):
    """A diagonal Gaussian far enough from the posterior that IWAE has room to rise."""
    mean, var = model.optimal_diagonal(x)
    return DiagonalGaussian(mean + 0.5, (var * 3.0).log())


def test_iwae_below_log_px_and_rising_with_k(linear_gaussian, generator):
    model, x = linear_gaussian
    q = poor_posterior(model, x)
    log_px = model.log_marginal(x)
    num_repeats = 200
    means, stderrs = [], []
    for k in (1, 10, 100, 1000):
        values = torch.stack([iwae(model, q, x, num_samples=k, generator=generator).value
                              for _ in range(num_repeats)])  # (R, B)
        means.append(values.mean(0))
        stderrs.append(values.std(0) / math.sqrt(num_repeats))
        # below log p(x) on average, allowing for the Monte Carlo error of the mean over repeats
        assert torch.all(means[-1] < log_px + 3 * stderrs[-1]), (k, means[-1] - log_px)
    for lo, hi, se_lo, se_hi in zip(means[:-1], means[1:], stderrs[:-1], stderrs[1:]):
        assert torch.all(hi > lo - 3 * torch.hypot(se_lo, se_hi))
    # and from K = 1 to K = 1000 it rises by far more than the noise
    assert torch.all(means[-1] - means[0] > 10 * torch.hypot(stderrs[0], stderrs[-1]))


def test_iwae_converges_to_log_px(linear_gaussian, generator):
    model, x = linear_gaussian
    est = iwae(model, poor_posterior(model, x), x, num_samples=200_000, generator=generator)
    z_scores = (est.value - model.log_marginal(x)) / est.stderr
    assert torch.all(z_scores.abs() < 4.5), z_scores


def test_iwae_standard_error_is_calibrated(linear_gaussian, generator):
    model, x = linear_gaussian
    q = poor_posterior(model, x)
    runs = [iwae(model, q, x, num_samples=2000, generator=generator) for _ in range(100)]
    spread = torch.stack([r.value for r in runs]).std(0)  # (B,) empirical standard deviation
    reported = torch.stack([r.stderr for r in runs]).mean(0)  # (B,)
    # the delta-method standard error agrees with the spread over repeats (within ~25% sampling error)
    ratio = reported / spread
    assert torch.all((ratio > 0.6) & (ratio < 1.6)), ratio


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 999])
def test_chunked_and_unchunked_agree(chunk_size):
    model, x = make_linear_gaussian(data_size=9, latent_size=5, num_datapoints=3)
    q = DiagonalGaussian(torch.zeros(3, 5, dtype=torch.float32), torch.zeros(3, 5, dtype=torch.float32))
    model32 = type(model)(model.weight.float(), model.bias.float(), model.sigma)
    whole = iwae(model32, q, x.float(), num_samples=1000, chunk_size=1000,
                 generator=torch.Generator().manual_seed(5))
    chunked = iwae(model32, q, x.float(), num_samples=1000, chunk_size=chunk_size,
                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(chunked.value, whole.value, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.ess, whole.ess, rtol=1e-5, atol=1e-5)
    whole_elbo = elbo(model32, q, x.float(), num_samples=1000, chunk_size=1000,
                      generator=torch.Generator().manual_seed(5))
    chunked_elbo = elbo(model32, q, x.float(), num_samples=1000, chunk_size=chunk_size,
                        generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(chunked_elbo.value, whole_elbo.value, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_elbo.stderr, whole_elbo.stderr, rtol=1e-5, atol=1e-7)


def test_estimators_accept_any_distribution(linear_gaussian, generator):
    """A Distribution with no fast path (a full-covariance MultivariateNormal, off the posterior): the ELBO
    matches log p(x) - KL(q || p(z|x)) from torch.distributions, and IWAE log p(x), within Monte Carlo error."""
    model, x = linear_gaussian
    posterior = model.posterior_distribution(x)
    q = MultivariateNormal(posterior.mean + 0.3, covariance_matrix=1.5 * posterior.covariance_matrix)
    log_px = model.log_marginal(x)
    est = elbo(model, q, x, num_samples=4000, generator=generator)
    z_scores = (est.value - (log_px - kl_divergence(q, posterior))) / est.stderr
    assert torch.all(z_scores.abs() < 4.5), z_scores
    est = iwae(model, q, x, num_samples=4000, generator=generator)
    z_scores = (est.value - log_px) / est.stderr
    assert torch.all(z_scores.abs() < 4.5), z_scores


def test_bad_sample_counts_are_rejected(linear_gaussian, generator):
    model, x = linear_gaussian
    q = poor_posterior(model, x)
    with pytest.raises(ValueError, match="num_samples"):
        iwae(model, q, x, num_samples=0, generator=generator)
    with pytest.raises(ValueError, match="chunk_size"):
        iwae(model, q, x, num_samples=10, chunk_size=0, generator=generator)
