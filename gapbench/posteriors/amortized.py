"""Amortized FFG: an MLP encoder mapping x to the mean and log-variance of a diagonal Gaussian."""

from __future__ import annotations

import torch
from torch import nn

from ..models.mlp import mlp
from .gaussian import DiagonalGaussian


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(log_var(x)))), mu and log_var from one MLP.

    Parameters
    ----------
    data_size : D
    latent_size : Z
    hidden_sizes : hidden widths from x towards z (paper: (200, 200))
    activation : nonlinearity name (paper: "elu")
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu"):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size
        self.net = mlp([data_size, *hidden_sizes, 2 * latent_size], activation)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, D) -> DiagonalGaussian with mean and log_var of shape (B, Z)."""
        mean, log_var = self.net(x).chunk(2, dim=-1)  # (B, Z) each
        return DiagonalGaussian(mean, log_var)
