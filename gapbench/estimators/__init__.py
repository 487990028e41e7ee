"""Estimators of bounds on log p(x): pure functions returning per-datapoint Estimate tuples."""

from gapbench.estimators.ais import (AISEstimate, AISInfo, AISProcedure, AISState, adapt_step_size, ais, ais_init,
    ais_step, anneal, annealing_schedule, reverse_ais)
from gapbench.estimators.bdmc import BDMCEstimate, bdmc, simulate
from gapbench.estimators.elbo import elbo, elbo_from_stats
from gapbench.estimators.estimate import Estimate
from gapbench.estimators.hmc import HMCInfo, HMCState, hmc_init, hmc_step, leapfrog
from gapbench.estimators.iwae import iwae, iwae_from_stats
from gapbench.estimators.log_weights import WeightStats, log_weights, weight_stats

__all__ = [
    "AISEstimate", "AISInfo", "AISProcedure", "AISState", "BDMCEstimate", "Estimate", "HMCInfo", "HMCState",
    "WeightStats", "adapt_step_size", "ais", "ais_init", "ais_step", "anneal", "annealing_schedule", "bdmc", "elbo",
    "elbo_from_stats", "hmc_init", "hmc_step", "iwae", "iwae_from_stats", "leapfrog", "log_weights", "reverse_ais",
    "simulate", "weight_stats",
]
