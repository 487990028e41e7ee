"""Diagonal Gaussian (fully factorised Gaussian, FFG) posterior for a batch of datapoints."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gapbench.posteriors.noise import RandomStream, standard_normal

LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian(NamedTuple):
    """q(z) = N(z; mean, diag(exp(log_var))), one per datapoint.

    Attributes
    ----------
    mean : (B, Z)
    log_var : (B, Z)
    """

    mean: torch.Tensor
    log_var: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        """(B, Z) standard deviations."""
        return torch.exp(0.5 * self.log_var)

    def rsample_and_log_prob(
        self, num_samples: int, *, generator: RandomStream | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised samples z = mean + std * eps and their log-density.

        Returns
        -------
        z : (K, B, Z)
        log_q : (K, B), log q(z) = -1/2 sum_j (eps_j^2 + log_var_j + log 2 pi)
        """
        eps = standard_normal(
            (num_samples, *self.mean.shape), generator=generator,
            dtype=self.mean.dtype, device=self.mean.device,
        )  # (K, B, Z)
        z = self.mean + self.std * eps  # (K, B, Z)
        log_q = -0.5 * (eps.square() + self.log_var + LOG_2PI).sum(-1)  # (K, B)
        return z, log_q

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) for z of shape (K, B, Z); returns (K, B)."""
        scaled = (z - self.mean) * torch.exp(-0.5 * self.log_var)  # (K, B, Z)
        return -0.5 * (scaled.square() + self.log_var + LOG_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        """H[q] = 1/2 sum_j (1 + log 2 pi + log_var_j); returns (B,)."""
        return 0.5 * (1.0 + LOG_2PI + self.log_var).sum(-1)
