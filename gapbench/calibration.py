"""AIS calibration: the BDMC sandwich width of a run's AIS settings on data simulated from its model.

For (z, x) drawn from the model, forward AIS bounds log p(x) from below and reverse AIS from the
exact z bounds it from above, both in expectation (Grosse, Ghahramani & Adams, 2015; Wu et al., 2017,
section 4). With the run's own chains x steps, the mean width upper - lower bounds the mean error of
forward AIS on such data; a width above the tolerance (default 0.2 nats) says that the AIS column,
and log p_hat(x) where AIS was chosen, may fall that far short. Raising ``ais.num_steps`` narrows the
sandwich (the error of AIS falls roughly as 1/T for long schedules, Grosse et al., 2015, section 3);
more chains mainly lower its variance.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from gapbench.estimators import AISProcedure, bdmc, simulate
from gapbench.measure import amortized_posterior, fit_diagonal, frozen
from gapbench.posteriors import FlowPosterior

CALIBRATION_INITS = ("prior", "encoder")


def calibrate_ais(model, encoder: Callable | None, *, num_datapoints: int, procedure: AISProcedure,
                  init: str = "encoder", tolerance: float = 0.2, dtype: torch.dtype = torch.float32,
                  generator: torch.Generator,
                  callback: Callable[[int], None] | None = None) -> dict:
    """BDMC with ``procedure`` on ``num_datapoints`` datapoints simulated from ``model``.

    ``init``: where forward AIS starts and reverse AIS ends, "prior" or "encoder" (the encoder's posterior
    for the simulated x; for a flow encoder, as in the run's AIS, the diagonal Gaussian fitted to its samples). The model needs ``sample_x(z, *, generator)`` (``gapbench.estimators.simulate``);
    ``dtype``: of the simulated z.

    Returns
    -------
    {"num_datapoints", "init", "num_chains", "num_steps", "mean_width", "width_stderr", "max_width",
     "mean_lower", "mean_upper", "acceptance_rate", "tolerance", "is_within_tolerance"}, widths in nats
    """
    if init not in CALIBRATION_INITS:
        raise ValueError(f"AIS calibration starts from 'prior' or 'encoder', got {init!r}")
    if num_datapoints < 2:
        raise ValueError(f"AIS calibration needs at least 2 simulated datapoints, got {num_datapoints}")
    x, z = simulate(model, num_datapoints, generator=generator, dtype=dtype)  # (N, D), (N, Z)
    q = amortized_posterior(encoder, x) if init == "encoder" else None
    if isinstance(q, FlowPosterior):  # as the run's AIS (measure.ais_of): a flow's chains start from its fitted Gaussian
        seed = int(torch.randint(2**62, (1,), generator=generator))
        q = fit_diagonal(q, generator=torch.Generator(device=x.device).manual_seed(seed))
    with frozen(model):
        result = bdmc(model, x, z, init=q, procedure=procedure, generator=generator, callback=callback)
    width = result.gap.double()  # (N,)
    mean_width = float(width.mean())
    return {
        "num_datapoints": num_datapoints, "init": init, "num_chains": procedure.num_chains,
        "num_steps": procedure.num_steps,
        "mean_width": mean_width, "width_stderr": float(width.std() / math.sqrt(num_datapoints)),
        "max_width": float(width.max()),
        "mean_lower": float(result.lower.value.mean()), "mean_upper": float(result.upper.value.mean()),
        "acceptance_rate": float((result.lower.acceptance_rate.mean() + result.upper.acceptance_rate.mean()) / 2),
        "tolerance": tolerance, "is_within_tolerance": bool(mean_width <= tolerance),
    }


def calibration_lines(calibration: dict) -> list[str]:
    """The lines printed under the gap table: the sandwich width, and a warning above the tolerance."""
    c = calibration
    lines = [f"AIS calibration: BDMC on {c['num_datapoints']} datapoints simulated from the model, AIS from the "
             f"{c['init']} with the run's {c['num_chains']} chains x {c['num_steps']} steps: sandwich width "
             f"{c['mean_width']:.3f} ± {c['width_stderr']:.3f} nats (largest {c['max_width']:.3f}; tolerance "
             f"{c['tolerance']:g})."]
    if not c["is_within_tolerance"]:
        lines.append(f"WARNING: the AIS sandwich is wider than {c['tolerance']:g} nats: AIS at these settings may "
                     "fall that far below log p(x); raise ais.num_steps (then ais.num_chains) until it is not.")
    return lines
