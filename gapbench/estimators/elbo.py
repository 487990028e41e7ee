"""The evidence lower bound, estimated with many samples.

ELBO(q) = E_q[log p(x, z) - log q(z)] <= log p(x)  (Jordan et al., 1999; Kingma & Welling, 2014).
"""

from __future__ import annotations


import torch

from gapbench.estimators.estimate import Estimate
from gapbench.posteriors import RandomStream
from gapbench.estimators.log_weights import WeightStats, weight_stats


def elbo_from_stats(stats: WeightStats) -> Estimate:
    """ELBO = mean of log w, standard error = sample std / sqrt(K)."""
    k = stats.num_samples
    var = stats.sq_dev / max(k - 1, 1)  # (B,) unbiased sample variance of log w
    return Estimate(value=stats.mean, stderr=torch.sqrt(var / k), ess=stats.ess)


def elbo(model, posterior, x: torch.Tensor, *, num_samples: int, chunk_size: int | None = None,
         generator: RandomStream | None) -> Estimate:
    """Monte Carlo ELBO per datapoint.

    Parameters
    ----------
    model : has ``log_prior(z)`` and ``log_likelihood(x, z)``, both (K, B)
    posterior : Posterior or torch Distribution over z with batch shape (B,)
    x : (B, D)
    num_samples : K, number of samples per datapoint
    chunk_size : samples per chunk; memory does not grow with K (None: automatic)
    generator : random stream (keyword-only)

    Returns
    -------
    Estimate with value, stderr and ess, each (B,) float64.
    """
    return elbo_from_stats(weight_stats(model, posterior, x, num_samples=num_samples,
                                        chunk_size=chunk_size, generator=generator))


