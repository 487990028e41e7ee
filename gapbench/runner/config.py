"""Experiment configuration: TOML in, validated pydantic models out.

Every field has a default, its limits and its meaning (``Field(description=...)``, from which
``gapbench config-reference`` makes README's table of config keys); unknown keys, wrong types and
impossible values are refused with one message that names the key. Library functions never see
these objects: the runner unpacks them into explicit keyword arguments.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from gapbench.errors import ConfigError
from gapbench.inference.curves import CurveProcedure
from gapbench.estimators import AISProcedure
from gapbench.estimators.ais import DEFAULT_AIS
from gapbench.estimators.health import AIS_FLAG_DEFAULTS
from gapbench.measure import RefineProcedure
from gapbench.posteriors.families import FLOW_FAMILIES
from gapbench.inference.semi_amortized import SemiAmortized
from gapbench.runner.migrate import omit_unused_keys, refine_families


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


FILE_DATA_KEYS = ("file", "domain", "num_levels")  # written out only for dataset = "file"
FACTORY_KEYS = ("factory", "factory_path", "checkpoint", "checkpoint_sha256")  # written out only with a factory


class DataConfig(Section):
    dataset: Literal["digits", "fashion-mnist", "mnist", "cifar10", "file"] = Field(
        "digits", description="`digits`, `fashion-mnist`, `mnist`, `cifar10`, or `file` (an array file of your own, "
                              "below)")
    file: str | None = Field(None, description=(
        '`dataset = "file"`: a `.npy`, `.npz` or `.pt` array of shape (N, D), (N, H, W) or (N, C, H, W), or three '
        "named `train`, `valid`, `test` (see [Data](#data))"))
    domain: Literal["binary", "levels"] | None = Field(None, json_schema_extra={"shown_default": '`"levels"`'},
        description='`dataset = "file"`: `binary` (exactly 0 and 1) or `levels` (L grey levels: integers 0..L−1, '
                    "or floats k/(L−1))")
    num_levels: int | None = Field(None, ge=2, le=65536, json_schema_extra={"shown_default": "256"},
                                   description='`dataset = "file"`, `domain = "levels"`: L')
    data_dir: str | None = Field(None, description=(
        "folder with the IDX `.gz` files, or CIFAR-10's `cifar-10-python.tar.gz` or its `cifar-10-batches-py` "
        "folder (else `$GAPBENCH_DATA`, the user cache, ...; see [Data](#data))"))
    download: bool = Field(True, description="download MNIST-family or CIFAR-10 files (checksummed) when not found")
    binarization: Literal["dynamic", "static", "none"] = Field(
        "dynamic", json_schema_extra={"shown_default": '`"dynamic"`; `"none"` with `model.likelihood = "logistic"`'},
        description="`dynamic`: Bernoulli draws, new every epoch (evaluation data drawn once from the seed); "
                    "`static`: threshold; `none`: the pixel levels as they are, the only choice for the "
                    "discretised logistic (any other is refused, as is `none` with the Bernoulli)")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="static binarisation threshold")
    bits: int = Field(8, ge=1, le=8, description=(
        "`cifar10` with the logistic likelihood only: keep each 8-bit level's high `bits` (2^bits levels; 3: 3-bit "
        "CIFAR)"))

    @model_validator(mode="after")
    def _file_keys_with_file(self) -> "DataConfig":
        given = [k for k in FILE_DATA_KEYS if getattr(self, k) is not None]
        if self.dataset != "file" and given:
            raise ValueError(f"data.{given[0]} applies to data.dataset = \"file\" only; remove it, or set "
                             "data.dataset = \"file\"")
        if self.dataset == "file" and self.file is None:
            raise ValueError("data.dataset = \"file\" needs data.file, the path of a .npy, .npz or .pt array")
        if self.domain == "binary" and self.num_levels is not None:
            raise ValueError("data.num_levels applies to data.domain = \"levels\"; remove it for binary data")
        return self

    @model_serializer(mode="wrap")
    def _omit_file_keys(self, handler: Any) -> dict[str, Any]:
        """A built-in dataset's resolved config has no file keys (``migrate.omit_unused_keys``)."""
        return omit_unused_keys(handler(self), FILE_DATA_KEYS, is_used=self.dataset == "file")


