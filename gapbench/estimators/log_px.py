"""log p_hat(x): pick an estimator per datapoint on one set of draws, report a fresh, independent one.

Every candidate estimator (IWAE-K under q, IWAE-K under each q*_f, AIS) gives an unbiased estimate
p_hat_c of p(x); its log is a stochastic lower bound, E[log p_hat_c] <= log p(x) (Jensen). The
per-datapoint *maximum* of several such logs is not: E[max_c log p_hat_c] >= max_c E[log p_hat_c],
and an IWAE under a poor proposal has a long upper tail that the maximum keeps (Cremer, Li &
Duvenaud, 2018, used the maximum; issue 13 measured +0.10 nats of bias on a linear-Gaussian model).

So the runs already made serve as a *pilot*: per datapoint, :func:`select_estimators` picks the
candidate whose pilot value minus two of its Monte Carlo standard errors is largest, among those
whose pilot effective sample size is at least 2 (all of them if none is). Both guards keep a lucky
overshoot of a poor proposal from being chosen: such an overshoot rests on one huge weight (ESS near
1, standard error near 1 nat). On linear-Gaussian models with encoders 6 and 20 nats from q* the
plain largest pilot value chose q on 5-35% of the datapoints and the fresh draw then fell up to
4.6 nats short; this rule chose q* there (see tests/test_log_px.py and README, "How the numbers are
made"). Then :func:`fresh_estimate` draws that estimator again from new, independent
random numbers. Whatever the rule, the fresh draw is independent of the choice, so

    E[p_hat_fresh | choice] = p(x)   and   E[log p_hat_fresh] <= log p(x),

a stochastic lower bound again (the split into a selection sample and an estimation sample is the
usual cure of selection bias; e.g. Cox, 1975, "A note on data-splitting"). Its standard error is the
fresh estimator's own (delta method, ``gapbench.estimators.iwae_from_stats``), which a test checks
for coverage against exact log p(x). The cost is one more IWAE-K, or one more AIS, per datapoint.

AIS counts as a candidate only where it is healthy: a boolean per-datapoint column ``ais_unhealthy``
that is True takes AIS out for that datapoint (no such column: healthy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from gapbench.estimators import Estimate

UNHEALTHY_AIS = "ais_unhealthy"
PENALTY = 2.0  # pilot standard errors subtracted from a pilot value
MIN_ESS = 2.0  # a pilot estimate with a smaller effective sample size rests on one weight
NO_CANDIDATE = ""  # the source of a datapoint no candidate could serve (every pilot value NaN)
METHOD = ("per datapoint, a fresh draw (new random numbers) of the estimator whose pilot value minus 2 pilot "
          "standard errors is largest among {candidates} (pilot ESS >= 2); pilot: the IWAE and AIS runs of the "
          "amortized, local and ais stages")


def method_description(candidates: Sequence[str]) -> str:
    """How log p_hat(x) was made, for summary.json and the table."""
    return METHOD.format(candidates=", ".join(candidates))


def pilot_scores(frame: pd.DataFrame, candidates: Sequence[str], *, penalty: float = PENALTY,
                 min_ess: float = MIN_ESS) -> pd.DataFrame:
    """Per datapoint and candidate: pilot value minus ``penalty`` pilot stderrs; -inf where it is NaN or
    infinite or where the candidate is AIS and ``ais_unhealthy`` is True. Where a datapoint has candidates
    with pilot ESS >= ``min_ess``, the others are -inf too. (N, C)."""
    missing = [c for c in candidates if any(n not in frame for n in (c, f"{c}_stderr", f"{c}_ess"))]
    if missing:
        raise KeyError(f"pilot estimates {missing} (with _stderr and _ess) are not in the per-datapoint frame")
    scores = {}
    for name in candidates:
        score = frame[name].to_numpy(dtype=np.float64) - penalty * frame[f"{name}_stderr"].to_numpy(dtype=np.float64)
        score = np.where(np.isfinite(score), score, -np.inf)  # (N,)
        if name == "ais" and UNHEALTHY_AIS in frame:
            score = np.where(frame[UNHEALTHY_AIS].to_numpy(dtype=bool), -np.inf, score)
        scores[name] = score
    scores = pd.DataFrame(scores, index=frame.index)
    ess = frame[[f"{c}_ess" for c in candidates]].to_numpy(dtype=np.float64)  # (N, C)
    is_enough = (ess >= min_ess) & np.isfinite(scores.to_numpy())  # (N, C)
    keep = is_enough | ~is_enough.any(axis=1, keepdims=True)  # datapoints without any: every candidate
    return scores.where(keep, -np.inf)


def select_estimators(frame: pd.DataFrame, candidates: Sequence[str], *, penalty: float = PENALTY,
                      min_ess: float = MIN_ESS) -> np.ndarray:
    """The candidate chosen for each datapoint (:func:`pilot_scores`' largest): (N,) of names, with
    ``NO_CANDIDATE`` where every score is -inf. ``penalty = 0, min_ess = 0`` chooses the largest pilot value."""
    scores = pilot_scores(frame, candidates, penalty=penalty, min_ess=min_ess).to_numpy()  # (N, C)
    chosen = np.asarray(candidates, dtype=object)[np.argmax(scores, axis=1)]  # (N,)
    return np.where(np.isfinite(scores.max(axis=1)), chosen, NO_CANDIDATE).astype(str)


EstimateFn = Callable[[torch.Tensor], Estimate]
"""Fresh estimates for a subset of the datapoints: positions (n,) int64 -> Estimate of (n,) tensors,
drawn from random numbers independent of the pilot's."""


def fresh_estimate(chosen: np.ndarray, estimate_fns: Mapping[str, EstimateFn]) -> Estimate:
    """Run each chosen estimator once on the datapoints that chose it; returns (N,) float64 tensors
    (NaN where nothing was chosen).

    ``estimate_fns`` holds one function per candidate name (:data:`EstimateFn`); only the candidates
    that some datapoint chose are called.
    """
    n = len(chosen)
    value, stderr, ess = (torch.full((n,), float("nan"), dtype=torch.float64) for _ in range(3))
    for name in dict.fromkeys(c for c in chosen if c != NO_CANDIDATE):
        if name not in estimate_fns:
            raise KeyError(f"no fresh estimator for the chosen candidate {name!r}")
        positions = torch.as_tensor(np.flatnonzero(chosen == name), dtype=torch.int64)  # (n_c,)
        estimate = estimate_fns[name](positions)
        value[positions] = estimate.value.detach().cpu().double()
        stderr[positions] = estimate.stderr.detach().cpu().double()
        ess[positions] = estimate.ess.detach().cpu().double()
    return Estimate(value, stderr, ess)


def log_px_columns(frame: pd.DataFrame, chosen: np.ndarray, fresh: Estimate,
                   candidates: Sequence[str]) -> pd.DataFrame:
    """The log p_hat(x) columns of the per-datapoint frame:

    log_px, log_px_stderr, log_px_ess : the fresh estimate (:func:`fresh_estimate`)
    log_px_source : the estimator it comes from (a candidate's name: "iwae_q_star_ffg" is a fresh IWAE-K
        under q*_ffg, "ais" a fresh AIS run)
    max_pilot_bound : the per-datapoint maximum of the pilot values, a diagnostic only: biased upward,
        in no gap
    """
    pilot = frame[list(candidates)].to_numpy(dtype=np.float64)  # (N, C)
    finite = np.where(np.isfinite(pilot), pilot, -np.inf)
    return pd.DataFrame({
        "log_px": fresh.value.numpy(), "log_px_stderr": fresh.stderr.numpy(), "log_px_ess": fresh.ess.numpy(),
        "log_px_source": chosen, "max_pilot_bound": finite.max(axis=1),
    }, index=frame.index)


def selected_log_px(frame: pd.DataFrame, candidates: Sequence[str], estimate_fns: Mapping[str, EstimateFn], *,
                    penalty: float = PENALTY, min_ess: float = MIN_ESS) -> pd.DataFrame:
    """:func:`select_estimators` on the pilot columns of ``frame``, :func:`fresh_estimate`, and the
    columns of :func:`log_px_columns`: the one path the Python API and the runner share."""
    chosen = select_estimators(frame, candidates, penalty=penalty, min_ess=min_ess)
    return log_px_columns(frame, chosen, fresh_estimate(chosen, estimate_fns), candidates)
