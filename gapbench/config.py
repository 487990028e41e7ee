"""Experiment configuration: TOML in, validated pydantic models out.

Every field has a default, a one-line meaning and its limits; unknown keys, wrong types and
impossible values are refused with one message that names the key. Library functions never see
these objects: the runner unpacks them into explicit keyword arguments.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .estimators import AISProcedure
from .measure import RefineProcedure


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    dataset: Literal["digits", "fashion-mnist", "mnist"] = "digits"  # which dataset
    data_dir: str | None = None  # directory holding the IDX files (else $GAPBENCH_DATA, cache, ...)
    download: bool = True  # download MNIST-family files when not found locally
    binarization: Literal["dynamic", "static"] = "dynamic"  # dynamic: Bernoulli resampled each epoch
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # static binarisation threshold


class ModelConfig(Section):
    latent_size: int = Field(50, ge=1)  # Z
    encoder_hidden: list[int] = [200, 200]  # encoder hidden widths, x -> z
    decoder_hidden: list[int] = [200, 200]  # decoder hidden widths, z -> x
    activation: Literal["elu", "relu", "tanh", "softplus", "leaky_relu"] = "elu"

    @model_validator(mode="after")
    def _positive_widths(self) -> "ModelConfig":
        for name in ("encoder_hidden", "decoder_hidden"):
            if any(w < 1 for w in getattr(self, name)):
                raise ValueError(f"{name} widths must be positive, got {getattr(self, name)}")
        return self


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)  # maximum epochs
    batch_size: int = Field(100, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)  # Adam step size (initial, for the paper schedule)
    adam_eps: float = Field(1e-8, gt=0.0)  # Adam's epsilon (the 2018 code: 1e-4)
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear KL warm-up length in epochs (0: none)
    schedule: Literal["constant", "paper"] = "constant"  # paper: lr 10^(-i/7) after 3^i epochs
    valid_every: int = Field(1, ge=1)  # epochs between validation ELBO checks
    valid_num_samples: int = Field(10, ge=1)  # samples per validation datapoint
    early_stopping_patience: int = Field(0, ge=0)  # validation checks without improvement (0: off)
    data_parallel: bool = False  # under torchrun: every rank trains on a share of each minibatch (DDP)


class EvalConfig(Section):
    split: Literal["train", "valid", "test"] = "train"  # which split's datapoints to evaluate
    num_datapoints: int = Field(1000, ge=1)  # the first N datapoints of the split (paper: 1000 train)
    num_samples: int = Field(5000, ge=1)  # samples for L[q], L[q*] and IWAE (paper: 5000)
    chunk_size: int | None = Field(None, ge=1)  # samples per chunk (None: automatic)
    batch_size: int = Field(1000, ge=1)  # datapoints refined and estimated together


class RefineConfig(Section):
    family: Literal["ffg"] = "ffg"  # local variational family
    init: Literal["prior", "encoder"] = "encoder"  # where each local optimisation starts
    procedure: Literal["gapbench", "paper"] = "gapbench"  # preset; the fields below override it
    num_samples: int | None = Field(None, ge=1)  # samples per step
    learning_rate: float | None = Field(None, gt=0.0)  # initial Adam step size
    max_steps: int | None = Field(None, ge=1)  # hard limit per datapoint
    check_every: int | None = Field(None, ge=1)  # steps per convergence window
    patience: int | None = Field(None, ge=1)  # bad windows in a row that stop a datapoint
    lr_decay: float | None = Field(None, gt=0.0, le=1.0)  # step-size factor after a bad window
    min_improvement: float | None = Field(None, ge=0.0)  # nats a window must gain
    gradient: Literal["stl", "reparam"] | None = None  # gradient estimator
    convergence: Literal["paired", "window"] | None = None  # convergence test
    check_samples: int | None = Field(None, ge=1)  # noise draws per paired check

    def resolved(self) -> RefineProcedure:
        """The preset with every field set here replacing the preset's value."""
        preset = RefineProcedure.paper() if self.procedure == "paper" else RefineProcedure()
        overrides = {k: getattr(self, k) for k in preset._fields if getattr(self, k) is not None}
        return preset._replace(**overrides)