# FFG, Cremer et al.'s auxiliary coupling flow, planar, IAF; q(z1|x) q(z2|z1) of the two-layer model
Family = Literal["ffg", "flow", "planar", "iaf", "hierarchical"]
HIERARCHICAL_KEYS = ("latent_size_2", "prior_hidden")  # written out only for kind = "hierarchical"


class ModelConfig(Section):
    kind: Literal["mlp", "conv", "hierarchical"] = Field("mlp", description=(
        "`mlp`: fully connected encoder and decoder; `conv`: the convolutional VAE of Cremer et al. for CIFAR-10 "
        "(`gapbench/models/conv.py`): stride-2 convolutions of `conv_channels` to the encoder's features, mirrored "
        "deconvolutions in the decoder (`encoder_hidden`, `decoder_hidden` unused); `hierarchical`: MLPs with two "
        "stochastic layers, p(z2) p(z1|z2) p(x|z1) with the encoder q(z1|x) q(z2|z1) (see "
        "[Two stochastic layers](#two-stochastic-layers)); `posterior` and `refine.families` then default to (and "
        'must be) `"hierarchical"` and `["hierarchical"]`'))
    likelihood: Literal["bernoulli", "logistic", "gaussian"] = Field(
        "bernoulli", json_schema_extra={"shown_default": '`"logistic"` for `cifar10`, else `"bernoulli"`'},
        description="p(x|z): `bernoulli` (binarised pixels) or `logistic`, the discretised logistic over the "
                    "dataset's pixel levels (a mean and a log-scale per subpixel; see [Data](#data)). With `factory`: "
                    "the data the external model is a density of, `bernoulli` (binarised) or `logistic` / `gaussian` "
                    '(grey levels, `binarization = "none"`)')
    latent_size: int = Field(50, ge=1, description='Z (with `kind = "hierarchical"`: Z1, the layer next to x)')
    encoder_hidden: list[int] = Field([200, 200], description="encoder hidden widths, x → z (x → z1)")
    decoder_hidden: list[int] = Field([200, 200], description="decoder hidden widths, z → x (z1 → x)")
    activation: Literal["elu", "relu", "tanh", "softplus", "leaky_relu"] = Field(
        "elu", description="`elu`, `relu`, `tanh`, `softplus` or `leaky_relu`")
    posterior: Family = Field("ffg", description=(
        "the encoder's family: `ffg`, `flow` (Cremer et al.'s auxiliary coupling flow), `planar`, `iaf` (see "
        '[Variational families](#variational-families)); `hierarchical` with `kind = "hierarchical"`'))
    flow_steps: int | None = Field(None, ge=1, description=(
        "coupling steps (`flow`), IAF steps (`iaf`) or planar layers (`planar`); none: 2, 2 and 10. Used by the "
        "encoder and by the local flows"))
    flow_hidden: int = Field(100, ge=1, description=(
        "hidden width of the coupling and MADE networks (encoder and local; paper: 100); planar flows have none"))
    conv_channels: list[int] = Field([64, 128, 256], description=(
        '`kind = "conv"`: channels of each convolution (kernel 4, stride 2, padding 1; the paper\'s)'))
    latent_size_2: int = Field(16, ge=1, description='Z2, the top layer (`kind = "hierarchical"` only)')
    prior_hidden: list[int] = Field([100], description=(
        'hidden widths of the p(z1|z2) network and of the q(z2|z1) network (`kind = "hierarchical"` only)'))
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description=(
        'an external model: `"package.module:function"` returning `(model, encoder)`; the run skips training '
        "(see [Your own model](#your-own-model)). `kind` and the network keys are then unused"))
    factory_path: str | None = Field(None, description=(
        "a folder put first on `sys.path` to import the factory's module (relative to the current directory)"))
    checkpoint: str | None = Field(None, description=(
        "a file or folder passed to the factory as `factory(Path(checkpoint))`"))
    checkpoint_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", json_schema_extra={"shown_default": "filled in"},
        description="the checkpoint's sha256 (a folder's: of its files' names and sha256s), written into "
                    "`config.json` by the run; part of every stage's hash, so a changed checkpoint is refused (or "
                    "redone with `--force`); give it to pin a file")

    @model_validator(mode="after")
    def _positive_widths(self) -> "ModelConfig":
        for name in ("encoder_hidden", "decoder_hidden", "conv_channels", "prior_hidden"):
            if any(w < 1 for w in getattr(self, name)):
                raise ValueError(f"{name} widths must be positive, got {getattr(self, name)}")
        if self.factory is None and any(getattr(self, k) is not None for k in FACTORY_KEYS):
            raise ValueError("model.factory_path, model.checkpoint and model.checkpoint_sha256 apply to an external "
                             "model only; give model.factory = \"package.module:function\" or remove them")
        if self.checkpoint_sha256 is not None and self.checkpoint is None:
            raise ValueError("model.checkpoint_sha256 pins the file model.checkpoint, which is not given; give "
                             "model.checkpoint or remove model.checkpoint_sha256")
        if self.factory is not None and self.kind != "mlp":
            raise ValueError(f"model.kind = {self.kind!r} builds gapbench's own networks, but model.factory builds "
                             "the user's; remove model.kind")
        if self.likelihood == "gaussian" and self.factory is None:
            raise ValueError("model.likelihood = \"gaussian\" is for external models (model.factory) only; "
                             "gapbench's own decoders take \"bernoulli\" or \"logistic\"")
        if self.kind == "conv" and not self.conv_channels:
            raise ValueError("model.kind = \"conv\" needs at least one convolution; give model.conv_channels, "
                             "e.g. [64, 128, 256]")
        return self

    @model_serializer(mode="wrap")
    def _omit_unused_keys(self, handler: Any) -> dict[str, Any]:
        """A one-layer model's resolved config has no second-layer keys, and a built-in model's no
        external-model keys (``migrate.omit_unused_keys``)."""
        data = omit_unused_keys(handler(self), HIERARCHICAL_KEYS, is_used=self.kind == "hierarchical")
        return omit_unused_keys(data, FACTORY_KEYS, is_used=self.factory is not None)


