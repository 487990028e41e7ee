"""Variational families: amortized (encoder output) and local (free per-datapoint parameters)."""

from .amortized import ENCODERS, GaussianEncoder, make_encoder
from .base import DistributionPosterior, Posterior, as_posterior
from .coupling import AuxiliaryCouplingFlow, AuxiliaryFlowEncoder, AuxiliaryFlowFamily
from .families import FAMILIES, FLOW_FAMILIES, DiagonalGaussianFamily, LocalFamily, get_family, make_family
from .flowbase import FlowEncoder, FlowFamily, FlowPosterior
from .gaussian import DiagonalGaussian
from .hierarchical import HierarchicalEncoder, HierarchicalFamily, HierarchicalPosterior
from .iaf import IAFEncoder, IAFFamily, InverseAutoregressiveFlow, made_masks
from .noise import RandomStream, fork_seed, random_normal, random_uniform, standard_normal
from .planar import PlanarFlow, PlanarFlowEncoder, PlanarFlowFamily
from .streams import DatapointStreams

__all__ = [
    "AuxiliaryCouplingFlow", "AuxiliaryFlowEncoder", "AuxiliaryFlowFamily", "DatapointStreams", "DiagonalGaussian",
    "DiagonalGaussianFamily", "DistributionPosterior", "ENCODERS", "FAMILIES", "FLOW_FAMILIES", "FlowEncoder",
    "FlowFamily", "FlowPosterior", "GaussianEncoder", "HierarchicalEncoder", "HierarchicalFamily",
    "HierarchicalPosterior", "IAFEncoder", "IAFFamily", "InverseAutoregressiveFlow",
    "LocalFamily", "PlanarFlow", "PlanarFlowEncoder", "PlanarFlowFamily", "Posterior", "RandomStream", "as_posterior",
    "fork_seed", "get_family", "made_masks", "make_encoder", "make_family", "random_normal", "random_uniform",
    "standard_normal",
]
