"""Importance log-weights log p(x, z) - log q(z), streamed in chunks into running statistics.

Memory stays flat in the number of samples K: only one chunk of (chunk_size, B, ...) tensors lives at
a time; the statistics (count, mean, sum of squared deviations, log-sum-exp of w and of w^2) are
merged chunk by chunk in float64 (Chan, Golub & LeVeque, 1979, for the variance).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gapbench.posteriors import Posterior, RandomStream, as_posterior

# Rows (samples x datapoints) per chunk when the caller does not choose. About 4096 rows keeps a
# chunk's activations in cache while the matmuls stay large: on 2 CPU cores with the paper's decoder,
# IWAE ran at 107 GFLOP/s with 4000-row chunks, 56 with 8000 and 50 with 65000.
DEFAULT_ROWS_PER_CHUNK = 4096


def log_weights(model, posterior: Posterior, x: torch.Tensor, *, num_samples: int,
                generator: RandomStream | None) -> torch.Tensor:
    """log w = log p(z) + log p(x|z) - log q(z) for z ~ q; returns (K, B). Keeps the autograd graph."""
    z, log_q = posterior.rsample_and_log_prob(num_samples, generator=generator)  # (K, B, Z), (K, B)
    if z.ndim != 3 or z.shape[1] != x.shape[0]:
        raise ValueError(f"the posterior holds {z.shape[1] if z.ndim == 3 else '?'} datapoints "
                         f"(z of shape {tuple(z.shape)}) but x holds {x.shape[0]}; build q from the same x")
    return model.log_prior(z) + model.log_likelihood(x, z) - log_q  # (K, B)


class WeightStats(NamedTuple):
    """Running statistics of K log-weights per datapoint, all (B,) float64 except ``num_samples``."""

    num_samples: int
    mean: torch.Tensor  # mean of log w
    sq_dev: torch.Tensor  # sum of squared deviations of log w from its mean
    log_sum_w: torch.Tensor  # log sum_k w_k
    log_sum_w2: torch.Tensor  # log sum_k w_k^2

    def merge(self, log_w: torch.Tensor) -> "WeightStats":
        """Fold a chunk of log-weights (k, B) into the statistics."""
        log_w = log_w.detach().to(torch.float64)  # (k, B)
        k = log_w.shape[0]
        chunk_mean = log_w.mean(0)  # (B,)
        chunk_sq_dev = (log_w - chunk_mean).square().sum(0)  # (B,)
        chunk_lse = torch.logsumexp(log_w, 0)  # (B,)
        chunk_lse2 = torch.logsumexp(2.0 * log_w, 0)  # (B,)
        if self.num_samples == 0:
            return WeightStats(k, chunk_mean, chunk_sq_dev, chunk_lse, chunk_lse2)
        n = self.num_samples + k
        delta = chunk_mean - self.mean  # (B,)
        return WeightStats(
            num_samples=n,
            mean=self.mean + delta * (k / n),
            sq_dev=self.sq_dev + chunk_sq_dev + delta.square() * (self.num_samples * k / n),
            log_sum_w=torch.logaddexp(self.log_sum_w, chunk_lse),
            log_sum_w2=torch.logaddexp(self.log_sum_w2, chunk_lse2),
        )

    @property
    def ess(self) -> torch.Tensor:
        """(sum w)^2 / sum w^2, in [1, K]: (B,)."""
        return torch.exp(2.0 * self.log_sum_w - self.log_sum_w2)


def empty_stats() -> WeightStats:
    empty = torch.empty(0, dtype=torch.float64)
    return WeightStats(0, empty, empty, empty, empty)


def resolve_chunk_size(chunk_size: int | None, num_samples: int, num_datapoints: int) -> int:
    """The number of samples per chunk: ``chunk_size`` or about 4096 rows, at most ``num_samples``."""
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_ROWS_PER_CHUNK // max(1, num_datapoints))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
    return min(chunk_size, num_samples)


@torch.no_grad()
def weight_stats(model, posterior, x: torch.Tensor, *, num_samples: int, chunk_size: int | None = None,
                 generator: RandomStream | None) -> WeightStats:
    """Draw ``num_samples`` samples from ``posterior`` in chunks and return their weight statistics.

    Parameters
    ----------
    model : has ``log_prior(z) -> (K, B)`` and ``log_likelihood(x, z) -> (K, B)``
    posterior : a Posterior or torch Distribution over z, batch (B,), event (Z,)
    x : (B, D)
    num_samples : K
    chunk_size : samples per chunk (None: about 4096 rows)
    generator : random stream; the same generator gives the same result for any chunk_size
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    posterior = as_posterior(posterior)
    step = resolve_chunk_size(chunk_size, num_samples, x.shape[0])
    stats = empty_stats()
    for start in range(0, num_samples, step):
        k = min(step, num_samples - start)
        stats = stats.merge(log_weights(model, posterior, x, num_samples=k, generator=generator))
    return stats


