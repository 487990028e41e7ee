"""The stages of a run, one entry each: what a stage hashes, reads and writes, and when it runs.

    stage        config sections it hashes           reads          outputs                    runs when
    train        seed, data, model, train            -              checkpoint.pt,
                                                                    train_history.csv
    amortized    ... and eval                        train          amortized.csv
    local        ... eval and refine                 train          local.pt, local.csv
    ais          ... refine and ais (from q*)        train, local   ais.csv                    ais.enabled
    calibration  seed, data, model, train, ais       train          ais_calibration.json       ... and
                                                                                               calibration_datapoints
    log_px       the same as ais                     the pilots     log_px.csv
    curve        ... eval, refine (L[q*]), curve     train, local   curve.csv                  curve.enabled
    report       all of them and name                every stage    datapoints.csv,
                                                                    summary.json, table.md

Adding a stage means one :class:`Stage` in :data:`STAGE_TABLE` (and its function in
``gapbench.runner.stages``). Every other module asks this table: the run folder's records
(``rundir``), the stage hashes (:func:`hashed_sections`), the partial results' keys and the driver.

A stage's hash covers the config sections it depends on, less the keys that change none of its
numbers (:func:`hashed_sections`): the ``train.semi_amortized_*`` keys while
``train.semi_amortized_steps = 0`` (the plain VAE), ``train.data_parallel`` while it is false, the
``[curve]`` section while ``curve.enabled`` is false, the ``ais.calibration_*`` keys for the stages
that do not use them (and for every stage while ``ais.calibration_datapoints = 0``), and the AIS
health thresholds (``ais.flag_*``) except, for the stages that use them, where they differ from their
defaults, and ``refine.flow_init`` for AIS unless its chains start from q* (``ais.init = "q_star"``).
So a run whose config changes only such a key keeps its finished stages. (AIS from the prior or the
encoder depends on no other ``refine`` key either; those stay in its hash so that the hashes of
folders written before this rule still match.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, NamedTuple

from gapbench.estimators.health import AIS_FLAG_DEFAULTS

CHECKPOINT = "checkpoint.pt"


class Stage(NamedTuple):
    """One stage of a run: its facts, read by every part of the runner."""

    name: str
    sections: tuple[str, ...]  # config sections whose values its outputs depend on (hashed)
    reads: tuple[str, ...]  # the stages whose outputs it may read: redoing one of them redoes this one
    outputs: tuple[str, ...]  # the files it writes into the run folder, recorded with their sha256
    per_datapoint: tuple[str, ...] = ()  # outputs with one row per datapoint (column ``index``)
    stream: int = 0  # its random stream's number: fixed, so adding a stage changes no other's numbers
    is_enabled: Callable[[Any], bool] = lambda config: True  # whether it runs for an ExperimentConfig
    read_files: Callable[[Any], tuple[str, ...]] = lambda config: ()  # files keying its partial results
    hashes_ais_flags: bool = False  # its hash covers the AIS health thresholds set away from their defaults
    hashes_calibration: bool = False  # its hash covers ais.calibration_* (while calibration runs)
    # the stages of ``reads`` it reads under a config (its JSON form), where that is fewer (see stages_read)
    reads_under: Callable[[dict], tuple[str, ...]] | None = None


MODEL = ("seed", "data", "model", "train")
EVALUATION = (*MODEL, "eval")

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("train", MODEL, (), (CHECKPOINT, "train_history.csv"), stream=1),
    Stage("amortized", EVALUATION, ("train",), ("amortized.csv",), ("amortized.csv",), stream=2,
          read_files=lambda config: (CHECKPOINT,)),
    Stage("local", (*EVALUATION, "refine"), ("train",), ("local.pt", "local.csv"), ("local.csv",), stream=3,
          read_files=lambda config: (CHECKPOINT,)),
    Stage("ais", (*EVALUATION, "refine", "ais"), ("train", "local"), ("ais.csv",), ("ais.csv",), stream=5,
          is_enabled=lambda config: config.ais.enabled,
          reads_under=lambda resolved: ("train", "local") if resolved["ais"]["init"] == "q_star" else ("train",),
          read_files=lambda config: (CHECKPOINT, "local.pt") if config.ais.init == "q_star" else (CHECKPOINT,)),
    Stage("calibration", (*MODEL, "ais"), ("train",), ("ais_calibration.json",), stream=8,
          is_enabled=lambda config: config.ais.enabled and config.ais.calibration_datapoints > 0,
          hashes_calibration=True),
    Stage("log_px", (*EVALUATION, "refine", "ais"), ("train", "amortized", "local", "ais"), ("log_px.csv",),
          ("log_px.csv",), stream=7, hashes_ais_flags=True,
          read_files=lambda config: (CHECKPOINT, "amortized.csv", "local.csv", "local.pt",
                                     *(("ais.csv",) if config.ais.enabled else ()))),
    Stage("curve", (*EVALUATION, "refine", "curve"), ("train", "local"), ("curve.csv",), stream=6,
          is_enabled=lambda config: config.curve.enabled,
          read_files=lambda config: (CHECKPOINT, "local.csv")),
    Stage("report", ("name", *EVALUATION, "refine", "ais", "curve"),
          ("train", "amortized", "local", "ais", "calibration", "log_px", "curve"),
          ("datapoints.csv", "summary.json", "table.md"), ("datapoints.csv",), stream=4,
          hashes_ais_flags=True, hashes_calibration=True),
)
STAGE_OF: dict[str, Stage] = {stage.name: stage for stage in STAGE_TABLE}
STAGES: tuple[str, ...] = tuple(STAGE_OF)  # in the order they run: a stage's readers come after it
PER_DATAPOINT: tuple[str, ...] = tuple(name for stage in STAGE_TABLE for name in stage.per_datapoint)
CURVE = "curve.csv"  # per datapoint and step count (column ``datapoint``)


def stages_read(stage: str, resolved: dict) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads under the config ``resolved`` (JSON form): AIS reads the
    local stage's q* only when it starts there (``ais.init = "q_star"``), so a local stage redone (its
    local.pt lost, say) redoes AIS from the prior or the encoder only if the config changed."""
    facts = STAGE_OF[stage]
    return facts.reads if facts.reads_under is None else facts.reads_under(resolved)