class TrainConfig(Section):
    epochs: int = Field(100, ge=1, description="maximum epochs")
    batch_size: int = Field(100, ge=1, description="datapoints per minibatch")
    learning_rate: float = Field(1e-3, gt=0.0, description="Adam step size (the initial one with the `paper` schedule)")
    adam_eps: float = Field(1e-8, gt=0.0, description="Adam's epsilon (the 2018 code: 1e-4)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear KL warm-up length in epochs (0: none)")
    schedule: Literal["constant", "paper"] = Field("constant", description=(
        "`constant`, or `paper`: lr × 10^(−i/7) during stage i, which lasts 3^i epochs"))
    valid_every: int = Field(1, ge=1, description="epochs between validation ELBO checks; the best checkpoint is kept")
    valid_num_samples: int = Field(10, ge=1, description="samples per validation datapoint")
    early_stopping_patience: int = Field(0, ge=0, description=(
        "validation checks without improvement before stopping (0: off)"))
    data_parallel: bool = Field(False, description=(
        "under torchrun: every process trains on a share of each minibatch (DistributedDataParallel); otherwise "
        "rank 0 trains alone. Not with `semi_amortized_steps > 0` (refused: semi-amortized training runs in one "
        "process)"))
    semi_amortized_steps: int = Field(0, ge=0, description=(
        "K: SGD steps refining the encoder's (μ, log σ²) inside every training step (Kim et al., 2018); 0 is the "
        'plain VAE, exactly; K > 0 needs `model.posterior = "ffg"`. See "Semi-amortized training"'))
    semi_amortized_lr: float = Field(SemiAmortized().learning_rate, gt=0.0, description=(
        "step size of those SGD steps (0.01: the best of 0.003–0.05 on a digits VAE; Kim et al.'s 1.0 lowers its "
        "ELBO)"))
    semi_amortized_max_grad_norm: float = Field(SemiAmortized().max_grad_norm, gt=0.0, description=(
        "each datapoint's inner gradient (over μ and log σ² together) is rescaled to at most this norm"))
    semi_amortized_gradient: Literal["unrolled", "stop"] = Field("unrolled", description=(
        "`unrolled`: the encoder is trained through the K steps; `stop`: stop-gradient (the encoder on its own "
        "ELBO, the decoder on the refined ELBO)"))
    snapshot_every: int = Field(0, ge=0, description=(
        "save the weights every N epochs (and the last) in `snapshots/`, for `gapbench track` (0: never)"))

    @model_validator(mode="after")
    def _semi_amortized_in_one_process(self) -> "TrainConfig":
        if self.data_parallel and self.semi_amortized_steps:
            raise ValueError("train.data_parallel = true does not combine with semi-amortized training "
                             f"(train.semi_amortized_steps = {self.semi_amortized_steps}): the refinement steps run "
                             "in one process; set train.data_parallel = false or train.semi_amortized_steps = 0")
        return self

    def semi_amortized(self) -> SemiAmortized:
        """The keyword argument ``semi_amortized`` of ``gapbench.train.train``."""
        return SemiAmortized(self.semi_amortized_steps, self.semi_amortized_lr, self.semi_amortized_max_grad_norm,
                             self.semi_amortized_gradient)


