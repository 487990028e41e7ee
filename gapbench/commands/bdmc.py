"""BDMC on a trained run: how far can AIS at given settings be from log p(x)? (``gapbench bdmc``)

Datapoints are simulated from the run's decoder (z ~ p(z), x ~ p(x|z)); forward AIS bounds their
log p(x) from below and reverse AIS from the true z bounds it from above, both in expectation
(Grosse, Ghahramani & Adams, 2015; Wu et al., 2017). The mean gap between the two bounds the mean
error of forward AIS on simulated data at these settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from gapbench.estimators import AISProcedure, bdmc, simulate
from gapbench.estimators.ais import DEFAULT_AIS
from gapbench.runner.run import open_run
from gapbench.runner.rundir import RunError
from gapbench.measure import AIS_INITS, amortized_posterior, frozen


def bdmc_run(run_dir: str | Path, *, num_datapoints: int = 100, procedure: AISProcedure = DEFAULT_AIS,
             init: str = "prior", seed: int = 0, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Simulate ``num_datapoints`` datapoints from a trained run's model and run BDMC on them.

    ``init``: where forward AIS starts and reverse AIS ends, "prior" or "encoder" (the encoder's
    posterior for the simulated x).

    Returns
    -------
    frame : per datapoint: lower (forward AIS), upper (reverse AIS), gap, each bound's _stderr and
        _ess, and the acceptance rates
    summary : mean and standard error over datapoints of lower, upper and gap; the settings
    """
    if init not in AIS_INITS[:2]:
        raise ValueError(f"BDMC init must be 'prior' or 'encoder', got {init!r}")
    config, decoder, encoder, _ = open_run(run_dir, num_datapoints=1)
    if config.model.factory is not None and not (getattr(decoder, "latent_size", None)
                                                 and callable(getattr(decoder, "sample_x", None))):
        raise RunError(f"gapbench bdmc simulates data from the run's model, but the external model of "
                       f"{config.model.factory} has no latent_size and sample_x(z, *, generator) (x ~ p(x|z)); "
                       "give it both, or run gapbench.bdmc from Python on data of your own")
    generator = torch.Generator().manual_seed(seed)
    x, z = simulate(decoder, num_datapoints, generator=generator)  # (N, D), (N, Z)
    q = amortized_posterior(encoder, x) if init == "encoder" else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * procedure.num_steps, desc="BDMC (forward, then reverse)", unit="step")
    callback: Callable[[int], None] | None = (lambda t: bar.update(1)) if bar is not None else None
    with frozen(decoder):
        result = bdmc(decoder, x, z, init=q, procedure=procedure, generator=generator, callback=callback)
    if bar is not None:
        bar.close()
    frame = pd.DataFrame({
        "lower": result.lower.value.numpy(), "lower_stderr": result.lower.stderr.numpy(),
        "lower_ess": result.lower.ess.numpy(), "upper": result.upper.value.numpy(),
        "upper_stderr": result.upper.stderr.numpy(), "upper_ess": result.upper.ess.numpy(),
        "gap": result.gap.numpy(), "lower_acceptance_rate": result.lower.acceptance_rate.numpy(),
        "upper_acceptance_rate": result.upper.acceptance_rate.numpy(),
    })
    n = len(frame)
    summary = {
        name: {"mean": float(frame[name].mean()), "stderr": float(frame[name].std(ddof=1) / math.sqrt(n))
               if n > 1 else math.nan}
        for name in ("lower", "upper", "gap")
    }
    summary["gap"]["max"] = float(frame["gap"].max())
    summary["acceptance_rate"] = float(np.mean([frame["lower_acceptance_rate"].mean(),
                                                frame["upper_acceptance_rate"].mean()]))
    summary["settings"] = {"run_dir": str(run_dir), "dataset": config.data.dataset, "num_datapoints": n,
                           "init": init, "seed": seed, **procedure._asdict()}
    return frame, summary


def bdmc_table(summary: dict) -> str:
    """The BDMC result as a Markdown table (nats)."""
    s = summary["settings"]
    lines = [
        (f"BDMC on {s['num_datapoints']} datapoints simulated from the model ({s['dataset']}); AIS from the "
         f"{s['init']}: {s['num_chains']} chains, {s['num_steps']} {s['schedule']} steps, "
         f"{s['num_leapfrog']} leapfrog steps, mean acceptance {summary['acceptance_rate']:.2f}"),
        "",
        "| quantity | mean (nats) | ± stderr |",
        "|---|---:|---:|",
        f"| forward AIS (stochastic lower bound) | {summary['lower']['mean']:.3f} | {summary['lower']['stderr']:.3f} |",
        f"| reverse AIS (stochastic upper bound) | {summary['upper']['mean']:.3f} | {summary['upper']['stderr']:.3f} |",
        f"| BDMC gap (upper - lower) | {summary['gap']['mean']:.3f} | {summary['gap']['stderr']:.3f} |",
        "",
        f"largest gap of one datapoint: {summary['gap']['max']:.3f} nats",
    ]
    return "\n".join(lines) + "\n"
