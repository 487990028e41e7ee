"""Variational families: amortized (encoder output) and local (free per-datapoint parameters)."""

from gapbench.posteriors.amortized import ENCODERS, GaussianEncoder, make_encoder
from gapbench.posteriors.base import DistributionPosterior, Posterior, as_posterior
from gapbench.posteriors.coupling import AuxiliaryCouplingFlow, AuxiliaryFlowEncoder, AuxiliaryFlowFamily
from gapbench.posteriors.families import (FAMILIES, FLOW_FAMILIES, DiagonalGaussianFamily, LocalFamily, get_family,
    make_family)
from gapbench.posteriors.flowbase import FlowEncoder, FlowFamily, FlowPosterior
from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.posteriors.hierarchical import HierarchicalEncoder, HierarchicalFamily, HierarchicalPosterior
from gapbench.posteriors.iaf import IAFEncoder, IAFFamily, InverseAutoregressiveFlow, made_masks
from gapbench.posteriors.noise import RandomStream, fork_seed, random_normal, random_uniform, standard_normal
from gapbench.posteriors.planar import PlanarFlow, PlanarFlowEncoder, PlanarFlowFamily
from gapbench.random import DatapointStreams

__all__ = [
    "AuxiliaryCouplingFlow", "AuxiliaryFlowEncoder", "AuxiliaryFlowFamily", "DatapointStreams", "DiagonalGaussian",
    "DiagonalGaussianFamily", "DistributionPosterior", "ENCODERS", "FAMILIES", "FLOW_FAMILIES", "FlowEncoder",
    "FlowFamily", "FlowPosterior", "GaussianEncoder", "HierarchicalEncoder", "HierarchicalFamily",
    "HierarchicalPosterior", "IAFEncoder", "IAFFamily", "InverseAutoregressiveFlow",
    "LocalFamily", "PlanarFlow", "PlanarFlowEncoder", "PlanarFlowFamily", "Posterior", "RandomStream", "as_posterior",
    "fork_seed", "get_family", "made_masks", "make_encoder", "make_family", "random_normal", "random_uniform",
    "standard_normal",
]