class EvalConfig(Section):
    split: Literal["train", "valid", "test"] = Field("train", description=(
        "which split's datapoints to evaluate: `train`, `valid` or `test`"))
    num_datapoints: int = Field(1000, ge=1, description="the first N datapoints of the split (paper: 1000 train)")
    num_samples: int = Field(5000, ge=1, description="samples for L[q], L[q*] and IWAE-k (paper: 5000)")
    chunk_size: int | None = Field(None, ge=1, json_schema_extra={"shown_default": "automatic"},
                                   description="samples per chunk (memory is flat in k)")
    batch_size: int = Field(1000, ge=1, description="datapoints refined and estimated together")

SHOWN_PRESET = {"shown_default": "preset"}  # the config reference's default column: the preset decides


class RefineConfig(Section):
    families: list[Family] = Field(["ffg"], json_schema_extra={"shown_default": "`[model.posterior]`"}, description=(
        'local families to refine, e.g. `["ffg", "flow"]`; must include the encoder\'s. `hierarchical`: q(z1) '
        'q(z2|z1) with every parameter free per datapoint, for `model.kind = "hierarchical"` only. '
        '`family = "ffg"` reads as `families = ["ffg"]` (giving both is refused)'))
    init: Literal["prior", "encoder"] = Field("encoder", description=(
        "where each local optimisation starts: the encoder's output (`encoder`) or the prior (`prior`, as the "
        "paper); see [Variational families](#variational-families) for what a family starts from"))
    flow_init: Literal["init", "q_star_ffg", "encoder"] = Field("init", description=(
        "where a local flow starts (the FFG always starts from `init`): as `init` (`init`); at the identity on top "
        "of the local FFG's q* (`q_star_ffg`: the FFG refined first, with its own procedure and random streams, so "
        "the flow starts at the reported L[q*_FFG]); or from the encoder's output (`encoder`: a flow encoder's q "
        "itself, so the flow starts at L[q]). From the prior, gapbench's flow procedure stops far short on the "
        "paper-protocol Fashion-MNIST models (results/README.md, \"Why the local flow gains little\")"))
    procedure: Literal["gapbench", "paper"] = Field("gapbench", description=(
        "preset: `gapbench` (per family: `RefineProcedure()` for the FFG, `RefineProcedure.for_flows()` for "
        "flows) or `paper`; the keys below override it for every family (see `gapbench.RefineProcedure`)"))
    num_samples: int | None = Field(None, ge=1, json_schema_extra=SHOWN_PRESET, description="z samples per datapoint per step")
    learning_rate: float | None = Field(None, gt=0.0, json_schema_extra=SHOWN_PRESET, description="initial Adam step size")
    max_steps: int | None = Field(None, ge=1, json_schema_extra=SHOWN_PRESET, description="hard limit of steps per datapoint")
    check_every: int | None = Field(None, ge=1, json_schema_extra=SHOWN_PRESET, description="steps per convergence window")
    patience: int | None = Field(None, ge=1, json_schema_extra=SHOWN_PRESET, description=(
        "bad windows in a row that stop a datapoint"))
    lr_decay: float | None = Field(None, gt=0.0, le=1.0, json_schema_extra=SHOWN_PRESET, description=(
        "step-size factor after a bad window"))
    min_improvement: float | None = Field(None, ge=0.0, json_schema_extra=SHOWN_PRESET, description=(
        "nats a window must gain to count as better"))
    gradient: Literal["stl", "reparam"] | None = Field(None, json_schema_extra=SHOWN_PRESET, description=(
        "gradient estimator: `stl` (sticking the landing) or `reparam`"))
    convergence: Literal["paired", "window"] | None = Field(None, json_schema_extra=SHOWN_PRESET, description=(
        "convergence test: `paired` (common random numbers against the anchor) or `window`"))
    check_samples: int | None = Field(None, ge=1, json_schema_extra=SHOWN_PRESET, description="noise draws per paired check")

    @model_validator(mode="after")
    def _distinct_families(self) -> "RefineConfig":
        if not self.families:
            raise ValueError("refine.families is empty; list at least one family, e.g. [\"ffg\"]")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"refine.families lists a family twice: {self.families}")
        if self.flow_init != "init" and not set(self.families) & set(FLOW_FAMILIES):
            raise ValueError(f"refine.flow_init = \"{self.flow_init}\" sets where local flows start, but refine.families "
                             f"({self.families}) has none; add one of {list(FLOW_FAMILIES)} or remove refine.flow_init")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_flow_init(self, handler: Any) -> dict[str, Any]:
        """Without ``flow_init`` at its default, as folders made before it existed (``migrate.omit_unused_keys``)."""
        return omit_unused_keys(handler(self), ("flow_init",), is_used=self.flow_init != "init")

    def resolved(self, family: str = "ffg") -> RefineProcedure:
        """The preset for ``family`` with every field set here replacing the preset's value.

        The "gapbench" preset differs for flows (``RefineProcedure.for_flows``; the hierarchical family takes
        the FFG's, with its network's weight steps scaled by 1/fan-in); "paper" is the same
        for every family. The gradient is not yet adjusted to the family (see
        ``gapbench.measure.effective_procedure``).
        """
        if self.procedure == "paper":
            preset = RefineProcedure.paper()
        else:
            preset = RefineProcedure() if family in ("ffg", "hierarchical") else RefineProcedure.for_flows()
        overrides = {k: getattr(self, k) for k in preset._fields if getattr(self, k) is not None}
        return preset._replace(**overrides)


