"""A finished stage's files read back for the next stage: refused (RunError, exit 2, with the fix)
when they are not what the stage wrote for this run, never turned into numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from gapbench import io
from gapbench.outputs import INDEX, index_problem, summary_problem
from gapbench.runner import migrate
from gapbench.runner.checkpoints import safe_load
from gapbench.runner.rundir import RunError

REDO = "delete it (and stages.json's record of its stage) and rerun the same command to redo the stage"


def read_finished(path: Path, config) -> pd.DataFrame:
    """A per-datapoint file of a finished stage, ordered by datapoint index (``gapbench.outputs``; a file
    without the index column: ``migrate.with_index_column``)."""
    try:
        frame = migrate.with_index_column(io.read_csv(path), config.eval.num_datapoints)
    except (OSError, ValueError) as error:
        raise RunError(f"{error}; {REDO}") from None
    problem = index_problem(frame, config.eval.num_datapoints)
    if problem is not None:
        raise RunError(f"{path} cannot be used: {problem}; {REDO}")
    return frame.sort_values(INDEX, kind="stable", ignore_index=True)


def read_summary_of(run_dir: Path) -> dict:
    """summary.json of a finished report stage."""
    path = Path(run_dir) / "summary.json"
    problem = summary_problem(path)
    if problem is not None:
        raise RunError(f"{path} cannot be used: {problem}; {REDO}")
    return json.loads(path.read_text())


def read_q_star(path: Path, family: str, num_datapoints: int) -> dict[str, torch.Tensor]:
    """The parameters of ``family``'s q* from local.pt ({family: {name: (N, ...)}}, or one family's
    ``migrate.q_star_by_family``), loaded with weights_only=True and checked."""
    saved = safe_load(path, "gapbench local.pt (the refined q* parameters)", REDO)
    params = migrate.q_star_by_family(saved, [family])[family] if isinstance(saved, dict) else None
    if not (isinstance(params, dict) and params
            and all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == num_datapoints
                    for v in params.values())):
        raise RunError(f"{path} does not hold the q*_{family} parameters of {num_datapoints} datapoints; {REDO}")
    return params
