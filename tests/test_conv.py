"""The discretised logistic likelihood (against closed forms and torch.distributions) and the
convolutional VAE (shapes, the Model interface, encoders of every family on convolutional features)."""

import math

import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from gapbench.runner.config import parse_config
from gapbench.data import DataError
from gapbench.runner.run import build_networks
from gapbench.models import ConvDecoder, ConvTrunk, Decoder, discretized_logistic_log_prob, discretized_logistic_sample
from gapbench.posteriors import (
    AuxiliaryCouplingFlow,
    DiagonalGaussian,
    InverseAutoregressiveFlow,
    PlanarFlow,
    as_posterior,
    make_encoder,
)


def logistic(mean: torch.Tensor, scale: torch.Tensor) -> TransformedDistribution:
    """Logistic(mean, scale) from torch.distributions: the inverse sigmoid of a uniform, shifted and scaled."""
    base = Uniform(torch.zeros_like(mean), torch.ones_like(mean))
    return TransformedDistribution(base, [SigmoidTransform().inv, AffineTransform(mean, scale)])


@pytest.mark.parametrize("num_levels", [2, 8, 256])
def test_masses_sum_to_one_and_match_the_logistic_cdf(num_levels):
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(5, generator=g, dtype=torch.float64) * 1.4 - 0.2  # (5,), some outside [0, 1]
    log_scale = torch.rand(5, generator=g, dtype=torch.float64) * 4 - 5  # scales e^-5 .. e^-1
    levels = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)  # (L,)
    cdf = logistic(mean, log_scale.exp()).cdf  # batch shape (5,)
    h = 0.5 / (num_levels - 1)
    upper = torch.where(levels[:, None] < 1 - h, cdf((levels + h)[:, None].expand(-1, 5)), 1.0)  # (L, 5)
    lower = torch.where(levels[:, None] > h, cdf((levels - h)[:, None].expand(-1, 5)), 0.0)
    for d in range(5):  # one pixel per call (D = 1), every level as a datapoint (B = L)
        log_masses = discretized_logistic_log_prob(mean[d].expand(1, num_levels, 1), log_scale[d].expand(1, num_levels, 1),
                                                   levels[:, None], num_levels=num_levels)  # (1, L)
        masses = log_masses[0].exp()
        assert masses.sum().item() == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(masses, upper[:, d] - lower[:, d], rtol=1e-9, atol=1e-12)


def test_far_tail_bins_are_exact_in_float32():
    """A bin hundreds of scales from the mean: the naive difference of sigmoids underflows in float32,
    the stable form matches the float64 closed form."""
    mean, log_scale = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[math.log(0.002), math.log(0.002)]]])
    x = torch.tensor([[0.2, 0.9]])  # 150 and 200 scales away
    got = discretized_logistic_log_prob(mean, log_scale, x, num_levels=256)
    m, s, h = 0.5, 0.002, 0.5 / 255
    expected = 0.0

    def sigmoid(t: float) -> float:  # float64
        return 1.0 / (1.0 + math.exp(-t))

    for value in (0.2, 0.9):
        u, l = (value + h - m) / s, (value - h - m) / s
        # sigmoid(u) - sigmoid(l) below the mean, = sigmoid(-l) - sigmoid(-u) above it (no cancellation)
        mass = sigmoid(u) - sigmoid(l) if value < m else sigmoid(-l) - sigmoid(-u)
        expected += math.log(mass)
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_samples_follow_the_masses():
    """Frequencies of 40000 draws against the masses, within 5 binomial standard errors."""
    num_levels, n = 8, 40_000
    mean, log_scale = torch.tensor(0.3, dtype=torch.float64), torch.tensor(math.log(0.15), dtype=torch.float64)
    draws = discretized_logistic_sample(mean.expand(n), log_scale.expand(n), num_levels=num_levels,
                                        generator=torch.Generator().manual_seed(1))  # (n,)
    levels = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    masses = discretized_logistic_log_prob(mean.expand(1, num_levels, 1), log_scale.expand(1, num_levels, 1),
                                           levels[:, None], num_levels=num_levels)[0].exp()
    counts = torch.stack([(draws == v).sum() for v in levels]).double()
    assert counts.sum() == n  # every draw is a level
    stderr = (masses * (1 - masses) / n).sqrt()
    assert ((counts / n - masses).abs() <= 5 * stderr + 1e-12).all()


@pytest.mark.parametrize("image_shape, channels", [((3, 32, 32), (8, 16, 32)), ((1, 28, 28), (4, 8, 8)),
                                                   ((1, 8, 8), (4,))])
def test_conv_decoder_mirrors_the_encoder_shapes(image_shape, channels):
    decoder = ConvDecoder(image_shape, 5, channels, likelihood="logistic")
    trunk = ConvTrunk(image_shape, channels)
    d = math.prod(image_shape)
    z = torch.randn(2, 3, 5)
    assert decoder.params(z).shape == (2, 3, 2 * d)  # means, then log-scales
    assert trunk(torch.rand(3, d)).shape == (3, trunk.feature_size)


