"""The gap decomposition (Cremer, Li & Duvenaud, 2018, section 3 and Table 2).

    inference gap      log p(x) - L[q]      = approximation gap + amortization gap
    approximation gap  log p(x) - L[q*]     (the family is too simple)
    amortization gap   L[q*]    - L[q]      (the encoder misses the family's best member)

with log p(x) replaced by log p_hat(x), a fresh draw of the estimator (IWAE under q or under q*, or
AIS) that did best on a pilot draw (``gapbench.estimators.log_px``): a stochastic lower bound, so the
approximation gap is estimated conservatively.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from gapbench.estimators import Estimate

BOUND_NAMES = ("elbo_q", "elbo_q_star", "log_px")
GAP_NAMES = ("approximation", "amortization", "inference")
NO_FAULT = "ok"


def estimate_columns(name: str, estimate: Estimate) -> dict[str, np.ndarray]:
    """Per-datapoint columns ``name``, ``name_stderr``, ``name_ess`` from an Estimate."""
    return {
        name: estimate.value.detach().cpu().double().numpy(),
        f"{name}_stderr": estimate.stderr.detach().cpu().double().numpy(),
        f"{name}_ess": estimate.ess.detach().cpu().double().numpy(),
    }


def decompose(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the three gap columns (and their Monte Carlo standard errors) to a frame holding
    ``elbo_q``, ``elbo_q_star`` and ``log_px`` with their ``_stderr`` columns."""
    out = frame.copy()
    pairs = {"approximation": ("log_px", "elbo_q_star"), "amortization": ("elbo_q_star", "elbo_q"),
             "inference": ("log_px", "elbo_q")}
    for gap, (upper, lower) in pairs.items():
        out[gap] = out[upper] - out[lower]
        out[f"{gap}_stderr"] = np.hypot(out[f"{upper}_stderr"], out[f"{lower}_stderr"])
    return out


def summarize_column(values: pd.Series, mc_stderrs: pd.Series | None = None) -> dict[str, float]:
    """Mean over datapoints with two standard errors.

    ``stderr``: sample standard deviation over datapoints / sqrt(N), the uncertainty from which
    datapoints were evaluated (what matters when comparing models or papers).
    ``mc_stderr``: sqrt(sum of squared per-datapoint Monte Carlo errors) / N, the uncertainty from
    sampling alone, for these exact datapoints (what matters when re-running the same evaluation).
    """
    finite = values[np.isfinite(values)]
    n = len(finite)
    summary = {
        "mean": float(finite.mean()) if n else math.nan,
        "stderr": float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "num_datapoints": n,
    }
    if mc_stderrs is not None:
        se = mc_stderrs[np.isfinite(values)]
        summary["mc_stderr"] = float(np.sqrt(np.square(se).sum()) / n) if n else math.nan
    return summary


def find_faults(frame: pd.DataFrame, bounds: tuple[str, ...], flags: tuple[str, ...] = ()) -> pd.Series:
    """Numerical faults per datapoint: ``"ok"``, or the faults joined by ``";"``.

    A fault is a bound column of ``bounds`` that is NaN or infinite (``"<bound>_not_finite"``; the
    gaps are differences of bounds, so they are covered), or a boolean column of ``flags`` that is
    True (named after the column, e.g. ``"refine_diverged"``).
    """
    faults = [[] for _ in range(len(frame))]
    for name in bounds:
        for i in np.flatnonzero(~np.isfinite(frame[name].to_numpy(dtype=np.float64))):
            faults[i].append(f"{name}_not_finite")
    for name in flags:
        for i in np.flatnonzero(frame[name].to_numpy(dtype=bool)):
            faults[i].append(name)
    return pd.Series([";".join(f) if f else NO_FAULT for f in faults], index=frame.index, name="fault")


def fault_counts(frame: pd.DataFrame) -> dict[str, Any]:
    """``{"num_datapoints", "num_faulty", "counts": {fault: datapoints}}`` from a ``fault`` column."""
    counts: dict[str, int] = {}
    for faults in frame["fault"]:
        if faults != NO_FAULT:
            for fault in faults.split(";"):
                counts[fault] = counts.get(fault, 0) + 1
    return {"num_datapoints": len(frame), "num_faulty": int((frame["fault"] != NO_FAULT).sum()),
            "counts": dict(sorted(counts.items()))}


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """``{"bounds": {name: {mean, stderr, mc_stderr, num_datapoints}}, "gaps": {...}}``.

    With a ``fault`` column (:func:`find_faults`), the means cover the datapoints without faults
    only, the same datapoints for every bound and gap (so the gaps of the means are the means of
    the gaps), and ``"faults"`` (:func:`fault_counts`) says how many were left out and why.
    """
    usable = frame[frame["fault"] == NO_FAULT] if "fault" in frame else frame

    def block(names: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return {n: summarize_column(usable[n], usable.get(f"{n}_stderr")) for n in names}
    summary = {"bounds": block(BOUND_NAMES), "gaps": block(GAP_NAMES)}
    if "fault" in frame:
        summary["faults"] = fault_counts(frame)
    return summary


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def gap_frame(bounds: Mapping[str, Estimate], *, log_px: Callable[[pd.DataFrame], pd.DataFrame],
              extra: Mapping[str, torch.Tensor | np.ndarray] | None = None) -> pd.DataFrame:
    """The per-datapoint frame: every bound's columns, extra columns, the log p_hat(x) columns that
    ``log_px`` makes from that frame (``gapbench.estimators.log_px.selected_log_px``), the gaps and ``fault``
    (:func:`find_faults` over the bounds, log_px and the boolean ``*_diverged`` extra columns).

    ``bounds`` must hold at least ``elbo_q`` and ``elbo_q_star``.
    """
    columns: dict[str, np.ndarray] = {}
    for name, estimate in bounds.items():
        columns.update(estimate_columns(name, estimate))
    for name, value in (extra or {}).items():
        columns[name] = to_numpy(value)
    frame = pd.DataFrame(columns)
    frame = pd.concat([frame, log_px(frame)], axis=1)
    frame = decompose(frame)
    flags = tuple(name for name in columns if name.endswith("_diverged"))
    frame["fault"] = find_faults(frame, (*bounds, "log_px"), flags)
    return frame
