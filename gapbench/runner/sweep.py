"""Sweeps: one experiment file, several runs; and their aggregate over seeds.

An experiment may hold a ``[sweep]`` table mapping config keys (dotted, or as nested tables) to lists
of values:

    [sweep]
    seed = [0, 1, 2]
    "refine.init" = ["encoder", "prior"]

``gapbench run`` expands the product (here 6 runs) into sub-folders of the output folder named after
the values (``seed=0,refine.init=encoder``), runs each as a plain run (resumable, sharded under
torchrun), and writes ``sweep.json`` listing them. ``gapbench aggregate DIR...`` groups finished runs
by every config value that differs between them except the seed, and gives, per group, the mean over
seeds of each bound and gap with its spread: the standard deviation over seeds and the standard
error of their mean (sd / sqrt(number of seeds)).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from gapbench.runner.config import (ConfigError, ExperimentConfig, apply_overrides, parse_config, parse_overridden,
    read_raw)
from gapbench.outputs import summary_problem

SWEEP_FILE = "sweep.json"
QUANTITIES = (("bounds", "log_px"), ("bounds", "elbo_q_star"), ("bounds", "elbo_q"), ("gaps", "approximation"),
              ("gaps", "amortization"), ("gaps", "inference"))


class SweepPoint(NamedTuple):
    """One run of a sweep: its sub-folder name, the swept values and the validated config."""

    label: str
    values: dict[str, Any]
    config: ExperimentConfig


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"refine": {"init": [...]}} -> {"refine.init": [...]}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _label(values: dict[str, Any]) -> str:
    return ",".join(f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                    for key, value in values.items()).replace("/", "_").replace(" ", "")


def expand(path: str | Path, overrides: list[str] | None = None) -> list[SweepPoint]:
    """The runs of an experiment file: one point with label "" when it has no ``[sweep]``."""
    raw = apply_overrides(read_raw(path), overrides or [])
    sweep = raw.pop("sweep", None)
    if sweep is None:
        return [SweepPoint("", {}, parse_overridden(read_raw(path), overrides or [], source=str(path)))]
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{path}: [sweep] must map config keys to lists of values, e.g. seed = [0, 1, 2]")
    axes = _flatten(sweep)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: [sweep] {key} must be a non-empty list of values, e.g. {key} = [...], "
                              f"got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{path}: [sweep] {key} lists a value twice; list each value once")
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if key in axes:
            raise ConfigError(f"--set {key} conflicts with [sweep] {key} in {path}; remove one of them")
    points = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        point = json.loads(json.dumps(raw))
        for key, value in values.items():
            *parents, leaf = key.split(".")
            node = point
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{path}: [sweep] {key}: {part!r} is a value, not a section")
            node[leaf] = value
        label = _label(values)
        points.append(SweepPoint(label, values, parse_config(point, source=f"{path} [sweep] {label}")))
    return points


def write_index(out: Path, path: str | Path, points: list[SweepPoint]) -> None:
    """sweep.json: the experiment file, the swept keys and each run's folder and values."""
    from gapbench import io

    io.write_json(out / SWEEP_FILE, {"experiment": str(path), "runs": [{"folder": p.label, "values": p.values}
                                                                     for p in points]})


# --- aggregation ------------------------------------------------------------------------------------

def run_folders(paths: list[str | Path]) -> list[Path]:
    """Finished run folders: each path itself when it holds summary.json, else its sub-folders that do."""
    folders = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            folders.append(path)
        elif path.is_dir():
            folders.extend(sorted(p for p in path.iterdir() if (p / "summary.json").is_file()))
        else:
            raise ConfigError(f"{path} is not a run folder or a sweep folder")
    if not folders:
        raise ConfigError(f"no finished runs (folders with summary.json) in {', '.join(map(str, paths))}; "
                          "run the sweep first with gapbench run EXPERIMENT.toml")
    return folders


def runs_frame(folders: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: the config keys that differ between runs, the seed and each quantity's mean;
    and the differing keys other than the seed (the grouping)."""
    rows, configs = [], []
    for folder in folders:
        problem = summary_problem(folder / "summary.json")
        if problem is not None:
            raise ConfigError(f"{folder / 'summary.json'} cannot be used: {problem}; rerun the run's command to "
                              "redo its report stage, or leave the folder out")
        summary = json.loads((folder / "summary.json").read_text())
        if not isinstance(summary.get("settings", {}).get("seed"), int):
            raise ConfigError(f"{folder / 'summary.json'} has no settings.seed; rerun the run's command to redo "
                              "its report stage, or leave the folder out")
        config_path = folder / "config.json"
        config = _flatten(json.loads(config_path.read_text())) if config_path.is_file() else {}
        configs.append(config)
        rows.append({"folder": str(folder), "seed": summary["settings"]["seed"],
                     **{name: summary[block][name]["mean"] for block, name in QUANTITIES}})
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if k not in ("seed", "name")
                 and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    frame = pd.DataFrame(rows)
    for key in differing:
        frame[key] = [json.dumps(c.get(key)) if isinstance(c.get(key), (list, dict)) else c.get(key) for c in configs]
    return frame, differing


def aggregate(folders: list[Path]) -> pd.DataFrame:
    """Per group of runs equal in everything but the seed: number of seeds, and for each quantity the
    mean over seeds, the standard deviation over seeds (ddof 1) and the standard error of the mean."""
    frame, keys = runs_frame(folders)
    groups = frame.groupby(keys, dropna=False, sort=False) if keys else [((), frame)]
    out = []
    for group_key, group in groups:
        group_key = group_key if isinstance(group_key, tuple) else (group_key,)
        row = dict(zip(keys, group_key))
        row["num_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"]))
        for _, name in QUANTITIES:
            values = group[name].to_numpy(dtype=float)
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            row[name] = float(values.mean())
            row[f"{name}_sd"] = sd
            row[f"{name}_se"] = sd / math.sqrt(len(values))
        out.append(row)
    return pd.DataFrame(out)


def aggregate_markdown(table: pd.DataFrame) -> str:
    """One line per group: mean ± standard error over seeds (and the standard deviation)."""
    keys = [c for c in table.columns if c not in {"num_seeds", "seeds"} and not c.startswith(
        tuple(name for _, name in QUANTITIES))]
    names = [name for _, name in QUANTITIES]
    header = [*keys, "seeds", *[f"{n} (mean ± se, sd)" for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * (1 + len(names))]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in keys] + [str(row["num_seeds"])]
        for n in names:
            se = "" if math.isnan(row[f"{n}_se"]) else f" ± {row[f'{n}_se']:.3f}, {row[f'{n}_sd']:.3f}"
            cells.append(f"{row[n]:.3f}{se}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
