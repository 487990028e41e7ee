"""Partial results of an evaluation stage, one file per unit of datapoints, so a stopped stage resumes.

A unit is a contiguous range [start, stop) of evaluation datapoints. Its per-datapoint columns and
tensors (e.g. the q* parameters) are saved atomically to ``partial/<name>/<start>-<stop>.pt`` together
with the stage's key: the sha256 of the stage's config and of the files it reads (the trained
weights, local.pt), see ``stages.partial_key``. A file is used only when its key, its range
and its row count fit the unit asked for; anything else (another config, other weights, another
batching, a damaged file) is deleted and the unit is computed again. The folder goes when the stage's
output is written.

:func:`run_units` drives the units of every rank in rounds: rank 0 decides before each round whether
to stop (time limit, SIGTERM) and tells the others, so every rank stops after the same round.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd
import torch

from gapbench import io
from gapbench.deadline import StopRequested
from gapbench.runner.distributed import Ranks, broadcast, gather

PARTIAL = "partial"
PARTIAL_FORMAT = "gapbench-partial"


class Unit(NamedTuple):
    """Datapoints [start, stop) of the evaluation data."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


INDEX_COLUMNS = ("index", "datapoint")  # a frame with one of them has its datapoints' numbers there


class UnitResult(NamedTuple):
    frame: pd.DataFrame  # one row per datapoint of the unit, in order (or several, numbered in an index column)
    tensors: dict[str, torch.Tensor]  # each (unit size, ...), on the CPU; {} when there are none


def _fits(unit: Unit, frame: pd.DataFrame, tensors: dict[str, torch.Tensor]) -> bool:
    """Rows and tensors are the unit's: one row per datapoint, or rows numbered within [start, stop)."""
    index = next((frame[c].to_numpy() for c in INDEX_COLUMNS if c in frame), None)
    rows_fit = (len(frame) == unit.size if index is None
                else len(frame) > 0 and index.min() >= unit.start and index.max() < unit.stop)
    return rows_fit and all(v.shape[0] == unit.size for v in tensors.values())


def _column_value(column: pd.Series) -> torch.Tensor | list[str]:
    """A frame column as torch.save stores it for ``weights_only`` loading: numbers as a tensor, text
    (an estimator's name) as a list of strings."""
    if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
        return [str(v) for v in column]
    return torch.from_numpy(column.to_numpy().copy())


class PartialStore:
    """``partial/<name>/`` of a run folder, for the stage key ``key``."""

    def __init__(self, run_dir: Path, name: str, key: str):
        self.dir = Path(run_dir) / PARTIAL / name
        self.key = key

    def _path(self, unit: Unit) -> Path:
        return self.dir / f"{unit.start:07d}-{unit.stop:07d}.pt"

    def save(self, unit: Unit, result: UnitResult) -> None:
        if not _fits(unit, *result):
            raise ValueError(f"the result of datapoints [{unit.start}, {unit.stop}) has rows of other datapoints")
        io.save_torch(self._path(unit), {
            "format": PARTIAL_FORMAT, "key": self.key, "start": unit.start, "stop": unit.stop,
            "columns": list(result.frame.columns),
            "values": [_column_value(result.frame[c]) for c in result.frame],
            "tensors": result.tensors,
        })

    def load(self, unit: Unit) -> UnitResult | None:
        """The unit's saved result when it belongs to this key and range; None otherwise (a file that
        does not fit is removed)."""
        path = self._path(unit)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            if (saved["format"] == PARTIAL_FORMAT and saved["key"] == self.key
                    and (saved["start"], saved["stop"]) == unit):
                frame = pd.DataFrame({c: v.numpy() if isinstance(v, torch.Tensor) else pd.array(v, dtype=object)
                                      for c, v in zip(saved["columns"], saved["values"], strict=True)})
                if _fits(unit, frame, saved["tensors"]):
                    return UnitResult(frame, dict(saved["tensors"]))
        except Exception:  # a damaged or foreign file is redone, never used
            pass
        path.unlink(missing_ok=True)
        return None

    def remove_others(self, units: list[Unit]) -> None:
        """Delete files of ranges that are not units of this plan (another batching)."""
        keep = {self._path(u).name for u in units}
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                if path.name not in keep:
                    path.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        parent = self.dir.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def run_units(plan: list[list[Unit]], compute: Callable[[Unit], UnitResult], *, store: PartialStore | None,
              ranks: Ranks, should_stop: Callable[[], bool], what: str,
              on_round: Callable[[int], None] = lambda num_datapoints: None,
              on_saved: Callable[[int], None] = lambda num_datapoints: None) -> list[UnitResult] | None:
    """Every unit's result, from ``store`` where saved, else computed; on rank 0 in datapoint order,
    None on the other ranks.

    plan : the units of every rank, ``plan[r]`` those of rank r (one list without torchrun)
    compute : a unit's result; it may raise StopRequested inside the unit (one process only), and the
        unit is then computed again on resume
    store : rank 0's store (None on other ranks); each new result is saved there before the next unit
    should_stop : asked (on rank 0; the others get its answer) before each round with work to do;
        when it says yes, StopRequested is raised on every rank with ``what`` done and remaining
    on_round : called (on every rank) with the number of datapoints each computed round settled
    on_saved : called once with the number of datapoints found in ``store``
    """
    mine = plan[ranks.rank]
    done: dict[Unit, UnitResult] = {}
    if ranks.is_main:
        every = [u for units in plan for u in units]
        store.remove_others(every)
        done = {u: r for u in every if (r := store.load(u)) is not None}
    saved = broadcast(set(done) if ranks.is_main else None, ranks)
    on_saved(sum(u.size for u in saved))
    total = sum(u.size for units in plan for u in units)
    for i in range(max(len(units) for units in plan)):
        todo = [units[i] for units in plan if i < len(units) and units[i] not in saved]
        if not todo:
            continue
        finished = sum(u.size for u in (done if ranks.is_main else saved))
        stopped = f"[{what}] {finished} of {total} datapoints done, {total - finished} remain"
        if broadcast(should_stop() if ranks.is_main else None, ranks):
            raise StopRequested(stopped)
        unit = mine[i] if i < len(mine) and mine[i] not in saved else None
        try:
            result = compute(unit) if unit is not None else None
        except StopRequested:  # inside the unit: it is redone on resume
            raise StopRequested(stopped) from None
        for pair in gather((unit, result), ranks) or []:
            if pair[0] is not None:
                store.save(*pair)
                done[pair[0]] = pair[1]
        on_round(sum(u.size for u in todo))
    if not ranks.is_main:
        return None
    return [done[u] for u in sorted(done)]


def units_of(ranges: list[range], size: int) -> list[Unit]:
    """``ranges`` (batches of datapoints) cut into units of at most ``size`` datapoints."""
    return [Unit(start, min(start + size, r.stop)) for r in ranges for start in range(r.start, r.stop, size)]


def concat(results: list[UnitResult]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One frame (rows in unit order) and the tensors joined along the first dimension."""
    frame = pd.concat([r.frame for r in results], ignore_index=True) if results else pd.DataFrame()
    names = results[0].tensors.keys() if results else ()
    return frame, {k: torch.cat([r.tensors[k] for r in results]) for k in names}
