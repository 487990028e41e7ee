"""Estimators of bounds on log p(x): pure functions returning per-datapoint Estimate tuples."""

from .elbo import elbo, elbo_from_stats
from .estimate import Estimate
from .iwae import iwae, iwae_from_stats
from .log_weights import WeightStats, log_weights, weight_stats

__all__ = [
    "Estimate", "WeightStats", "elbo", "elbo_from_stats", "iwae", "iwae_from_stats", "log_weights",
    "weight_stats",
]
