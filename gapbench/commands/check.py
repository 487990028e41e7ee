"""Regression check: did a run's bounds and gaps move, beyond chance, from a baseline's?

For each quantity (every bound and gap of ``summary.json``: ``bounds.*``, ``gaps.*``,
``other_bounds.*``) the difference of the two means is tested with a two-sided z-test,

    z = (mean_run - mean_baseline) / sqrt(mc_stderr_run^2 + mc_stderr_baseline^2),

using the Monte Carlo standard errors. Both runs evaluate the same datapoints (the settings,
including the sha256 of the evaluation data, must agree), so the spread over datapoints (``stderr``)
is shared and cancels in the difference; what can differ between two honest evaluations of the same
model on the same datapoints is the Monte Carlo noise, whose standard error over the N datapoints is
``mc_stderr`` = sqrt(sum of squared per-datapoint errors) / N. Using ``stderr`` instead would hide
changes 10 to 100 times larger.

With m quantities tested at once, a quantity counts as moved when |z| > z*, the Bonferroni
threshold for a family-wise false-alarm rate ``alpha``: z* = Phi^-1(1 - alpha / (2 m)) (3.23 for
m = 8 and alpha = 0.01). Bonferroni holds whatever the correlation between quantities (the gaps are
differences of the bounds), at the price of being conservative. An optional ``min_difference`` (nats)
ignores moves too small to matter even when they are significant.

What the test does not cover: a code change that changes training's random numbers trains another
model, whose numbers differ by more than Monte Carlo noise. That is a real change of the numbers;
look at the table and, if it is intended, regenerate the baseline (``--update``). On the same machine
type and torch version, an unchanged gapbench gives identical numbers (z = 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple

from gapbench.errors import GapbenchError
from gapbench.outputs import summary_value_problem

BASELINE_FORMAT = "gapbench-baseline"
BASELINE_VERSION = 1
BLOCKS = ("bounds", "gaps", "other_bounds")
DEFAULT_ALPHA = 0.01
# settings that do not change a number, or only in the last bits (CPU and GPU arithmetic): the z-test judges those
IGNORED_SETTINGS = ("name", "device")


class CheckError(GapbenchError, ValueError):
    """A comparison that cannot be made (missing or unreadable file, different settings)."""


class Row(NamedTuple):
    quantity: str  # e.g. "gaps.amortization"
    baseline: float  # baseline mean (nats)
    run: float  # run mean (nats)
    difference: float  # run - baseline
    stderr: float  # sqrt(mc_stderr_run^2 + mc_stderr_baseline^2)
    z: float  # difference / stderr (0 when both are 0, inf when only the stderr is 0)
    is_moved: bool


class CheckResult(NamedTuple):
    rows: list[Row]
    z_threshold: float
    alpha: float
    notes: list[str]  # differences that are not numbers (versions, faults, missing quantities)
    is_moved: bool  # some quantity moved, or the run has faults the baseline had not


def read_summary(path: str | Path) -> dict[str, Any]:
    """A summary from a run folder, a ``summary.json`` or a baseline file."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        what = "run folder" if path.is_dir() else "file"
        raise CheckError(f"{file} does not exist; pass a finished run folder or its summary.json "
                         f"(the {what} {path} holds no summary)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckError(f"{file} is not readable JSON ({error}); regenerate it") from None
    if isinstance(data, dict) and data.get("format") == BASELINE_FORMAT:
        if data.get("format_version") != BASELINE_VERSION:
            raise CheckError(f"{file} is a baseline of format_version {data.get('format_version')!r}, but this "
                             "gapbench "
                             f"reads version {BASELINE_VERSION}; regenerate it with gapbench check RUN_DIR --baseline "
                             f"{file} --update, or use the gapbench version that wrote it")
        data = data.get("summary")
    if not isinstance(data, dict) or not any(isinstance(data.get(b), dict) for b in BLOCKS):
        raise CheckError(f"{file} is neither a gapbench summary.json nor a baseline; pass the right file")
    problem = summary_value_problem(data)
    if problem is not None:
        raise CheckError(f"{file} cannot be compared: {problem}; regenerate it (a baseline with --update)")
    if not _entries(data):
        raise CheckError(f"{file} holds no bound or gap to compare (its bounds, gaps and other_bounds are empty); "
                         "regenerate it from a finished run (a baseline with --update)")
    return data


def z_threshold(alpha: float, num_tests: int) -> float:
    """Two-sided Bonferroni threshold: Phi^-1(1 - alpha / (2 m))."""
    if not 0 < alpha < 1:
        raise CheckError(f"alpha must be in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1 - alpha / (2 * max(num_tests, 1)))


def _entries(summary: dict) -> dict[str, dict]:
    return {f"{block}.{name}": entry for block in BLOCKS for name, entry in (summary.get(block) or {}).items()
            if isinstance(entry, dict) and "mean" in entry}


def _settings_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for k in sorted(set(a) | set(b)) if k not in IGNORED_SETTINGS or prefix
                for key in _settings_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def compare(run: dict, baseline: dict, *, alpha: float = DEFAULT_ALPHA, min_difference: float = 0.0) -> CheckResult:
    """Compare two summaries; CheckError if their settings differ (they measure different things)."""
    changed = _settings_diff(baseline.get("settings", {}), run.get("settings", {}))
    if changed:
        raise CheckError(
            f"the run and the baseline were made with different settings ({', '.join(changed)}), so their "
            "numbers are not comparable; rerun with the baseline's experiment, or, if the new settings are "
            "intended, regenerate the baseline with --update"
        )
    notes = []
    base_entries, run_entries = _entries(baseline), _entries(run)
    shared = [q for q in base_entries if q in run_entries]
    if not shared:
        raise CheckError("the run and the baseline have no bound or gap in common, so nothing can be compared; "
                         "regenerate the baseline from a run of this gapbench version with --update")
    threshold = z_threshold(alpha, len(shared))
    rows, is_moved = [], False
    for quantity in shared:
        b, r = base_entries[quantity], run_entries[quantity]
        difference = r["mean"] - b["mean"]
        stderr = math.hypot(r.get("mc_stderr", math.nan), b.get("mc_stderr", math.nan))
        if r["mean"] == b["mean"] or (math.isnan(r["mean"]) and math.isnan(b["mean"])):
            z = 0.0
        elif stderr > 0:
            z = difference / stderr
        else:
            z = math.copysign(math.inf, difference)
        moved = not abs(z) <= threshold and not abs(difference) <= min_difference  # NaN counts as moved
        rows.append(Row(quantity, b["mean"], r["mean"], difference, stderr, z, moved))
        is_moved |= moved
    for quantity in base_entries:
        if quantity not in run_entries:
            notes.append(f"{quantity} is in the baseline but not in the run")
            is_moved = True
    for quantity in run_entries:
        if quantity not in base_entries:
            notes.append(f"{quantity} is new (not in the baseline); not checked")
    base_faults = (baseline.get("faults") or {}).get("num_faulty", 0)
    run_faults = (run.get("faults") or {}).get("num_faulty", 0)
    if run_faults > base_faults:
        notes.append(f"numerical faults: {run_faults} datapoints in the run, {base_faults} in the baseline "
                     f"({(run.get('faults') or {}).get('counts')}); see datapoints.csv, column fault")
        is_moved = True
    for key in sorted(set(baseline.get("versions", {})) | set(run.get("versions", {}))):
        old, new = baseline.get("versions", {}).get(key), run.get("versions", {}).get(key)
        if old != new:
            notes.append(f"{key} {old} in the baseline, {new} in the run")
    return CheckResult(rows, threshold, alpha, notes, is_moved)


def format_table(result: CheckResult) -> str:
    """A Markdown table of every quantity, moved ones marked."""
    lines = ["| quantity | baseline | run | difference | ± MC stderr | z | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in result.rows:
        lines.append(f"| {row.quantity} | {row.baseline:.4f} | {row.run:.4f} | {row.difference:+.4f} | "
                     f"{row.stderr:.4f} | {row.z:+.2f} | {'MOVED' if row.is_moved else 'ok'} |")
    return "\n".join(lines) + "\n"


def make_baseline(summary: dict, *, config: dict | None) -> dict:
    """The baseline file's contents: the run's summary and the resolved config that made it."""
    return {
        "format": BASELINE_FORMAT, "format_version": BASELINE_VERSION,
        "how_to_remake": "gapbench run EXPERIMENT.toml --out RUN_DIR, then "
                         "gapbench check RUN_DIR --baseline THIS_FILE --update ('config' below is the "
                         "experiment, every default filled in)",
        "config": config,
        "summary": summary,
    }
