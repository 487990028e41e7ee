"""Run folders and experiment files written by earlier gapbench versions, read in the current form.

Every function here reads one older format and returns the current one, so the rest of the runner
knows only the current form. Each says which format it reads. The formats:

- configs without keys or sections added since (``[ais]``, ``[curve]``, ``model.posterior``, ...):
  :func:`comparable_config`, :func:`checkpoint_config`, :func:`rehash_records`;
- ``refine.family = "ffg"``, the single local family: :func:`refine_families`;
- resolved configs without the second-layer, external-model and user-file keys:
  :func:`omit_unused_keys` keeps them out of every resolved config that does not use them, so those
  folders' stage hashes still match;
- stages.json records without config hashes: :func:`adopt_unhashed_records`;
- stage records without the sha256 of their outputs: :func:`unrecorded_output_problem`;
- per-datapoint files without the ``index`` column: :func:`with_index_column`;
- local.csv and local.pt of one family (unsuffixed columns, tensors at the top level), and local.csv
  without divergence flags: :func:`local_in_current_form`, :func:`q_star_by_family`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from gapbench import io
from gapbench.outputs import INDEX, curve_problem, index_problem, summary_problem, with_index
from gapbench.runner.stage_table import CURVE, PER_DATAPOINT, section_hash


def comparable_config(previous: dict, current: dict) -> dict:
    """Reads: the config.json of a run folder written by any version. Returns it in the current form:
    keys it lacks take their defaults, and a section it lacks (one added since, such as ``[ais]``) takes
    the current value, since nothing in that folder depends on it, so the folder resumes and only the new
    stage runs. A config that does not validate is returned as it is (and then differs)."""
    from gapbench.runner.config import ConfigError, parse_config

    try:
        normalized = parse_config(previous, source="config.json", ignore_unknown=True).model_dump(mode="json")
    except ConfigError:
        return previous
    for section, value in current.items():
        if section not in previous:
            normalized[section] = value
    return normalized


def checkpoint_config(saved: dict, path: str | Path) -> dict:
    """Reads: the config inside a checkpoint.pt of any version. Returns it as the current version
    resolves it: keys added since (``model.posterior``) take their defaults, so the checkpoint still
    matches its run's config. One that does not validate is returned as it is."""
    from gapbench.runner.config import ConfigError, parse_config

    try:
        return parse_config(saved, source=str(path), ignore_unknown=True).model_dump(mode="json")
    except ConfigError:
        return saved


def refine_families(refine: dict) -> dict:
    """Reads: an experiment file's ``[refine]`` with ``family = "ffg"`` (one local family). Returns it with
    ``families = ["ffg"]``; ValueError when both keys are given."""
    if "family" not in refine:
        return refine
    if "families" in refine:
        raise ValueError("refine.family and refine.families are both given; keep refine.families "
                         "(refine.family is its old single-family form)")
    refine = dict(refine)
    family = refine.pop("family")
    refine["families"] = [family] if isinstance(family, str) else family
    return refine


def omit_unused_keys(data: dict[str, Any], keys: tuple[str, ...], *, is_used: bool) -> dict[str, Any]:
    """Writes a resolved config section as folders made before ``keys`` existed have it: without them
    when the run does not use them, so those folders' config.json, stage hashes, checkpoints and summary
    settings still match."""
    if not is_used:
        for key in keys:
            data.pop(key, None)
    return data


def rehash_records(path: Path, recorded: dict, normalized: dict, records: dict[str, dict]) -> None:
    """Reads: stages.json records made under a config.json of an earlier version (keys added since
    missing), which hash differently from the same config in the current form (``normalized``). Gives
    them the hash of the current form, so a new key at its default redoes nothing."""
    changed = False
    for stage, record in records.items():
        if record.get("config_sha256") == section_hash(recorded, stage) != section_hash(normalized, stage):
            record["config_sha256"] = section_hash(normalized, stage)
            changed = True
    if changed:
        io.write_json(path / "stages.json", records)


def adopt_unhashed_records(path: Path, resolved: dict, records: dict[str, dict]) -> None:
    """Reads: stages.json records without ``config_sha256``. Those were written by a version that redid
    every stage on a config change, so they belong to config.json, which equals ``resolved`` by now: they
    get its hashes."""
    unhashed = [stage for stage, record in records.items() if "config_sha256" not in record]
    for stage in unhashed:
        records[stage] = {"config_sha256": section_hash(resolved, stage), **records[stage]}
    if unhashed:
        io.write_json(path / "stages.json", records)


def unrecorded_output_problem(file: Path, resolved: dict) -> str | None:
    """Reads: an output whose stage record holds no sha256 for it. Such a file is checked by its content:
    a per-datapoint file holds one row per datapoint, curve.csv one per datapoint and step count, and
    summary.json is a summary; why it does not (None when it does, or for other files)."""
    num_datapoints = resolved["eval"]["num_datapoints"]
    if file.name in PER_DATAPOINT or file.name == CURVE:
        try:
            frame = io.read_csv(file)
        except (OSError, ValueError) as error:
            return f"it is not a readable CSV ({str(error).strip().splitlines()[0] if str(error).strip() else error})"
        if file.name == CURVE:
            return curve_problem(frame, num_datapoints, len(resolved.get("curve", {}).get("steps", [])))
        return index_problem(with_index_column(frame, num_datapoints), num_datapoints)
    if file.name == "summary.json":
        return summary_problem(file)
    return None


def with_index_column(frame: pd.DataFrame, num_datapoints: int) -> pd.DataFrame:
    """Reads: a per-datapoint frame without the ``index`` column. One of exactly ``num_datapoints`` rows is
    datapoints 0..N-1 in order and gets that column; any other frame is returned as it is."""
    if INDEX not in frame and len(frame) == num_datapoints:
        return with_index(frame)
    return frame


def local_in_current_form(local: pd.DataFrame, own: str) -> pd.DataFrame:
    """Reads: local.csv of any version. One of a single family (unsuffixed columns: elbo_q_star, ...) gets
    its columns suffixed with the encoder's family ``own``; one without divergence flags gets
    ``refine_diverged_<own>`` = False."""
    if "elbo_q_star" in local and f"elbo_q_star_{own}" not in local:
        local = local.rename(columns={column: (column.replace("q_star", f"q_star_{own}") if "q_star" in column
                                               else f"{column}_{own}")
                                      for column in local.columns if column != INDEX})
    if f"refine_diverged_{own}" not in local:
        local = local.assign(**{f"refine_diverged_{own}": False})
    return local


def q_star_by_family(saved: Any, families: list[str]) -> dict[str, Any]:
    """Reads: the content of local.pt of any version. Returns {family: {name: tensor}}; a file of one family
    ({name: tensor} at the top level) serves every family asked for."""
    return {family: saved.get(family, saved) for family in families}
