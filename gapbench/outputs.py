"""A run folder's outputs checked before they are used: their sha256 against the stage record, and
the rows of every per-datapoint file against the run's datapoints.

Every per-datapoint file (amortized.csv, local.csv, ais.csv, log_px.csv, datapoints.csv) holds an ``index``
column, the datapoint's position in the evaluated split, and frames are joined on it, never by
position. A file must hold each index 0..N-1 exactly once (N = ``eval.num_datapoints``); curve.csv
holds each datapoint (column ``datapoint``) once per step count. Which files are per datapoint:
``gapbench.runner.stage_table``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd


INDEX = "index"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_index(frame: pd.DataFrame, offset: int = 0) -> pd.DataFrame:
    """``frame`` (one row per datapoint, in order from ``offset``) with the ``index`` column first."""
    return pd.concat([pd.DataFrame({INDEX: np.arange(offset, offset + len(frame))}, index=frame.index), frame], axis=1)


def index_problem(frame: pd.DataFrame, num_datapoints: int) -> str | None:
    """Why ``frame`` is not one row for each datapoint 0..N-1 (None when it is)."""
    if INDEX not in frame:
        return None if len(frame) == num_datapoints else \
            f"it has {len(frame)} rows and no index column, but the run evaluates {num_datapoints} datapoints"
    index = pd.to_numeric(frame[INDEX], errors="coerce").to_numpy()
    expected = np.arange(num_datapoints)
    if len(index) != num_datapoints or not np.array_equal(np.sort(index), expected):
        missing = np.setdiff1d(expected, index)
        return (f"it holds {len(index)} rows for {len(np.unique(index[np.isfinite(index)]))} distinct datapoints, "
                f"but the run evaluates datapoints 0..{num_datapoints - 1}"
                + (f" ({len(missing)} missing, e.g. {missing[0]})" if len(missing) else ""))
    return None


def curve_problem(frame: pd.DataFrame, num_datapoints: int, num_steps: int) -> str | None:
    if "datapoint" not in frame:
        return "it has no datapoint column"
    counts = frame["datapoint"].value_counts()
    if set(counts.index) != set(range(num_datapoints)) or (counts != num_steps).any():
        return (f"it holds {len(frame)} rows for {len(counts)} datapoints, but the run has {num_datapoints} "
                f"datapoints x {num_steps} step counts")
    return None


def summary_problem(path: Path) -> str | None:
    """Why ``path`` is not a summary.json that the report, check and aggregate commands can read."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"it is not readable JSON ({error})"
    return summary_value_problem(summary)


def summary_value_problem(summary: object) -> str | None:
    """Why a parsed summary is not one (None when its bounds and gaps are numbers where expected)."""
    if not isinstance(summary, dict) or not all(isinstance(summary.get(k), dict) for k in ("bounds", "gaps")):
        return "it is not a gapbench summary (no bounds and gaps)"
    if not isinstance(summary.get("settings", {}), dict):
        return "its settings are not a JSON object"
    for block in ("bounds", "gaps", "other_bounds"):
        for name, entry in (summary.get(block) or {}).items():
            if not isinstance(entry, dict) or "mean" not in entry:
                return f"{block}.{name} holds no mean"
            for key in ("mean", "stderr", "mc_stderr", "num_datapoints"):
                value = entry.get(key, 0.0)
                if not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
                    return f"{block}.{name}.{key} is {value!r}, not a number"
    return None


def join_on_index(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-datapoint frames side by side, matched by their ``index`` column (one ``index`` column kept)."""
    joined = pd.concat([f.set_index(INDEX) for f in frames], axis=1, join="inner")
    if any(len(f) != len(joined) for f in frames):
        raise ValueError("per-datapoint frames hold different datapoints")
    return joined.sort_index().rename_axis(INDEX).reset_index()
