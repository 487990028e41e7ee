"""The generative half of a VAE: prior N(0, I) and a decoder network giving the parameters of p(x|z).

``DecoderBase`` is the Model interface (``log_prior``, ``log_likelihood``) on top of any network
``params(z)`` and a likelihood (``gapbench.models.likelihoods``): Bernoulli for binarised images,
the discretised logistic for pixel levels. ``Decoder`` is the MLP decoder; the convolutional one is
``gapbench.models.conv.ConvDecoder``. The encoder (amortized posterior) lives in
``gapbench.posteriors.amortized``; this module knows nothing of inference.
"""

from __future__ import annotations

import torch
from torch import nn

from gapbench.data import DataError, check_binary, check_levels
from gapbench.models.likelihoods import BernoulliLikelihood, make_likelihood, standard_normal_log_prob
from gapbench.models.mlp import mlp


class DecoderBase(nn.Module):
    """p(z) p(x|z) with p(z) = N(0, I) and p(x|z) = ``likelihood`` with parameters ``params(z)``.

    Subclasses set ``data_size`` (D), ``latent_size`` (Z), ``likelihood`` and define ``params``.
    """

    data_size: int
    latent_size: int

    def params(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters: (..., Z) -> (..., P D), P = ``likelihood.params_per_pixel``."""
        raise NotImplementedError

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``params(z)``; for the Bernoulli likelihood these are its logits."""
        return self.params(z)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (K, B, Z); returns (K, B)."""
        return standard_normal_log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for x (B, D) and z (K, B, Z); returns (K, B)."""
        return self.likelihood.log_prob(self.params(z), x)

    def check_data(self, x: torch.Tensor, name: str = "data") -> None:
        """DataError unless x (B, D) has D = data_size columns of what the likelihood is a
        distribution of: 0s and 1s (Bernoulli) or the levels k / (L - 1) (discretised logistic)."""
        if x.ndim != 2 or x.shape[1] != self.data_size:
            raise DataError(f"{name}: shape {tuple(x.shape)}, but the decoder models {self.data_size} "
                            f"pixels per datapoint. Fix: pass x of shape (B, {self.data_size}).")
        if isinstance(self.likelihood, BernoulliLikelihood):
            check_binary(x, name)
        else:
            check_levels(x, self.likelihood.num_levels, name)

    @torch.no_grad()
    def sample_x(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """x ~ p(x|z): (..., Z) -> (..., D)."""
        return self.likelihood.sample(self.params(z), generator=generator)


class Decoder(DecoderBase):
    """The MLP decoder: p(x|z) with parameters f(z), f an MLP (Bernoulli by default).

    Parameters
    ----------
    data_size : D
    latent_size : Z
    hidden_sizes : widths of the hidden layers of f, from z towards x (paper: (200, 200))
    activation : name of the nonlinearity (paper: "elu")
    likelihood : "bernoulli" (binary pixels) or "logistic" (discretised logistic over ``num_levels``)
    num_levels : L, the pixel levels of the discretised logistic
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", likelihood: str = "bernoulli", num_levels: int = 256):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size
        self.likelihood = make_likelihood(likelihood, num_levels=num_levels)
        self.net = mlp([latent_size, *hidden_sizes, self.likelihood.params_per_pixel * data_size], activation)

    def params(self, z: torch.Tensor) -> torch.Tensor:
        """(..., Z) -> (..., P D)."""
        return self.net(z)
