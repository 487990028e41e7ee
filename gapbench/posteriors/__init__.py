"""Variational families: amortized (encoder output) and local (free per-datapoint parameters)."""

from .amortized import GaussianEncoder
from .base import DistributionPosterior, Posterior, as_posterior
from .families import FAMILIES, DiagonalGaussianFamily, LocalFamily, get_family
from .gaussian import DiagonalGaussian
from .hierarchical import HierarchicalEncoder, HierarchicalFamily, HierarchicalPosterior
from .noise import fork_seed, standard_normal

__all__ = [
    "DiagonalGaussian", "DiagonalGaussianFamily", "DistributionPosterior", "FAMILIES", "GaussianEncoder",
    "HierarchicalEncoder", "HierarchicalFamily", "HierarchicalPosterior", "LocalFamily",
    "Posterior", "as_posterior", "fork_seed", "get_family", "standard_normal",
]