def test_conv_log_likelihood_is_the_per_sample_density():
    """(K, B) at once equals one sample at a time, and the Bernoulli version equals torch.distributions."""
    torch.manual_seed(0)
    decoder = ConvDecoder((3, 8, 8), 4, (4, 8), likelihood="logistic", num_levels=8).double()
    x = torch.randint(0, 8, (3, 192), dtype=torch.float64) / 7  # (B, D) levels
    z = torch.randn(5, 3, 4, dtype=torch.float64)
    together = decoder.log_likelihood(x, z)  # (K, B)
    one_by_one = torch.cat([decoder.log_likelihood(x, z[k:k + 1]) for k in range(5)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-9)
    params = decoder.params(z)  # (K, B, 2D)
    mean, log_scale = params[..., :192], params[..., 192:]
    expected = discretized_logistic_log_prob(mean, log_scale, x, num_levels=8)
    torch.testing.assert_close(together, expected)
    bernoulli = ConvDecoder((1, 8, 8), 4, (4,), likelihood="bernoulli").double()
    xb = torch.randint(0, 2, (3, 64), dtype=torch.float64)
    reference = torch.distributions.Bernoulli(logits=bernoulli.params(z)).log_prob(xb).sum(-1)
    torch.testing.assert_close(bernoulli.log_likelihood(xb, z), reference)
    torch.testing.assert_close(bernoulli.log_prior(z), torch.distributions.Normal(0, 1).log_prob(z).sum(-1))


def test_decoders_check_their_data():
    logistic_decoder = Decoder(4, 2, (3,), likelihood="logistic", num_levels=17)
    logistic_decoder.check_data(torch.tensor([[0.0, 1 / 16, 0.5, 1.0]]))
    with pytest.raises(DataError, match="not among the 17 levels"):
        logistic_decoder.check_data(torch.tensor([[0.0, 0.03, 0.5, 1.0]]))
    with pytest.raises(DataError, match="neither 0 nor 1"):
        Decoder(4, 2, (3,)).check_data(torch.tensor([[0.0, 0.5, 0.5, 1.0]]))


@pytest.mark.parametrize("family, posterior_type", [("ffg", DiagonalGaussian), ("flow", AuxiliaryCouplingFlow),
                                                    ("planar", PlanarFlow), ("iaf", InverseAutoregressiveFlow)])
def test_every_encoder_family_runs_on_conv_features(family, posterior_type):
    """Each family's q(z|x) from convolutional features is a normalised density with the log q it reports:
    for a Gaussian p0 fitted to other draws (narrower, so the weights have finite variance),
    E_q[p0(z) / q(z)] = 1 (the auxiliary flow reports q(z, v) / r(v|z), and E_q(z,v)[p0(z) r(v|z) / q(z, v)]
    = 1 too); a constant of 0.03 nats in log q moves the mean out. The flows start at the identity, so
    every weight is moved by 0.05 first (larger moves give weights too heavy-tailed for this check; the
    flows' log-determinants are checked exactly in test_flows.py)."""
    torch.manual_seed(0)
    trunk = ConvTrunk((3, 8, 8), (4, 8))
    encoder = make_encoder(family, 192, 4, (), "elu", num_steps=2, flow_hidden=8, trunk=trunk).double()
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn(param.shape, dtype=param.dtype))
    x = torch.rand(3, 192, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    posterior = encoder(x)
    assert isinstance(posterior, posterior_type)
    q, generator = as_posterior(posterior), torch.Generator().manual_seed(0)
    with torch.no_grad():
        fit, _ = q.rsample_and_log_prob(2000, generator=generator)  # (K, B, Z)
        p0 = torch.distributions.Independent(torch.distributions.Normal(fit.mean(0), 0.7 * fit.std(0)), 1)
        num_samples = 20000
        z, log_q = q.rsample_and_log_prob(num_samples, generator=generator)  # (K, B, Z), (K, B)
    weights = (p0.log_prob(z) - log_q).exp()  # (K, B)
    z_scores = (weights.mean(0) - 1) / (weights.std(0) / math.sqrt(num_samples))
    assert torch.all(z_scores.abs() < 4.5), z_scores
    # the conv trunk is part of the encoder and learns: log q's gradient reaches its first convolution
    first = next(p for name, p in encoder.named_parameters() if name.startswith(("trunk.", "net.0.")))
    _, log_q = q.rsample_and_log_prob(4, generator=generator)
    (grad,) = torch.autograd.grad(log_q.sum(), first)
    assert grad.abs().sum() > 0


def test_build_networks_for_conv_configs():
    config = parse_config({"name": "c", "data": {"dataset": "cifar10"},
                           "model": {"kind": "conv", "conv_channels": [4, 8], "latent_size": 3}})
    assert config.model.likelihood == "logistic" and config.data.binarization == "none"
    decoder, encoder = build_networks(config, 3072, image_shape=(3, 32, 32), num_levels=256)
    assert isinstance(decoder, ConvDecoder) and decoder.likelihood.num_levels == 256
    assert isinstance(encoder(torch.rand(2, 3072)), DiagonalGaussian)
    digits = parse_config({"name": "d", "model": {"kind": "conv", "conv_channels": [4, 4, 4, 4]}})
    with pytest.raises(Exception, match="too small for 4 stride-2 convolutions"):
        build_networks(digits, 64, image_shape=(8, 8))
