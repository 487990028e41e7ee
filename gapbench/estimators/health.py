"""AIS health per datapoint: an AIS estimate whose chains did not work is flagged, not trusted.

AIS with HMC transitions (Neal, 2001) is only as good as its transitions. Three signs that a
datapoint's chains did not mix, each with a threshold in the ``[ais]`` config section:

    acceptance  |acceptance rate - ais.target_acceptance| > ais.flag_acceptance_error: the step size
                never reached a working value (acceptance near 0: the chains stand still, and AIS
                degrades to importance sampling from its start)
    divergence  divergence rate > ais.flag_divergence_rate: the leapfrog integrator blew up in that
                fraction of the transitions
    ESS         the effective sample size of the chains' final weights < ais.flag_ess_fraction x
                ais.num_chains: one chain carries the estimate (weight degeneracy)

A flagged datapoint's AIS estimate is left out of log p_hat(x) (its other bounds stay); the flag is
the boolean column ``ais_unhealthy`` of datapoints.csv, and summary.json ``ais.unhealthy`` counts
the flagged datapoints by reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# The thresholds' defaults; at these values the keys stay out of the stage records' hashes.
AIS_FLAG_DEFAULTS = {"flag_acceptance_error": 0.5, "flag_divergence_rate": 0.5, "flag_ess_fraction": 0.1}
UNHEALTHY = "ais_unhealthy"


def ais_flags(ais: pd.DataFrame, *, target_acceptance: float, num_chains: int, flag_acceptance_error: float,
              flag_divergence_rate: float, flag_ess_fraction: float) -> pd.DataFrame:
    """Per datapoint of an ais.csv frame: one boolean column per sign (``ais_acceptance_off``,
    ``ais_diverging``, ``ais_ess_collapsed``) and ``ais_unhealthy``, any of them."""
    acceptance = ais["ais_acceptance_rate"].to_numpy(dtype=np.float64)
    divergence = ais["ais_divergence_rate"].to_numpy(dtype=np.float64)
    ess = ais["ais_ess"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN diagnostics count as unhealthy
        flags = pd.DataFrame({
            "ais_acceptance_off": ~(np.abs(acceptance - target_acceptance) <= flag_acceptance_error),
            "ais_diverging": ~(divergence <= flag_divergence_rate),
            "ais_ess_collapsed": ~(ess >= flag_ess_fraction * num_chains),
        }, index=ais.index)
    flags[UNHEALTHY] = flags.any(axis=1)
    return flags


def health_counts(flags: pd.DataFrame) -> dict[str, int]:
    """``{"num_unhealthy", "acceptance_off", "diverging", "ess_collapsed"}`` over the datapoints."""
    return {"num_unhealthy": int(flags[UNHEALTHY].sum()),
            **{name.removeprefix("ais_"): int(flags[name].sum())
               for name in ("ais_acceptance_off", "ais_diverging", "ais_ess_collapsed")}}
