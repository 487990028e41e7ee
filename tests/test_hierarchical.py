"""The two-layer model p(z2) p(z1|z2) p(x|z1) and the structured posterior q(z1|x) q(z2|z1): densities
against torch.distributions, and the ELBO, IWAE and AIS against the exact values of a two-layer
linear-Gaussian model (float64)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal

from gapbench.estimators import AISProcedure, ais, elbo, iwae, simulate
from gapbench.measure import RefineProcedure, local_posterior, measure_gaps
from gapbench.models import HierarchicalDecoder, HierarchicalLinearGaussian, linear_conditional_joint
from gapbench.posteriors import HierarchicalEncoder, HierarchicalFamily, HierarchicalPosterior
from gapbench.inference.refine import refine


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def make_model(data_size=8, z1=3, z2=2, num_datapoints=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = HierarchicalLinearGaussian.random(data_size, z1, z2, scale=1.5, generator=g)
    x, _ = model.sample(num_datapoints, generator=g)
    return model, x


def linear_posterior(mean1, var1, weight, bias, var2) -> HierarchicalPosterior:
    """q(z1) = N(mean1, diag var1), q(z2|z1) = N(W z1 + c, diag var2) as a HierarchicalPosterior whose
    conditional is one linear layer (no hidden layer): output (W z1 + c, log var2)."""
    z2 = weight.shape[0]
    layer_weight = torch.cat([weight, torch.zeros(z2, weight.shape[1], dtype=weight.dtype)])  # (2 Z2, Z1)
    layer_bias = torch.cat([bias, torch.log(var2)])  # (2 Z2,)
    return HierarchicalPosterior({"mean": mean1, "log_var": torch.log(var1), "weight_0": layer_weight,
                                  "bias_0": layer_bias})


def some_q(model, x, seed=1):
    """A structured q that is not the posterior: random mean, variances and linear conditional."""
    g = torch.Generator().manual_seed(seed)
    m, _ = model.posterior(x)
    z1 = model.latent_size_1
    mean1 = m[:, :z1] + 0.3 * torch.randn(x.shape[0], z1, generator=g, dtype=x.dtype)
    var1 = 0.05 + 0.3 * torch.rand(x.shape[0], z1, generator=g, dtype=x.dtype)
    M, c, V = model.top_conditional()
    weight = M + 0.2 * torch.randn(M.shape, generator=g, dtype=x.dtype)
    return (mean1, var1, weight, c + 0.1, torch.diagonal(V) * 1.3)


def good_q(model, x):
    """A structured q near the posterior, wider than it: exact means and conditional, 1.5 x the variances
    (the posterior's correlations within z1 and within z2 are what it misses)."""
    m, S = model.posterior(x)
    z1 = model.latent_size_1
    M, c, V = model.top_conditional()
    var1 = 1.5 * torch.diagonal(S)[:z1].expand(x.shape[0], z1)
    return (m[:, :z1], var1, M, c, 1.5 * torch.diagonal(V))


# --- densities, each on its own ---------------------------------------------------------------------
def test_linear_model_densities_against_torch(generator):
    model, x = make_model()
    z = torch.randn(5, x.shape[0], model.latent_size, generator=generator, dtype=x.dtype)  # (K, B, Z)
    mu0, cov0 = model.prior_moments()
    torch.testing.assert_close(model.log_prior(z), MultivariateNormal(mu0, cov0).log_prob(z))
    z1 = z[..., :model.latent_size_1]
    expected = Independent(Normal(z1 @ model.B.T + model.b, model.var0.sqrt()), 1).log_prob(x)
    torch.testing.assert_close(model.log_likelihood(x, z), expected)
    # log p(x) = log p(x, z) - log p(z|x) at every z: ties prior, likelihood, posterior and marginal together
    log_post = model.posterior_distribution(x).log_prob(z)  # (K, B)
    identity = model.log_prior(z) + model.log_likelihood(x, z) - log_post
    torch.testing.assert_close(identity, model.log_marginal(x).expand_as(identity))


def test_top_conditional_is_the_prior_conditional(generator):
    """p(z2|z1) = p(z1, z2) / p(z1), with p(z1) = N(a, A A^T + S1)."""
    model, _ = make_model()
    z = model.sample_prior((7,), generator=generator)  # (7, Z)
    z1, z2 = model.split(z)
    p_z1 = MultivariateNormal(model.a, model.A @ model.A.T + torch.diag(model.var1))
    M, c, V = model.top_conditional()
    torch.testing.assert_close(model.log_prior(z[:, None])[:, 0] - p_z1.log_prob(z1),
                               MultivariateNormal(z1 @ M.T + c, V).log_prob(z2))


def test_sample_prior_has_the_prior_moments(generator):
    model, _ = make_model()
    z = model.sample_prior((40000,), generator=generator)  # (N, Z)
    mu0, cov0 = model.prior_moments()
    stderr = (torch.diagonal(cov0) / z.shape[0]).sqrt()
    assert torch.all((z.mean(0) - mu0).abs() < 4.5 * stderr)
    torch.testing.assert_close(torch.cov(z.T), cov0, atol=0.1, rtol=0.05)


def test_structured_posterior_density_against_torch(generator):
    model, x = make_model()
    mean1, var1, weight, bias, var2 = some_q(model, x)
    q = linear_posterior(mean1, var1, weight, bias, var2)
    mean, cov = linear_conditional_joint(mean1, var1, weight, bias, var2)
    exact = MultivariateNormal(mean, cov)
    z, log_q = q.rsample_and_log_prob(20000, generator=generator)  # (K, B, Z), (K, B)
    torch.testing.assert_close(log_q, exact.log_prob(z))
    torch.testing.assert_close(q.log_prob(z), exact.log_prob(z))
    stderr = (torch.diagonal(cov, dim1=-2, dim2=-1) / z.shape[0]).sqrt()  # (B, Z)
    assert torch.all((z.mean(0) - mean).abs() < 5 * stderr)


def test_neural_decoder_densities_against_torch(generator):
    torch.manual_seed(0)
    model = HierarchicalDecoder(10, 3, 2, hidden_sizes=(7,), prior_hidden=(5,))
    z = torch.randn(4, 6, 5, generator=generator)
    x = torch.bernoulli(torch.full((6, 10), 0.4), generator=generator)
    z1, z2 = z[..., :3], z[..., 3:]
    mean, log_var = model.prior_net(z2).chunk(2, -1)
    expected = (Independent(Normal(torch.zeros(2), torch.ones(2)), 1).log_prob(z2)
                + Independent(Normal(mean, torch.exp(0.5 * log_var)), 1).log_prob(z1))
    torch.testing.assert_close(model.log_prior(z), expected)
    torch.testing.assert_close(model.log_likelihood(x, z),
                               Independent(Bernoulli(logits=model.net(z1)), 1).log_prob(x))
    assert model.latent_size == 5
    assert model.sample_prior((3, 6), generator=generator).shape == (3, 6, 5)
    x_sim, z_sim = simulate(model, 4, generator=generator)
    assert x_sim.shape == (4, 10) and z_sim.shape == (4, 5)


# --- the ELBO against closed forms ----------------------------------------------------------------
def expected_log_normal(mean_r, cov_r, var):
    """E[log N(r; 0, diag var)] for r ~ N(mean_r (B, n), cov_r (B, n, n))."""
    quad = (mean_r.square() / var).sum(-1) + (torch.diagonal(cov_r, dim1=-2, dim2=-1) / var).sum(-1)
    return -0.5 * (var.numel() * math.log(2 * math.pi) + torch.log(var).sum() + quad)


def tomczak_terms(model, x, mean1, var1, weight, bias, var2):
    """Tomczak's ELBO, E_q[ln p(x|z1) - KL(q(z1|x) || p(z1|z2)) - KL(q(z2|z1) || p(z2))], term by term
    in closed form for a linear conditional q(z2|z1) = N(W z1 + c, diag var2); the KL terms are
    expectations under q(z1|x) q(z2|z1) of the log-density ratios (z2 depends on z1). Each (B,)."""
    V1 = torch.diag_embed(var1)  # (B, Z1, Z1)
    # ln p(x|z1): u = x - B z1 - b
    log_lik = expected_log_normal(x - mean1 @ model.B.T - model.b, model.B @ V1 @ model.B.T, model.var0)
    # ln p(z1|z2): r = z1 - A z2 - a = (I - A W) z1 - A c - a - A e2, e2 ~ N(0, diag var2)
    G = torch.eye(model.latent_size_1, dtype=x.dtype) - model.A @ weight
    mean_r = mean1 @ G.T - model.A @ bias - model.a
    cov_r = G @ V1 @ G.T + model.A @ torch.diag(var2) @ model.A.T
    neg_entropy_1 = -0.5 * (1 + math.log(2 * math.pi) + torch.log(var1)).sum(-1)  # E ln q(z1|x)
    kl_1 = neg_entropy_1 - expected_log_normal(mean_r, cov_r, model.var1)
    # KL(q(z2|z1) || N(0, I)) = 1/2 [tr V2 + |W z1 + c|^2 - Z2 - log|V2|], averaged over z1
    mean_sq = (mean1 @ weight.T + bias).square().sum(-1) + (weight @ V1 @ weight.T).diagonal(dim1=-2, dim2=-1).sum(-1)
    kl_2 = 0.5 * (var2.sum() + mean_sq - var2.numel() - torch.log(var2).sum())
    return log_lik, kl_1, kl_2


def test_tomczak_elbo_equals_log_px_minus_kl():
    model, x = make_model()
    q_args = some_q(model, x)
    log_lik, kl_1, kl_2 = tomczak_terms(model, x, *q_args)
    exact = model.elbo_gaussian(x, *linear_conditional_joint(*q_args))
    torch.testing.assert_close(log_lik - kl_1 - kl_2, exact, rtol=0, atol=1e-9)
    assert torch.all(exact < model.log_marginal(x))


def test_sampled_terms_match_tomczak_in_expectation(generator):
    """The estimators' sampled form log p(x|z1) + [log p(z1|z2) - log q(z1|x)] + [log p(z2) - log q(z2|z1)]
    has Tomczak's three terms as its expectations, term by term."""
    model, x = make_model()
    q_args = some_q(model, x)
    mean1, var1 = q_args[:2]
    q = linear_posterior(*q_args)
    z, log_q = q.rsample_and_log_prob(20000, generator=generator)
    z1, z2 = model.split(z)
    log_q1 = Independent(Normal(mean1, var1.sqrt()), 1).log_prob(z1)
    log_p1 = Independent(Normal(z2 @ model.A.T + model.a, model.var1.sqrt()), 1).log_prob(z1)
    log_p2 = Independent(Normal(torch.zeros_like(z2), 1.0), 1).log_prob(z2)
    sampled = (model.log_likelihood(x, z), log_q1 - log_p1, (log_q - log_q1) - log_p2)  # each (K, B)
    for name, samples, exact in zip(("log p(x|z1)", "KL_1", "KL_2"), sampled, tomczak_terms(model, x, *q_args)):
        stderr = samples.std(0) / math.sqrt(samples.shape[0])
        assert torch.all((samples.mean(0) - exact).abs() < 4.5 * stderr), name


def test_elbo_estimator_matches_the_exact_elbo(generator):
    model, x = make_model(num_datapoints=20)
    q_args = some_q(model, x)
    est = elbo(model, linear_posterior(*q_args), x, num_samples=5000, generator=generator)
    exact = model.elbo_gaussian(x, *linear_conditional_joint(*q_args))
    z_scores = (est.value - exact) / est.stderr
    assert z_scores.abs().max() < 4.5
    assert abs(z_scores.sum().item()) / math.sqrt(len(z_scores)) < 4


def test_exact_conditionals_give_log_px_with_every_sample(generator):
    """With Z1 = Z2 = 1, q(z1|x) = p(z1|x) and q(z2|z1) = p(z2|z1) is the exact joint posterior
    (p(z2|z1, x) = p(z2|z1)), so every log-weight is log p(x): ELBO = IWAE = log p(x), no noise."""
    model, x = make_model(data_size=5, z1=1, z2=1)
    m, S = model.posterior(x)
    M, c, V = model.top_conditional()
    q = linear_posterior(m[:, :1], S[0, 0].expand(x.shape[0], 1), M, c, torch.diagonal(V))
    exact = model.log_marginal(x)
    for estimator in (elbo, iwae):
        est = estimator(model, q, x, num_samples=100, generator=generator)
        torch.testing.assert_close(est.value.to(exact.dtype), exact, rtol=0, atol=1e-9)
        assert torch.all(est.stderr < 1e-6)


def test_iwae_matches_log_px(generator):
    model, x = make_model(num_datapoints=20)
    est = iwae(model, linear_posterior(*good_q(model, x)), x, num_samples=5000, generator=generator)
    exact = model.log_marginal(x)
    assert torch.all(est.ess > 500)
    assert torch.all((est.value - exact).abs() < 4.5 * est.stderr + 1e-3)  # 1e-3: IWAE-5000's bias, var(w) / 2k


@pytest.mark.parametrize("init", ["prior", "q"])
def test_ais_matches_log_px(init, generator):
    """AIS over the joint latent, from the joint prior (ancestral draws) or from a structured q."""
    model, x = make_model(num_datapoints=40)
    start = None if init == "prior" else linear_posterior(*some_q(model, x))
    est = ais(model, x, init=start, procedure=AISProcedure(num_chains=16, num_steps=400), generator=generator)
    diff = est.value - model.log_marginal(x)  # (B,)
    mean, stderr = diff.mean().item(), (diff.std() / math.sqrt(diff.numel())).item()
    assert abs(mean) < 4 * stderr, (mean, stderr)


# --- encoder, local family, refinement ------------------------------------------------------------
def test_local_family_starts_exactly_at_the_encoder(generator):
    torch.manual_seed(0)
    encoder = HierarchicalEncoder(10, 3, 2, hidden_sizes=(8,), conditional_hidden=(6,))
    decoder = HierarchicalDecoder(10, 3, 2, hidden_sizes=(8,), prior_hidden=(6,))
    x = torch.bernoulli(torch.full((5, 10), 0.5), generator=generator)
    family = HierarchicalFamily(3, 2, (6,))
    q = encoder(x)
    params = family.init_params(5, 5, like=x, init_from=q)
    assert params["weight_0"].shape == (5, 6, 3) and params["bias_1"].shape == (5, 4)
    seed = 7
    amortized = elbo(decoder, q, x, num_samples=50, generator=torch.Generator().manual_seed(seed))
    local = elbo(decoder, family.posterior(params), x, num_samples=50, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(local.value, amortized.value, rtol=0, atol=1e-5)
    # zero refinement steps: the refined posterior is the encoder's
    result = local_posterior(decoder, encoder, x, family=family, init="encoder", generator=generator,
                             procedure=RefineProcedure(max_steps=1, learning_rate=1e-12))
    torch.testing.assert_close(result.params["mean"], q.params["mean"].detach(), atol=1e-6, rtol=0)


def test_prior_start_is_standard_normal(generator):
    family = HierarchicalFamily(3, 2, (6, 4))
    like = torch.zeros((), dtype=torch.float64)
    q = family.posterior(family.init_params(4, 5, like=like, generator=generator))
    z, log_q = q.rsample_and_log_prob(10, generator=generator)
    torch.testing.assert_close(log_q, Independent(Normal(torch.zeros(5, dtype=z.dtype), 1.0), 1).log_prob(z))
    with pytest.raises(ValueError, match="Z1 \\+ Z2"):
        family.init_params(4, 4, like=like)


def test_refinement_reaches_the_exact_posterior(generator):
    """The local family with a linear conditional contains p(z|x) when Z1 = Z2 = 1; refinement from the
    prior-like start gets L[q*] to log p(x)."""
    model, x = make_model(data_size=5, z1=1, z2=1, num_datapoints=8)
    family = HierarchicalFamily(1, 1, (), activation="elu")
    init = family.init_params(x.shape[0], 2, like=x, generator=generator)
    result = refine(model, x, family=family, init_params=init, **RefineProcedure()._asdict(), generator=generator)
    est = elbo(model, family.posterior(result.params), x, num_samples=2000, generator=generator)
    gap = model.log_marginal(x) - est.value
    assert torch.all(gap > -4.5 * est.stderr - 1e-9)
    assert gap.max() < 0.01, gap


def test_measure_gaps_with_the_hierarchical_family(generator):
    """The Python API on the two-layer linear-Gaussian model: the encoder is a fixed structured q with
    shifted means, the local family has a linear conditional; L[q] is exact, IWAE under q* finds log p(x)
    and the amortization gap is the shift's cost."""
    model, x = make_model(num_datapoints=10)

    def encoder_args(x):
        mean1, var1, weight, bias, var2 = good_q(model, x)
        return mean1 + 0.5, var1, weight, bias, var2

    family = HierarchicalFamily(model.latent_size_1, model.latent_size_2, ())
    frame, summary = measure_gaps(model, lambda x: linear_posterior(*encoder_args(x)), x, family=family,
                                  init="encoder", num_samples=2000, generator=generator)
    assert (frame["fault"] == "ok").all()
    exact_elbo_q = model.elbo_gaussian(x, *linear_conditional_joint(*encoder_args(x))).numpy()
    assert (abs(frame["elbo_q"] - exact_elbo_q) < 4.5 * frame["elbo_q_stderr"]).all()
    exact = model.log_marginal(x).numpy()
    assert (abs(frame["iwae_q_star"] - exact) < 4.5 * frame["iwae_q_star_stderr"] + 0.01).all()
    assert frame["amortization"].min() > 0.05 and summary["gaps"]["amortization"]["mean"] > 0.3


def test_mean_field_ffg_over_both_layers_through_the_api(generator):
    """family="ffg" on a two-layer model is a diagonal Gaussian over (z1, z2), started from one fitted to
    the encoder's samples; refined, its mean is the posterior's (as the optimal diagonal Gaussian's)."""
    model, x = make_model(num_datapoints=6)
    result = local_posterior(model, lambda x: linear_posterior(*good_q(model, x)), x, family="ffg",
                             init="encoder", generator=generator)
    mean, log_var = result.params["mean"], result.params["log_var"]
    assert mean.shape == (6, model.latent_size)
    exact = model.elbo_gaussian(x, mean, torch.diag_embed(log_var.exp()))
    assert torch.all(exact < model.log_marginal(x))
    m, _ = model.posterior(x)
    assert (mean - m).abs().max() < 0.2  # the optimal diagonal Gaussian has the posterior's mean
