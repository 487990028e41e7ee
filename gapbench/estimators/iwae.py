"""The importance-weighted bound (Burda, Grosse & Salakhutdinov, 2016).

IWAE_K = log (1/K) sum_k w_k,  w_k = p(x, z_k) / q(z_k),  z_k ~ q.
E[IWAE_K] <= E[IWAE_{K+1}] <= log p(x), and IWAE_K -> log p(x) as K grows. The sum is accumulated
as a running log-sum-exp over chunks of samples, so K = 5000 or 10^6 costs time, not memory.
"""

from __future__ import annotations

import math

import torch

from gapbench.estimators.estimate import Estimate
from gapbench.posteriors import RandomStream
from gapbench.estimators.log_weights import WeightStats, weight_stats


def iwae_from_stats(stats: WeightStats) -> Estimate:
    """IWAE_K from weight statistics.

    The standard error follows from the delta method on log of the mean weight:
    se^2 = Var(w) / (K wbar^2) = 1/ESS - 1/K, with ESS = (sum w)^2 / sum w^2.
    """
    k = stats.num_samples
    ess = stats.ess
    value = stats.log_sum_w - math.log(k)
    stderr = torch.sqrt(torch.clamp(1.0 / ess - 1.0 / k, min=0.0))
    return Estimate(value=value, stderr=stderr, ess=ess)


def iwae(model, posterior, x: torch.Tensor, *, num_samples: int, chunk_size: int | None = None,
         generator: RandomStream | None) -> Estimate:
    """IWAE bound with K = ``num_samples`` importance samples per datapoint.

    Parameters
    ----------
    model : has ``log_prior(z)`` and ``log_likelihood(x, z)``, both (K, B)
    posterior : Posterior or torch Distribution over z with batch shape (B,)
    x : (B, D)
    num_samples : K
    chunk_size : samples per chunk (None: automatic); the result does not depend on it
    generator : random stream (keyword-only)

    Returns
    -------
    Estimate with value, stderr and ess, each (B,) float64.
    """
    return iwae_from_stats(weight_stats(model, posterior, x, num_samples=num_samples,
                                        chunk_size=chunk_size, generator=generator))