class AISConfig(Section):
    enabled: bool = Field(True, description=(
        "run the AIS stage; AIS is then one of the estimators log p̂(x) chooses from"))
    num_chains: int = Field(DEFAULT_AIS.num_chains, ge=1, description="C, chains per datapoint (paper: 100)")
    num_steps: int = Field(DEFAULT_AIS.num_steps, ge=1, description=(
        "T, annealing steps: T − 1 intermediate distributions, one HMC transition each (paper: 5000–10000)"))
    schedule: Literal["linear", "sigmoid"] = Field(DEFAULT_AIS.schedule, description=(
        "spacing of the inverse temperatures β: `linear` or `sigmoid` (Grosse et al., 2015)"))
    init: Literal["prior", "encoder", "q_star"] = Field("encoder", description=(
        "initial distribution of the chains: `prior`, `encoder` (q(z|x)) or `q_star` (the refined local posterior)"))
    num_leapfrog: int = Field(DEFAULT_AIS.num_leapfrog, ge=1, description="leapfrog steps per HMC transition")
    target_acceptance: float = Field(DEFAULT_AIS.target_acceptance, gt=0.0, lt=1.0, description=(
        "acceptance probability the step sizes adapt toward"))
    step_size: float = Field(DEFAULT_AIS.step_size, gt=0.0, description="initial HMC step size")
    adaptation: Literal["datapoint", "chain"] = Field(DEFAULT_AIS.adaptation, description=(
        "`datapoint`: a datapoint's chains share one step size, adapted from their mean acceptance; `chain`: each "
        "chain its own (biased, see below)"))
    adaptation_rate: float = Field(DEFAULT_AIS.adaptation_rate, ge=0.0, description=(
        "change of log step size per unit of acceptance error after each transition (0: fixed step sizes, exact AIS)"))
    min_step_size: float = Field(DEFAULT_AIS.min_step_size, gt=0.0, description="lower clamp of the adapted step sizes")
    max_step_size: float = Field(DEFAULT_AIS.max_step_size, gt=0.0, description="upper clamp of the adapted step sizes")
    calibration_datapoints: int = Field(0, ge=0, description=(
        "with N > 0 (a few dozen, e.g. 32), BDMC with these AIS settings on N datapoints simulated from the trained "
        "model (calibration stage, `ais_calibration.json`); its sandwich width goes into `summary.json` "
        "(`ais_calibration`) and under the gap table. 0: no calibration (then neither key enters a stage hash)"))
    calibration_tolerance: float = Field(0.2, gt=0.0, description=(
        "nats of mean sandwich width above which the table and the log warn"))
    flag_acceptance_error: float = Field(AIS_FLAG_DEFAULTS["flag_acceptance_error"], gt=0.0, description=(
        "AIS of a datapoint is flagged unhealthy, and left out of its log p̂(x) "
        "(`gapbench.estimators.health`), when its acceptance rate is further than this from `target_acceptance`"))
    flag_divergence_rate: float = Field(AIS_FLAG_DEFAULTS["flag_divergence_rate"], ge=0.0, le=1.0, description=(
        "... or more than this fraction of its HMC transitions diverged"))
    flag_ess_fraction: float = Field(AIS_FLAG_DEFAULTS["flag_ess_fraction"], ge=0.0, le=1.0, description=(
        "... or the ESS of its chains' final weights is below this × `num_chains` (weight collapse)"))

    @model_validator(mode="after")
    def _step_size_within_clamp(self) -> "AISConfig":
        if not self.min_step_size <= self.step_size <= self.max_step_size:
            raise ValueError(f"need min_step_size <= step_size <= max_step_size, got {self.min_step_size}, "
                             f"{self.step_size}, {self.max_step_size}")
        return self

    def procedure(self) -> AISProcedure:
        """The settings of ``gapbench.ais`` (``procedure=``): everything here but ``enabled``, ``init``, the
        ``calibration_*`` and the ``flag_*`` keys."""
        return AISProcedure(**{k: getattr(self, k) for k in AISProcedure._fields})

    def flags(self) -> dict[str, float]:
        """The keyword arguments of ``gapbench.estimators.health.ais_flags``."""
        return {"target_acceptance": self.target_acceptance, "num_chains": self.num_chains,
                **{k: getattr(self, k) for k in AIS_FLAG_DEFAULTS}}