class AISConfig(Section):
    enabled: bool = True  # run the AIS stage; log p_hat(x) then also takes AIS into its max
    num_chains: int = Field(16, ge=1)  # C, chains per datapoint (paper: 100)
    num_steps: int = Field(500, ge=1)  # T, annealing steps; T - 1 intermediate distributions (paper: 5000-10000)
    schedule: Literal["linear", "sigmoid"] = "sigmoid"  # spacing of the inverse temperatures
    init: Literal["prior", "encoder", "q_star"] = "encoder"  # initial distribution of the chains
    num_leapfrog: int = Field(10, ge=1)  # leapfrog steps per HMC transition
    target_acceptance: float = Field(0.65, gt=0.0, lt=1.0)  # acceptance probability the step sizes adapt toward
    step_size: float = Field(0.05, gt=0.0)  # initial HMC step size
    adaptation: Literal["datapoint", "chain"] = "datapoint"  # who shares a step size: a datapoint's chains, or none
    adaptation_rate: float = Field(0.1, ge=0.0)  # log step-size change per unit of acceptance error (0: fixed)
    min_step_size: float = Field(1e-4, gt=0.0)  # clamp of the adapted step sizes
    max_step_size: float = Field(0.5, gt=0.0)

    @model_validator(mode="after")
    def _step_size_within_clamp(self) -> "AISConfig":
        if not self.min_step_size <= self.step_size <= self.max_step_size:
            raise ValueError(f"need min_step_size <= step_size <= max_step_size, got {self.min_step_size}, "
                             f"{self.step_size}, {self.max_step_size}")
        return self

    def procedure(self) -> AISProcedure:
        """The keyword arguments of ``gapbench.ais`` (everything here but ``enabled`` and ``init``)."""
        return AISProcedure(**{k: getattr(self, k) for k in AISProcedure._fields})


class ExperimentConfig(Section):
    name: str = Field(min_length=1)  # run name; the default output folder is runs/<name>
    seed: int = Field(0, ge=0)  # every random stream of the run derives from it
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    refine: RefineConfig = RefineConfig()
    ais: AISConfig = AISConfig()


def _parse_value(text: str) -> Any:
    """A --set value as a TOML literal (10, 1e-3, true, [200, 200], "x"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config dict (a new dict is returned)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[leaf] = _parse_value(value.strip())
    return out


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            given = e.get("input")
            lines.append(f"  {where}: {e['msg']} (given: {given!r})")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], *, source: str = "config", ignore_unknown: bool = False) -> ExperimentConfig:
    """Validate a raw dict; ConfigError with every problem listed.

    ``ignore_unknown`` drops keys this version does not know (with a warning) instead of refusing
    them: for reading a run folder written by another gapbench version.
    """
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        unknown = [e["loc"] for e in error.errors() if e["type"] == "extra_forbidden"]
        if not ignore_unknown or not unknown or len(unknown) != len(error.errors()):
            raise ConfigError(_format_error(error, source)) from None
    pruned = json.loads(json.dumps(raw))
    for loc in unknown:
        node = pruned
        for part in loc[:-1]:
            node = node[part]
        del node[loc[-1]]
    warnings.warn(f"{source}: ignoring keys this gapbench version does not know: "
                  + ", ".join(".".join(str(p) for p in loc) for loc in unknown), stacklevel=2)
    return parse_config(pruned, source=source)


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                ignore_unknown: bool = False) -> ExperimentConfig:
    """Read a TOML (or a run's resolved JSON) experiment file, apply --set overrides, validate.

    ``ignore_unknown``: see :func:`parse_config`.
    """
    path = Path(path)
    return parse_config(apply_overrides(read_raw(path), overrides or []), source=str(path),
                        ignore_unknown=ignore_unknown)


def read_raw(path: str | Path) -> dict[str, Any]:
    """The unvalidated dict of a TOML (or JSON) experiment file; ConfigError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; pass a TOML file such as experiments/digits.toml")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}") from None
