"""Generative models p(z) p(x|z): anything with ``log_prior(z)`` and ``log_likelihood(x, z)``."""

from typing import Protocol, runtime_checkable

import torch

from .likelihoods import bernoulli_log_prob, gaussian_log_prob, standard_normal_log_prob
from .hierarchical import HierarchicalDecoder
from .hierarchical_linear_gaussian import HierarchicalLinearGaussian, linear_conditional_joint
from .linear_gaussian import LinearGaussian
from .mlp import ACTIVATIONS, mlp
from .vae import Decoder


@runtime_checkable
class Model(Protocol):
    """A latent variable model. Shapes: z (K, B, Z), x (B, D); both methods return (K, B)."""

    def log_prior(self, z: torch.Tensor) -> torch.Tensor: ...

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


__all__ = [
    "ACTIVATIONS", "Decoder", "HierarchicalDecoder", "HierarchicalLinearGaussian", "LinearGaussian", "Model", "bernoulli_log_prob", "gaussian_log_prob",
    "linear_conditional_joint", "mlp", "standard_normal_log_prob",
]