def hashed_sections(resolved: dict, stage: str) -> dict:
    """The config sections (JSON form) ``stage`` depends on, less the keys that change none of its
    numbers (see the module docstring)."""
    facts = STAGE_OF[stage]
    sections = {key: resolved.get(key) for key in facts.sections}
    train = sections.get("train")
    if isinstance(train, dict):
        if not train.get("semi_amortized_steps"):
            train = {k: v for k, v in train.items() if not k.startswith("semi_amortized_")}
        if not train.get("data_parallel"):
            train = {k: v for k, v in train.items() if k != "data_parallel"}
        sections["train"] = train
    ais = sections.get("ais")
    if isinstance(ais, dict):
        ais = {k: v for k, v in ais.items()
               if k not in AIS_FLAG_DEFAULTS or (facts.hashes_ais_flags and v != AIS_FLAG_DEFAULTS[k])}
        if not ais.get("calibration_datapoints") or not facts.hashes_calibration:
            ais = {k: v for k, v in ais.items() if not k.startswith("calibration_")}
        sections["ais"] = ais
    refine = sections.get("refine")
    if stage == "ais" and isinstance(refine, dict) and isinstance(ais, dict) and ais.get("init") != "q_star":
        sections["refine"] = {k: v for k, v in refine.items() if k != "flow_init"}
    curve = sections.get("curve", {})
    if "curve" in sections and not (isinstance(curve, dict) and curve.get("enabled")):
        del sections["curve"]
    return sections


def section_hash(resolved: dict, stage: str) -> str:
    """sha256 of the config sections ``stage`` depends on (canonical JSON of :func:`hashed_sections`)."""
    return hashlib.sha256(json.dumps(hashed_sections(resolved, stage), sort_keys=True).encode()).hexdigest()


def affected_stages(changed_keys: set[str], previous: dict | None = None, resolved: dict | None = None) -> list[str]:
    """The stages to redo after a config change: those depending on a changed section, every stage
    that reads one of them, and the stages using the AIS health thresholds when one of those changed.
    Given both configs (JSON form), a stage whose hash is the same under both is not redone for its
    sections (only for what it reads), and what a stage reads is taken under ``resolved``
    (:func:`stages_read`): e.g. ``refine.flow_init`` redoes the local stage but not AIS from the encoder."""
    is_flag = {key: key.removeprefix("ais.") in AIS_FLAG_DEFAULTS for key in changed_keys}
    sections = {key.split(".")[0] for key in changed_keys if not is_flag[key]}
    affected: list[str] = []
    for stage in STAGE_TABLE:  # in order, so a stage's readers come after it
        depends = bool(sections & set(stage.sections))
        if depends and previous is not None and resolved is not None:
            depends = section_hash(previous, stage.name) != section_hash(resolved, stage.name)
        reads = stages_read(stage.name, resolved) if resolved is not None else stage.reads
        if depends or set(reads) & set(affected):
            affected.append(stage.name)
    if "report" not in affected and any(is_flag.values()):
        affected.append("report")
    return affected
