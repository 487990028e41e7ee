"""Variational families: amortized (encoder output) and local (free per-datapoint parameters)."""

from .amortized import GaussianEncoder
from .base import DistributionPosterior, Posterior, as_posterior
from .families import FAMILIES, DiagonalGaussianFamily, LocalFamily, get_family
from .gaussian import DiagonalGaussian
from .noise import RandomStream, fork_seed, random_normal, random_uniform, standard_normal
from .streams import DatapointStreams

__all__ = [
    "DatapointStreams", "DiagonalGaussian", "DiagonalGaussianFamily", "DistributionPosterior", "FAMILIES",
    "GaussianEncoder", "LocalFamily",
    "Posterior", "RandomStream", "as_posterior", "fork_seed", "get_family", "random_normal", "random_uniform",
    "standard_normal",
]
