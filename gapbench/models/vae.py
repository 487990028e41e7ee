"""The generative half of a VAE: prior N(0, I) and an MLP decoder with a Bernoulli likelihood.

The encoder (amortized posterior) lives in ``gapbench.posteriors.amortized``; this module knows
nothing of inference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import DataError, check_binary
from .likelihoods import bernoulli_log_prob, standard_normal_log_prob
from .mlp import mlp


class Decoder(nn.Module):
    """p(z) p(x|z) with p(z) = N(0, I) and p(x|z) = prod_d Bernoulli(x_d; sigmoid(f(z)_d)).

    Parameters
    ----------
    data_size : D
    latent_size : Z
    hidden_sizes : widths of the hidden layers of f, from z towards x (paper: (200, 200))
    activation : name of the nonlinearity (paper: "elu")
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu"):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size
        self.net = mlp([latent_size, *hidden_sizes, data_size], activation)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits: (..., Z) -> (..., D)."""
        return self.net(z)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (K, B, Z); returns (K, B)."""
        return standard_normal_log_prob(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for x (B, D) and z (K, B, Z); returns (K, B)."""
        return bernoulli_log_prob(self.logits(z), x)

    def check_data(self, x: torch.Tensor, name: str = "data") -> None:
        """DataError unless x (B, D) has D = data_size columns of 0s and 1s (Bernoulli data)."""
        if x.ndim != 2 or x.shape[1] != self.data_size:
            raise DataError(f"{name}: shape {tuple(x.shape)}, but the decoder models {self.data_size} "
                            f"pixels per datapoint. Fix: pass x of shape (B, {self.data_size}).")
        check_binary(x, name)
    @torch.no_grad()
    def sample_x(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """x ~ p(x|z): binary draws x_d ~ Bernoulli(sigmoid(f(z)_d)); (..., Z) -> (..., D)."""
        return torch.bernoulli(torch.sigmoid(self.logits(z)), generator=generator)