class CurveConfig(Section):
    enabled: bool = Field(False, description=(
        "run the curve stage: the ELBO of every datapoint after k SVI steps from the encoder's output (needs "
        '`model.posterior = "ffg"`)'))
    steps: list[int] = Field(list(CurveProcedure().steps), description="the step counts k (distinct, ≥ 0)")
    num_samples: int = Field(CurveProcedure().num_samples, ge=1, description="z samples per SVI step")
    learning_rate: float = Field(CurveProcedure().learning_rate, gt=0.0, description=(
        "Adam step size, constant (no decay, no early stopping); mean steps in units of σ as in refinement"))
    gradient: Literal["stl", "reparam"] = Field("stl", description="`stl` (sticking the landing) or `reparam`")
    eval_samples: int = Field(CurveProcedure().eval_samples, ge=1, description=(
        "samples per ELBO estimate, the same noise at every k"))

    @model_validator(mode="after")
    def _valid_steps(self) -> "CurveConfig":
        if not self.steps or min(self.steps) < 0 or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"curve.steps must list distinct step counts >= 0, e.g. [0, 1, 10, 100], got {self.steps}")
        return self

    def procedure(self) -> CurveProcedure:
        """The keyword arguments of ``gapbench.inference.curves.refinement_curve`` (steps in increasing order)."""
        return CurveProcedure(tuple(sorted(self.steps)), self.num_samples, self.learning_rate, self.gradient,
                              self.eval_samples)


