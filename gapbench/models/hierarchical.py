"""A VAE decoder with two stochastic layers: p(z2) p(z1|z2) p(x|z1).

    p(z2)    = N(0, I_{Z2})
    p(z1|z2) = N(mu(z2), diag exp(lambda(z2))),  mu and lambda from one MLP
    p(x|z1)  = the likelihood of :class:`Decoder` with parameters f(z1), f its MLP (Bernoulli by default)

The two layers are held as one joint latent z = concat(z1, z2) of size Z1 + Z2, so the model has
the interface every estimator uses (Sonderby et al., 2016, "Ladder Variational Autoencoders", and
Tomczak, "Deep Generative Modeling", section 4.5, write the same model):

    log_prior(z)         = log p(z2) + log p(z1|z2)     (K, B)
    log_likelihood(x, z) = log p(x|z1)                  (K, B)

AIS tempers log_prior(z) + beta * log_likelihood(x, z): at beta = 0 that is the joint prior
p(z1, z2), at beta = 1 the joint p(x, z1, z2), which is what annealing over both layers needs. Its
chains start from the prior with :meth:`HierarchicalDecoder.sample_prior` (ancestral sampling),
since the joint prior is not N(0, I).
"""

from __future__ import annotations

import torch

from gapbench.models.likelihoods import gaussian_log_prob, standard_normal_log_prob
from gapbench.models.mlp import mlp
from gapbench.models.vae import Decoder


def prior_noise(shape: tuple[int, ...], *, generator, dtype: torch.dtype,
                device: torch.device | str | None) -> torch.Tensor:
    """N(0, I) noise of ``shape = (*lead, size)`` from ``generator``: a ``torch.Generator`` (or None), or a
    per-datapoint stream (anything else with a ``normal(shape, batch_dim=, dtype=)`` method, such as
    ``gapbench.posteriors.DatapointStreams``), whose datapoints lie on the last leading dimension."""
    per_datapoint = generator is not None and not isinstance(generator, torch.Generator)
    if per_datapoint and callable(getattr(generator, "normal", None)):
        return generator.normal(shape, batch_dim=len(shape) - 2, dtype=dtype).to(device=device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


class HierarchicalDecoder(Decoder):
    """p(z2) p(z1|z2) p(x|z1) over the joint latent z = concat(z1, z2).

    Parameters
    ----------
    data_size : D
    latent_size_1 : Z1, the layer next to x
    latent_size_2 : Z2, the top layer
    hidden_sizes : hidden widths of f, z1 -> x
    prior_hidden : hidden widths of the p(z1|z2) network, z2 -> (mu, lambda)
    activation : nonlinearity name
    likelihood, num_levels : p(x|z1), as for :class:`Decoder`

    ``latent_size`` is the joint size Z1 + Z2 (what AIS and ``simulate`` draw).
    """

    def __init__(self, data_size: int, latent_size_1: int, latent_size_2: int,
                 hidden_sizes: tuple[int, ...] = (200, 200), prior_hidden: tuple[int, ...] = (100,),
                 activation: str = "elu", likelihood: str = "bernoulli", num_levels: int = 256):
        super().__init__(data_size, latent_size_1, hidden_sizes, activation, likelihood=likelihood,
                         num_levels=num_levels)
        self.latent_size_1 = latent_size_1
        self.latent_size_2 = latent_size_2
        self.latent_size = latent_size_1 + latent_size_2
        self.prior_net = mlp([latent_size_2, *prior_hidden, 2 * latent_size_1], activation)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., Z1 + Z2) -> z1 (..., Z1), z2 (..., Z2)."""
        return z[..., :self.latent_size_1], z[..., self.latent_size_1:]

    def conditional_prior(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(z1|z2): (..., Z2) -> (..., Z1) each."""
        mean, log_var = self.prior_net(z2).chunk(2, dim=-1)  # (..., Z1) each
        return mean, log_var

    def params(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters from z1 alone: (..., Z1 + Z2) -> (..., P D)."""
        return self.net(self.split(z)[0])

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z2) + log p(z1|z2) for z (K, B, Z1 + Z2); returns (K, B)."""
        z1, z2 = self.split(z)  # (K, B, Z1), (K, B, Z2)
        mean, log_var = self.conditional_prior(z2)  # (K, B, Z1) each
        return standard_normal_log_prob(z2) + gaussian_log_prob(mean, log_var, z1)

    @torch.no_grad()
    def sample_prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Ancestral draws z2 ~ N(0, I), z1 ~ p(z1|z2); returns concat(z1, z2) of shape (*shape, Z1 + Z2)."""
        z2 = prior_noise((*shape, self.latent_size_2), generator=generator, dtype=dtype, device=device)
        mean, log_var = self.conditional_prior(z2)  # (*shape, Z1) each
        noise = prior_noise(tuple(mean.shape), generator=generator, dtype=dtype, device=device)
        return torch.cat([mean + torch.exp(0.5 * log_var) * noise, z2], dim=-1)
