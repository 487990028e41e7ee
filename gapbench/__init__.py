"""gapbench: measure the approximation and amortization gaps of amortized inference.

Cremer, Li & Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders".
"""

from gapbench.inference.curves import CurveProcedure, RefinementCurve, refinement_curve
from gapbench.estimators import (AISEstimate, AISProcedure, BDMCEstimate, Estimate, ais, bdmc, elbo, iwae, reverse_ais,
    simulate)
from gapbench.gaps import decompose, summarize
from gapbench.measure import RefineProcedure, measure_gaps
from gapbench.models import Decoder, HierarchicalDecoder, HierarchicalLinearGaussian, LinearGaussian, Model
from gapbench.posteriors import (DatapointStreams, DiagonalGaussian, GaussianEncoder, HierarchicalEncoder,
    HierarchicalFamily, as_posterior)
from gapbench.inference.refine import RefineResult, refine
from gapbench.inference.semi_amortized import SemiAmortized

__version__ = "0.1.0"

__all__ = [
    "AISEstimate", "AISProcedure", "BDMCEstimate", "CurveProcedure", "DatapointStreams", "Decoder", "DiagonalGaussian",
    "Estimate", "GaussianEncoder", "HierarchicalDecoder", "HierarchicalEncoder", "HierarchicalFamily",
    "HierarchicalLinearGaussian", "LinearGaussian", "Model", "RefineProcedure", "RefineResult", "RefinementCurve",
    "SemiAmortized", "__version__", "ais", "as_posterior", "bdmc", "decompose", "elbo", "iwae", "measure_gaps",
    "refine", "refinement_curve", "reverse_ais", "simulate", "summarize",
]
