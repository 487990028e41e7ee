"""Observation log-densities, summed over data dimensions. Each is a full normalised density."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = sum_d x_d l_d - softplus(l_d).

    Parameters
    ----------
    logits : (K, B, D)
    x : (B, D), values in {0, 1} (values in [0, 1] give the continuous cross-entropy)

    Returns
    -------
    (K, B)
    """
    # softplus(l) = log(1 + e^l) is returned as l itself above the threshold: an error of e^-30
    # (1e-13) there, and one elementwise pass fewer than binary_cross_entropy_with_logits
    return (logits * x).sum(-1) - F.softplus(logits, threshold=30.0).sum(-1)  # (K, B)


def gaussian_log_prob(mean: torch.Tensor, log_var: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_var))) summed over the last dimension.

    Parameters
    ----------
    mean : (K, B, D)
    log_var : (K, B, D), (D,) or a float
    x : (B, D)

    Returns
    -------
    (K, B)
    """
    log_var = torch.as_tensor(log_var, dtype=mean.dtype, device=mean.device)
    return -0.5 * ((x - mean).square() * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) for z of shape (K, B, Z); returns (K, B)."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)
