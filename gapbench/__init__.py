"""gapbench: measure the approximation and amortization gaps of amortized inference.

Cremer, Li & Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders".
"""

from .estimators import AISEstimate, AISProcedure, BDMCEstimate, Estimate, ais, bdmc, elbo, iwae, reverse_ais, simulate
from .gaps import decompose, summarize
from .measure import RefineProcedure, measure_gaps
from .models import Decoder, LinearGaussian, Model
from .posteriors import DatapointStreams, DiagonalGaussian, GaussianEncoder, as_posterior
from .refine import RefineResult, refine

__version__ = "0.1.0"

__all__ = [
    "AISEstimate", "AISProcedure", "BDMCEstimate", "DatapointStreams", "Decoder", "DiagonalGaussian", "Estimate",
    "GaussianEncoder",
    "LinearGaussian", "Model", "RefineProcedure", "RefineResult", "__version__", "ais", "as_posterior", "bdmc", "decompose", "elbo",
    "iwae", "measure_gaps", "refine", "reverse_ais", "simulate", "summarize",
]