class ExperimentConfig(Section):
    name: str = Field(min_length=1, description=(
        "run name; the default output folder is `runs/<name>` (a plain folder name)"))
    seed: int = Field(0, ge=0, le=2**64 - 1, description=(
        "every random stream of the run derives from it (torch takes 64 bits)"))
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    refine: RefineConfig = RefineConfig()
    ais: AISConfig = AISConfig()
    curve: CurveConfig = CurveConfig()

    @model_validator(mode="after")
    def _plain_name(self) -> "ExperimentConfig":
        name = self.name
        if name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
            raise ValueError(f"name = {name!r} is not a plain folder name (the default run folder is runs/<name>); "
                             "use letters, digits, '-', '_' or '.', without '/' (choose the folder with --out)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_families(cls, raw: Any) -> Any:
        """Without ``refine.families`` the local families are the encoder's own (``[model.posterior]``);
        ``refine.family`` is read by ``migrate.refine_families``. A two-layer model's encoder family is
        "hierarchical"."""
        if not isinstance(raw, dict) or not isinstance(raw.get("refine", {}), dict):
            return raw
        refine = refine_families(dict(raw.get("refine", {})))
        model = raw.get("model", {})
        if isinstance(model, dict) and model.get("kind") == "hierarchical" and "posterior" not in model:
            raw = {**raw, "model": {**model, "posterior": "hierarchical"}}  # its encoder is q(z1|x) q(z2|z1)
            model = raw["model"]
        if "families" not in refine:
            refine["families"] = [model.get("posterior", "ffg") if isinstance(model, dict) else "ffg"]
        return {**raw, "refine": refine}

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, raw: Any) -> Any:
        """Defaults that depend on the dataset: CIFAR-10's pixels get the discretised logistic
        (``model.likelihood = "logistic"``), other datasets the Bernoulli; the logistic models pixel
        levels as they are (``data.binarization = "none"``), the Bernoulli binarised ones ("dynamic")."""
        if not isinstance(raw, dict):
            return raw
        data, model = raw.get("data", {}), raw.get("model", {})
        if not isinstance(data, dict) or not isinstance(model, dict):
            return raw
        if "likelihood" not in model:
            model = {**model, "likelihood": "logistic" if data.get("dataset") == "cifar10" else "bernoulli"}
        if "binarization" not in data:
            data = {**data, "binarization": "none" if model["likelihood"] in ("logistic", "gaussian") else "dynamic"}
        return {**raw, "data": data, "model": model}

    @model_validator(mode="after")
    def _data_fits_likelihood(self) -> "ExperimentConfig":
        data, model = self.data, self.model
        if model.likelihood == "bernoulli" and data.binarization == "none":
            raise ValueError("data.binarization = \"none\" gives grey levels, but model.likelihood = \"bernoulli\" is "
                             "a distribution of 0/1 pixels; set data.binarization = \"dynamic\" or \"static\", or "
                             "model.likelihood = \"logistic\"")
        if model.likelihood in ("logistic", "gaussian") and data.binarization != "none":
            raise ValueError(f"data.binarization = {data.binarization!r} does not apply to model.likelihood = \"{model.likelihood}\", "
                             "which models the pixel levels themselves; remove data.binarization (or set it to "
                             "\"none\"), or use model.likelihood = \"bernoulli\" for binarised pixels")
        if data.bits != 8 and data.dataset != "cifar10":
            raise ValueError(f"data.bits = {data.bits} applies to cifar10 only; remove it for {data.dataset!r}")
        if data.dataset == "file" and data.domain == "binary" and model.likelihood != "bernoulli":
            raise ValueError(f"data.domain = \"binary\" holds 0/1 values, but model.likelihood = {model.likelihood!r} is a "
                             "distribution of grey levels; use model.likelihood = \"bernoulli\" or data.domain = \"levels\"")
        if data.bits != 8 and model.likelihood != "logistic":
            raise ValueError(f"data.bits = {data.bits} reduces the pixel levels of the discretised logistic, but "
                             f"model.likelihood = {model.likelihood!r}; remove data.bits or use model.likelihood = \"logistic\"")
        return self

    @model_validator(mode="after")
    def _family_fits_model(self) -> "ExperimentConfig":
        two_layers = self.model.kind == "hierarchical"
        if two_layers and (self.model.posterior != "hierarchical" or self.refine.families != ["hierarchical"]):
            raise ValueError('model.kind = "hierarchical" has its own encoder q(z1|x) q(z2|z1) and is refined in that '
                             'family with free per-datapoint parameters; leave model.posterior and refine.families '
                             'out (or set them to "hierarchical" and ["hierarchical"])')
        if not two_layers and "hierarchical" in (self.model.posterior, *self.refine.families):
            raise ValueError('the "hierarchical" family needs a two-layer model; set model.kind = "hierarchical", '
                             'or choose another family')
        return self

    @model_validator(mode="after")
    def _encoder_family_is_refined(self) -> "ExperimentConfig":
        if self.model.posterior not in self.refine.families:
            raise ValueError(
                f"refine.families = {self.refine.families} must include the encoder's family "
                f"(model.posterior = {self.model.posterior!r}): the run's gaps compare L[q] with L[q*] of that "
                f"family; add it, e.g. refine.families = {[*self.refine.families, self.model.posterior]}")
        return self

    @model_validator(mode="after")
    def _diagonal_encoder_for_refinement_of_its_output(self) -> "ExperimentConfig":
        uses = [what for what, on in (("curve.enabled = true", self.curve.enabled),
                                      ("train.semi_amortized_steps > 0", self.train.semi_amortized_steps > 0)) if on]
        if uses and self.model.posterior != "ffg":
            raise ValueError(
                f"{' and '.join(uses)} refine the encoder's diagonal Gaussian (mu, log_var), but model.posterior = "
                f"{self.model.posterior!r}; use a model whose encoder is the FFG (model.posterior = \"ffg\", "
                "model.kind \"mlp\" or \"conv\"), or turn them off")
        return self


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


