"""Generative models p(z) p(x|z): anything with ``log_prior(z)`` and ``log_likelihood(x, z)``."""

from typing import Protocol, runtime_checkable

import torch

from gapbench.models.conv import ConvDecoder, ConvTrunk
from gapbench.models.hierarchical import HierarchicalDecoder
from gapbench.models.hierarchical_linear_gaussian import HierarchicalLinearGaussian, linear_conditional_joint
from gapbench.models.likelihoods import (LIKELIHOODS, BernoulliLikelihood, DiscretizedLogisticLikelihood,
    bernoulli_log_prob, discretized_logistic_log_prob, discretized_logistic_sample, gaussian_log_prob, make_likelihood,
    standard_normal_log_prob)
from gapbench.models.linear_gaussian import LinearGaussian
from gapbench.models.mlp import ACTIVATIONS, mlp
from gapbench.models.vae import Decoder, DecoderBase


@runtime_checkable
class Model(Protocol):
    """A latent variable model. Shapes: z (K, B, Z), x (B, D); both methods return (K, B)."""

    def log_prior(self, z: torch.Tensor) -> torch.Tensor: ...

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


__all__ = [
    "ACTIVATIONS", "LIKELIHOODS", "BernoulliLikelihood", "ConvDecoder", "ConvTrunk", "Decoder", "DecoderBase",
    "DiscretizedLogisticLikelihood", "HierarchicalDecoder", "HierarchicalLinearGaussian", "LinearGaussian", "Model",
    "bernoulli_log_prob", "discretized_logistic_log_prob", "discretized_logistic_sample", "gaussian_log_prob",
    "linear_conditional_joint", "make_likelihood", "mlp", "standard_normal_log_prob",
]
