"""Every density on its own against torch.distributions (STYLE.md, rule 11)."""

import math

import torch
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal

from gapbench.models import Decoder, bernoulli_log_prob, gaussian_log_prob, standard_normal_log_prob
from gapbench.posteriors import DiagonalGaussian, GaussianEncoder, as_posterior

from conftest import make_linear_gaussian


def test_standard_normal_log_prob(generator):
    z = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64)
    expected = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(standard_normal_log_prob(z), expected, rtol=0, atol=1e-12)


def test_bernoulli_log_prob(generator):
    logits = 3 * torch.randn(5, 4, 7, generator=generator, dtype=torch.float64)
    x = torch.bernoulli(torch.full((4, 7), 0.4, dtype=torch.float64), generator=generator)
    expected = Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    torch.testing.assert_close(bernoulli_log_prob(logits, x), expected, rtol=0, atol=1e-10)


def test_gaussian_log_prob(generator):
    mean = torch.randn(5, 4, 7, generator=generator, dtype=torch.float64)
    log_var = torch.randn(5, 4, 7, generator=generator, dtype=torch.float64)
    x = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    expected = Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(mean, log_var, x), expected, rtol=0, atol=1e-10)
    expected_scalar = Normal(mean, math.exp(0.25)).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(mean, 0.5, x), expected_scalar, rtol=0, atol=1e-10)


def test_diagonal_gaussian_matches_torch(generator):
    mean = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    log_var = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    q = DiagonalGaussian(mean, log_var)
    reference = Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)
    z, log_q = q.rsample_and_log_prob(6, generator=generator)
    assert z.shape == (6, 4, 3) and log_q.shape == (6, 4)
    torch.testing.assert_close(log_q, reference.log_prob(z), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.log_prob(z), reference.log_prob(z), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.entropy(), reference.entropy(), rtol=0, atol=1e-12)


def test_diagonal_gaussian_samples_have_right_moments(generator):
    mean = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    log_var = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64)
    z, _ = DiagonalGaussian(mean, log_var).rsample_and_log_prob(20000, generator=generator)
    n = z.shape[0]
    sample_mean = z.mean(0)[0]
    std = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # the sample mean is within 4 standard errors of the mean; the variance within 4 of its own
    assert torch.all((sample_mean - mean[0]).abs() < 4 * std / math.sqrt(n))
    var_se = std**2 * math.sqrt(2 / (n - 1))
    assert torch.all((z.var(0)[0] - std**2).abs() < 4 * var_se)


def test_as_posterior_fast_path_is_exact(generator):
    loc = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    scale = torch.rand(4, 3, generator=generator, dtype=torch.float64) + 0.1
    dist = Independent(Normal(loc, scale), 1)
    q = as_posterior(dist)
    assert isinstance(q, DiagonalGaussian)
    z, log_q = q.rsample_and_log_prob(5, generator=generator)
    torch.testing.assert_close(log_q, dist.log_prob(z), rtol=0, atol=1e-10)


def test_distribution_posterior_is_reproducible_and_leaves_global_stream(generator):
    mean = torch.zeros(3, 2, dtype=torch.float64)
    dist = MultivariateNormal(mean, covariance_matrix=torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    q = as_posterior(dist)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    z1, log_q1 = q.rsample_and_log_prob(4, generator=torch.Generator().manual_seed(3))
    after = torch.rand(1)
    z2, _ = q.rsample_and_log_prob(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(before, after)  # the global stream did not move
    assert torch.equal(z1, z2)
    torch.testing.assert_close(log_q1, dist.log_prob(z1))


def test_decoder_densities_on_their_own(generator):
    torch.manual_seed(0)
    decoder = Decoder(data_size=7, latent_size=3, hidden_sizes=(5,), activation="elu").double()
    z = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64)
    x = torch.bernoulli(torch.full((2, 7), 0.5, dtype=torch.float64), generator=generator)
    torch.testing.assert_close(decoder.log_prior(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    expected = Bernoulli(logits=decoder.logits(z)).log_prob(x.expand(4, 2, 7)).sum(-1)
    torch.testing.assert_close(decoder.log_likelihood(x, z), expected)


def test_encoder_returns_the_diagonal_gaussian_of_its_network(generator):
    """q(z|x) = N(mu, diag(exp(log_var))), (mu, log_var) the two halves of the network's output: its
    log-density is torch.distributions', and its samples have that mean and variance."""
    torch.manual_seed(0)
    encoder = GaussianEncoder(data_size=7, latent_size=3, hidden_sizes=(5, 5)).double()
    x = torch.rand(4, 7, generator=generator, dtype=torch.float64)
    q = encoder(x)
    assert isinstance(q, DiagonalGaussian)
    mean, log_var = encoder.net(x).detach().chunk(2, -1)  # (B, Z) each
    num_samples = 20000
    z, log_q = q.rsample_and_log_prob(num_samples, generator=generator)  # (K, B, Z), (K, B)
    reference = Independent(Normal(mean, (0.5 * log_var).exp()), 1)
    torch.testing.assert_close(log_q, reference.log_prob(z.detach()))
    z = z.detach()
    z_mean = (z.mean(0) - mean) / (0.5 * log_var).exp() * math.sqrt(num_samples)  # N(0, 1) each
    z_var = (z.var(0) / log_var.exp() - 1) / math.sqrt(2 / (num_samples - 1))  # about N(0, 1) each
    assert z_mean.abs().max() < 4.5 and z_var.abs().max() < 4.5, (z_mean, z_var)


def test_linear_gaussian_densities_on_their_own(generator):
    model, x = make_linear_gaussian()
    z = torch.randn(5, x.shape[0], model.latent_size, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(model.log_prior(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    mean = z @ model.weight.T + model.bias
    expected = Normal(mean, model.sigma).log_prob(x).sum(-1)
    torch.testing.assert_close(model.log_likelihood(x, z), expected)


def test_linear_gaussian_bayes_identity(generator):
    """log p(x) = log p(z) + log p(x|z) - log p(z|x) for every z: checks marginal and posterior."""
    model, x = make_linear_gaussian()
    z = torch.randn(7, x.shape[0], model.latent_size, generator=generator, dtype=torch.float64)
    log_post = model.posterior_distribution(x).log_prob(z)  # (7, B)
    implied = model.log_prior(z) + model.log_likelihood(x, z) - log_post
    torch.testing.assert_close(implied, model.log_marginal(x).expand_as(implied), rtol=0, atol=1e-9)


def test_optimal_diagonal_is_a_stationary_maximum(generator):
    model, x = make_linear_gaussian()
    mean, var = model.optimal_diagonal(x)
    best = model.elbo_diagonal(x, mean, var)
    mean_p = mean.clone().requires_grad_(True)
    log_var_p = var.log().clone().requires_grad_(True)
    elbo = model.elbo_diagonal(x, mean_p, log_var_p.exp()).sum()
    g_mean, g_log_var = torch.autograd.grad(elbo, [mean_p, log_var_p])
    assert g_mean.abs().max() < 1e-9 and g_log_var.abs().max() < 1e-9
    for _ in range(5):
        dm = 0.05 * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        dv = 0.05 * torch.randn(var.shape, generator=generator, dtype=torch.float64)
        assert torch.all(model.elbo_diagonal(x, mean + dm, var * dv.exp()) < best)
    # the family cannot represent the correlated posterior, so there is a strictly positive gap
    assert torch.all(model.log_marginal(x) - best > 1e-3)