def known_keys(loc: tuple) -> list[str]:
    """The keys the config knows beside ``loc`` (a key's path, e.g. ("train", "epoch")): the section's
    fields, or the top level's sections."""
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return list(model.model_fields)


def _did_you_mean(loc: tuple) -> str:
    """" (did you mean train.epochs?)" for the closest known key (difflib), or ""."""
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), known_keys(loc), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key; remove it or check its spelling{_did_you_mean(e['loc'])}")
        elif e["type"] == "value_error" and not e["loc"]:  # a rule across sections: the message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
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
    return parse_overridden(read_raw(path), overrides or [], source=str(path), ignore_unknown=ignore_unknown)


def parse_overridden(raw: dict[str, Any], overrides: list[str], *, source: str,
                     ignore_unknown: bool = False) -> ExperimentConfig:
    """:func:`parse_config` of ``raw`` with the ``--set`` overrides applied; an error the file alone does
    not have is reported as coming from the --set options rather than from the file."""
    try:
        return parse_config(apply_overrides(raw, overrides), source=source, ignore_unknown=ignore_unknown)
    except ConfigError:
        if not overrides:
            raise
        try:
            parse_config(raw, source=source, ignore_unknown=ignore_unknown)
        except ConfigError:
            pass
        else:
            sets = " ".join(f"--set {item}" for item in overrides)
            return parse_config(apply_overrides(raw, overrides), source=f"{sets} (on top of {source})",
                                ignore_unknown=ignore_unknown)
        raise


def read_raw(path: str | Path) -> dict[str, Any]:
    """The unvalidated dict of a TOML (or JSON) experiment file; ConfigError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; pass a TOML file such as experiments/digits.toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}") from None
