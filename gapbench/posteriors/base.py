"""The Posterior protocol and the adapter that turns any torch Distribution into one."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.distributions import Distribution, Independent, Normal

from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.posteriors.noise import fork_seed


@runtime_checkable
class Posterior(Protocol):
    """An approximate posterior over z for a batch of B datapoints."""

    def rsample_and_log_prob(
        self, num_samples: int, *, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return z of shape (K, B, Z) and log q(z) of shape (K, B)."""
        ...


class DistributionPosterior:
    """Wrap a ``torch.distributions.Distribution`` with batch shape (B,) and event shape (Z,).

    torch's samplers draw from the global random stream; to honour an explicit ``generator``
    the draw runs inside ``torch.random.fork_rng`` seeded from that generator, so the caller's
    global stream is left untouched and results are reproducible.
    """

    def __init__(self, distribution: Distribution):
        if len(distribution.batch_shape) != 1 or len(distribution.event_shape) != 1:
            raise ValueError(
                "the encoder must return a distribution with batch shape (B,) and event shape (Z,), "
                f"got batch shape {tuple(distribution.batch_shape)} and event shape "
                f"{tuple(distribution.event_shape)}; wrap a per-dimension distribution in "
                "torch.distributions.Independent(..., 1)"
            )
        self.distribution = distribution

    def rsample_and_log_prob(
        self, num_samples: int, *, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z of shape (K, B, Z) and log q(z) of shape (K, B)."""
        dist = self.distribution
        device = dist.mean.device if hasattr(dist, "mean") else None
        devices = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(fork_seed(generator))
            shape = torch.Size([num_samples])
            z = dist.rsample(shape) if dist.has_rsample else dist.sample(shape)  # (K, B, Z)
        return z, dist.log_prob(z)  # (K, B, Z), (K, B)


def as_posterior(q: Posterior | Distribution) -> Posterior:
    """Turn an encoder's output into a Posterior.

    ``Independent(Normal(loc, scale), 1)`` becomes a :class:`DiagonalGaussian` (fast path, chunk-
    consistent sampling); any other Distribution is wrapped in :class:`DistributionPosterior`;
    a Posterior is returned unchanged.
    """
    if isinstance(q, Distribution):
        if (
            isinstance(q, Independent)
            and isinstance(q.base_dist, Normal)
            and q.reinterpreted_batch_ndims == 1
            and len(q.batch_shape) == 1
        ):
            loc, scale = q.base_dist.loc, q.base_dist.scale
            return DiagonalGaussian(loc, 2.0 * torch.log(scale))
        return DistributionPosterior(q)
    if isinstance(q, Posterior):
        return q
    raise TypeError(
        f"expected a torch.distributions.Distribution or a gapbench Posterior, got {type(q).__name__}"
    )
