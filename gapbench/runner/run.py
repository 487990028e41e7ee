"""The staged runner: train -> amortized -> local -> ais -> curve -> report, one folder per run.

Each stage writes its outputs atomically and is recorded in stages.json when they are complete;
a rerun skips recorded stages, and training continues from its last saved epoch (train_state.pt), so a
run killed at any moment resumes where it stopped and ends with the same numbers. A folder holding
a run with another config is refused unless ``force``, which redoes only the stages the change
affects (see ``gapbench.runner.rundir``).

The evaluation stages (amortized, local, ais, curve) draw every datapoint's noise from its own stream
(``datapoint_streams``), so a datapoint's numbers depend on the seed and its index only. Under
torchrun each rank evaluates a shard of the datapoints and rank 0, which alone owns the folder and
trains, gathers the rows and writes the same files as one process (``gapbench.runner.distributed``).

Files of a run folder:
    config.json        the resolved configuration (every default filled in)
    checkpoint.pt      best decoder and encoder weights, with the config (torch.load(weights_only=True))
    train_history.csv  one row per epoch
    train_state.pt     while training: a recent epoch's weights, Adam state, random stream and history
    amortized.csv      per datapoint: L[q] and IWAE under q, with standard errors and ESS
    local.csv, local.pt   per datapoint and local family f of refine.families: L[q*_f], IWAE under q*_f,
                       refinement steps and flags (columns suffixed _f); the q* parameters ({f: {name: tensor}})
    ais.csv            per datapoint: AIS estimate of log p(x) with standard error, ESS and HMC diagnostics
    ais_calibration.json  with ais.calibration_datapoints: the BDMC sandwich width of the AIS settings on data
                       simulated from the model (``gapbench.calibration``)
    log_px.csv         per datapoint: log p_hat(x), a fresh draw of the estimator chosen on the pilot bounds of
                       amortized.csv, local.csv and ais.csv (``gapbench.estimators.log_px``), with stderr, ESS and source
    curve.csv          with curve.enabled, per datapoint and step count k: the ELBO after k SVI steps from
                       the encoder's output and the fraction of the amortization gap closed
    datapoints.csv     everything per datapoint, with log p_hat(x), the three gaps and numerical faults
    summary.json       means with standard errors, fault counts, and every setting that changes a number
    table.md           the gap table
    figures/           gap_bars, gap_distributions, gap_scatter (PNG and PDF), unless --no-figures
    stages.json        which stages finished, with which config (sha256), the sha256 of each output, when,
                       and how long they took
Every per-datapoint file has the column ``index`` (the datapoint's position in the split); the report
joins the files on it (``gapbench.outputs``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import platform
import shutil
import time
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from gapbench import io
from gapbench.runner.checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, load_train_state,
    load_weights)
from gapbench.calibration import calibrate_ais, calibration_lines
from gapbench.runner.config import ConfigError, ExperimentConfig
from gapbench.inference.curves import curve_frame, refinement_curve, summarize_curve
from gapbench.data import Dataset, binarize, check_binary, check_levels, check_values, load_dataset
from gapbench.deadline import Deadline, StopRequested
from gapbench.runner.device import row_bytes, rows_that_fit, samples_per_chunk, use_stage_threads
from gapbench.runner.distributed import ONE_PROCESS, Ranks, broadcast, close_ranks, gather, init_ranks, shard
from gapbench.runner.external import ExternalModel, build_external, check_external, with_checkpoint_sha256
from gapbench.gaps import NO_FAULT, decompose, estimate_columns, find_faults, summarize, summarize_column
from gapbench.estimators.health import UNHEALTHY, ais_flags, health_counts
from gapbench.estimators.log_px import method_description, selected_log_px
from gapbench.measure import ais_diagnostics, ais_of, bounds_of, effective_procedure, fresh_estimators, local_posterior
from gapbench.runner.partial import PartialStore, Unit, UnitResult, concat, run_units, units_of
from gapbench.models import ConvDecoder, ConvTrunk, Decoder, DecoderBase, HierarchicalDecoder
from gapbench.outputs import join_on_index, sha256_file, with_index
from gapbench.posteriors import (DatapointStreams, HierarchicalEncoder, HierarchicalFamily, LocalFamily, make_encoder,
    make_family)
from gapbench.report import gap_table_markdown
from gapbench.runner.resources import activation_widths, memory_problems
from gapbench.runner.rundir import (STAGES, TRAIN_STATE, RunError, RunFolder, hashed_sections, open_run_folder,
    recorded_stages)
from gapbench.runner.stage_files import read_finished, read_q_star, read_summary_of
from gapbench.train import ResumeError, train

__all__ = ["CHECKPOINT_FORMAT", "Run", "RunError", "build_networks", "datapoint_streams", "dataset_of",
           "evaluation_data", "external_networks", "load_checkpoint", "networks_for", "open_run", "open_run_config",
           "run_experiment", "stage_generator", "stage_seed"]

# The random stream of each stage, fixed by name: adding a stage changes no other stage's numbers.
STAGE_STREAMS = {"train": 1, "amortized": 2, "local": 3, "report": 4, "ais": 5, "curve": 6, "log_px": 7,
                 "calibration": 8}
# Training saves train_state.pt at most this often: a save costs 20 ms (digits) to 100 ms (the
# paper's Fashion-MNIST model), so this keeps it under 1% of training time; a kill loses at most this.
TRAIN_STATE_SECONDS = 10.0
SNAPSHOTS = "snapshots"  # train.snapshot_every: weights every N epochs, for `gapbench track`
# The amortized stage evaluates units of this many (datapoint, sample) pairs (k = 5000: 26 datapoints, a
# few seconds on one CPU thread), each saved under partial/, so a stop loses at most one unit.
AMORTIZED_UNIT_ROWS = 2**17


RANDOM_STREAMS = ("per datapoint: SplitMix64 counter streams keyed by (seed, stage, datapoint index), "
                  "independent of batch, shard and number of ranks")


def stage_seed(seed: int, stage: str, part: str | None = None) -> int:
    """A 63-bit seed per (seed, stage[, part]); ``part`` names a piece of a stage whose numbers must
    not depend on the others (a local family)."""
    entropy = [seed, STAGE_STREAMS[stage]] + ([zlib.crc32(part.encode())] if part is not None else [])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def stage_generator(seed: int, stage: str, part: str | None = None, *,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """An independent random stream per (seed, stage[, part]), so a resumed stage repeats exactly (training)."""
    return torch.Generator(device=device).manual_seed(stage_seed(seed, stage, part))


def datapoint_streams(seed: int, stage: str, indices: range | list[int], device: torch.device | str = "cpu", *,
                      part: str | None = None) -> DatapointStreams:
    """The evaluation stages' streams: datapoint i of the split draws from its own stream of (seed,
    stage[, part], i), so its numbers do not depend on its batch, its shard or the number of ranks."""
    return DatapointStreams.from_seed(stage_seed(seed, stage, part), list(indices), device=device)


def build_networks(config: ExperimentConfig, data_size: int, *, image_shape: tuple[int, ...] | None = None,
                   num_levels: int = 256) -> tuple[DecoderBase, torch.nn.Module]:
    """Decoder and encoder (of family ``model.posterior``) initialised from the run seed, without
    touching torch's global stream.

    ``model.kind = "mlp"``: MLP decoder and encoder of ``model.decoder_hidden`` / ``encoder_hidden``;
    ``"conv"``: the convolutional decoder and an encoder on a convolutional trunk
    (``model.conv_channels``), which need ``image_shape``, (H, W) or (C, H, W) with product
    ``data_size``. ``num_levels``: the pixel levels of the discretised logistic likelihood.
    ``"hierarchical"``: the two-layer model p(z2) p(z1|z2) p(x|z1) (MLPs) and its encoder q(z1|x) q(z2|z1).
    """
    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if m.kind == "hierarchical":
            decoder = HierarchicalDecoder(data_size, m.latent_size, m.latent_size_2, tuple(m.decoder_hidden),
                                          tuple(m.prior_hidden), m.activation, likelihood=m.likelihood,
                                          num_levels=num_levels)
            encoder = HierarchicalEncoder(data_size, m.latent_size, m.latent_size_2, tuple(m.encoder_hidden),
                                          tuple(m.prior_hidden), m.activation)
            return decoder, encoder
        if m.kind == "mlp":
            decoder: DecoderBase = Decoder(data_size, m.latent_size, tuple(m.decoder_hidden), m.activation,
                                           likelihood=m.likelihood, num_levels=num_levels)
            trunk = None
        else:
            if image_shape is None or math.prod(image_shape) != data_size:
                raise ConfigError(f"model.kind = \"conv\" needs the images' shape, got {image_shape} for "
                                  f"{data_size} pixels")
            shape = tuple(image_shape) if len(image_shape) == 3 else (1, *image_shape)  # (C, H, W)
            try:
                decoder = ConvDecoder(shape, m.latent_size, tuple(m.conv_channels), m.activation,
                                      likelihood=m.likelihood, num_levels=num_levels)
                trunk = ConvTrunk(shape, tuple(m.conv_channels), m.activation)
            except ValueError as error:
                raise ConfigError(f"model.conv_channels = {m.conv_channels}: {error}") from None
        encoder = make_encoder(m.posterior, data_size, m.latent_size, tuple(m.encoder_hidden), m.activation,
                               num_steps=m.flow_steps, flow_hidden=m.flow_hidden, trunk=trunk)
    return decoder, encoder


def networks_for(config: ExperimentConfig, dataset: Dataset) -> tuple[DecoderBase, torch.nn.Module]:
    """:func:`build_networks` for the images of ``dataset``; with ``model.factory``, the external model
    and encoder, checked on two datapoints (``gapbench.runner.external``)."""
    if config.model.factory is not None:
        external = external_networks(config, evaluation_data(config, dataset)[:2])
        return external.model, external.encoder
    return build_networks(config, dataset.data_size, image_shape=dataset.image_shape,
                          num_levels=dataset.num_levels)


def external_networks(config: ExperimentConfig, x: torch.Tensor, device: torch.device | str = "cpu") -> ExternalModel:
    """The factory's model and encoder on ``device``, checked by a forward pass on the first datapoints of x."""
    m = config.model
    external = build_external(m.factory, factory_path=m.factory_path, checkpoint=m.checkpoint, device=device)
    check_external(external, x[:2].to(device), spec=m.factory)
    return external


def dataset_of(config: ExperimentConfig) -> Dataset:
    """The dataset ``config.data`` names (a built-in one, or the user's array file)."""
    d = config.data
    return load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, bits=d.bits, file=d.file,
                        domain=d.domain, num_levels=d.num_levels)


def local_family(config: ExperimentConfig, name: str) -> LocalFamily:
    """The local family ``name`` with the run's flow sizes (``model.flow_steps``, ``model.flow_hidden``), or
    the hierarchical one with the two-layer model's (``latent_size``, ``latent_size_2``, ``prior_hidden``)."""
    m = config.model
    if name == "hierarchical":
        return HierarchicalFamily(m.latent_size, m.latent_size_2, tuple(m.prior_hidden), m.activation)
    return make_family(name, num_steps=config.model.flow_steps, hidden_size=config.model.flow_hidden)


def log_px_candidates(config: ExperimentConfig) -> tuple[str, ...]:
    """The estimators log p_hat(x) chooses from per datapoint (``gapbench.estimators.log_px``): IWAE under q and
    under every q*, and AIS when the AIS stage runs."""
    return ("iwae_q", *[f"iwae_q_star_{f}" for f in config.refine.families],
            *(("ais",) if config.ais.enabled else ()))


def evaluation_data(config: ExperimentConfig, dataset: Dataset) -> torch.Tensor:
    """The first ``num_datapoints`` of the chosen split, binarised once with a fixed stream (for the
    Bernoulli likelihood; the discretised logistic takes the pixel levels as they are)."""
    split = dataset.split(config.eval.split)
    n = config.eval.num_datapoints
    if n > split.shape[0]:
        raise ConfigError(
            f"eval.num_datapoints = {n}, but the {dataset.name} {config.eval.split} split has only "
            f"{split.shape[0]} datapoints; lower eval.num_datapoints or choose another eval.split"
        )
    what = f"{dataset.name} {config.eval.split} split"
    check_values(split[:n], what)  # grey levels in [0, 1], no NaN or infinity
    generator = torch.Generator().manual_seed(config.seed)
    x = binarize(split[:n], mode=config.data.binarization, threshold=config.data.threshold,
                 generator=generator)
    if config.model.likelihood == "bernoulli":
        check_binary(x, f"binarised {what}")  # what the Bernoulli likelihood is a density of
    else:
        check_levels(x, dataset.num_levels, what)  # what the discretised logistic is a distribution of
    return x


def versions() -> dict[str, str]:
    from gapbench import __version__
    return {"gapbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__}


class Run:
    """One run folder and the stages that fill it (see ``gapbench.runner.rundir`` for the bookkeeping)."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print,
                 device: torch.device | str = "cpu", ranks: Ranks = ONE_PROCESS, threads: int | None = None,
                 figures: bool = True, deadline: Deadline | None = None):
        self.config = config
        self.threads = threads  # torch threads of every stage (--threads); None: by each stage's size
        self.figures = figures  # the report stage writes figures/ (--no-figures: not)
        self.deadline = deadline or Deadline()  # time limit and SIGTERM: stages stop at a safe point
        self.dir = Path(out_dir)
        self.force = force
        self.ranks = ranks  # rank 0 owns the folder; every rank evaluates its shard of datapoints
        self.progress = progress and ranks.is_main
        self.log = log if ranks.is_main else (lambda message: None)
        self.device = torch.device(device)
        self.folder: RunFolder | None = None  # rank 0 only
        self.data_size: int | None = None  # D, known once the dataset is loaded
        self.external: ExternalModel | None = None  # with model.factory: built and checked before any stage

    @property
    def data_parallel(self) -> bool:
        return self.config.train.data_parallel and self.ranks.is_distributed

    def _is_finished(self, stage: str) -> bool:
        """Rank 0's answer, on every rank."""
        return broadcast(self.folder.is_finished(stage) if self.ranks.is_main else None, self.ranks)

    def _chunk_size(self, num_datapoints: int, *, with_gradient: bool) -> int | None:
        """Samples (IWAE) or chains (AIS) per chunk: ``eval.chunk_size`` when set (IWAE), else from the
        GPU's free memory, else None (the estimators' CPU defaults)."""
        if self.config.eval.chunk_size is not None and not with_gradient:
            return self.config.eval.chunk_size
        if self.external is not None:  # sizes unknown: eval.chunk_size (IWAE) or the estimators' defaults
            return None if with_gradient else self.config.eval.chunk_size
        latent, hidden = activation_widths(self.config, self.data_size)
        rows = rows_that_fit(self.device, row_bytes(self.data_size, latent, hidden, with_gradient=with_gradient))
        return samples_per_chunk(rows, num_datapoints)

    def _use_threads(self, stage: str) -> None:
        use_stage_threads(self.config, stage, self.data_size, device=self.device, threads=self.threads, log=self.log)

    def networks(self, dataset: Dataset) -> tuple[Decoder, torch.nn.Module, dict]:
        """The trained networks on this run's device, on every rank: rank 0 trains (or loads) them and
        sends the weights to the others, so no rank needs rank 0's file system; with
        ``train.data_parallel`` every rank trains (DistributedDataParallel) and holds the same weights."""
        self.data_size = dataset.data_size
        if self.external is not None:
            return self.external_stage(dataset)
        parallel = self.data_parallel and not self._is_finished("train")  # every rank trains
        if parallel and self.config.train.batch_size < self.ranks.world_size:
            raise ConfigError(f"train.data_parallel splits each minibatch of train.batch_size = "
                              f"{self.config.train.batch_size} over {self.ranks.world_size} processes; raise "
                              "train.batch_size to at least the number of processes")
        if self.ranks.is_main or parallel:
            try:
                decoder, encoder, training = self.train_stage(dataset)
            except StopRequested as stop:
                if self.ranks.is_distributed and not parallel:  # the other ranks wait for the weights
                    broadcast(stop, self.ranks)
                raise
        if self.ranks.is_distributed and not parallel:
            shared = broadcast((_cpu(decoder.state_dict()), _cpu(encoder.state_dict()), training)
                               if self.ranks.is_main else None, self.ranks)
            if isinstance(shared, StopRequested):
                raise shared
            if not self.ranks.is_main:
                decoder, encoder = networks_for(self.config, dataset)
                decoder.load_state_dict(shared[0]), encoder.load_state_dict(shared[1])
                training = shared[2]
        return decoder.to(self.device).eval(), encoder.to(self.device).eval(), training

    def external_stage(self, dataset: Dataset) -> tuple[object, object, dict]:
        """The train stage of an external model: nothing is trained; checkpoint.pt records the factory,
        the checkpoint's sha256, versions and the weights of the networks that are nn.Modules, and
        train_history.csv has no rows. Every rank built the networks itself (``self.external``)."""
        external = self.external
        training = {"best_epoch": None, "best_valid_elbo": None, "epochs_run": 0, "stop_reason": "external model",
                    "external": external.record}
        if self.ranks.is_main and not self.folder.is_finished("train"):
            self.folder.start("train")

            def weights(part) -> dict:
                return _cpu(part.state_dict()) if isinstance(part, torch.nn.Module) else {}
            io.save_torch(self.dir / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "config": self.config.model_dump(mode="json"), "data_size": dataset.data_size,
                "posterior": self.config.model.posterior, "decoder": weights(external.model),
                "encoder": weights(external.encoder), **training})
            io.write_csv(self.dir / "train_history.csv", pd.DataFrame(columns=["epoch"]))
            self.folder.finish("train", 0.0)
            self.log(f"[train] skipped: external model {external.record['factory']}"
                     f"{'' if external.record['checkpoint'] is None else ' from ' + external.record['checkpoint']}")
        return external.model, external.encoder, training

    # --- stages -------------------------------------------------------------------------------
    def train_stage(self, dataset: Dataset) -> tuple[Decoder, torch.nn.Module, dict]:
        path = self.dir / "checkpoint.pt"
        decoder, encoder = networks_for(self.config, dataset)
        if self.ranks.is_main and self.folder.is_finished("train"):
            checkpoint = load_checkpoint(path, self.config, dataset.data_size)
            load_weights(path, checkpoint, decoder, encoder)
            self.folder.refuse_changed_checkpoint()
            (self.dir / TRAIN_STATE).unlink(missing_ok=True)  # left if killed right after the record
            self.log(f"[train] skipped: finished ({path})")
        else:
            checkpoint = self._train(decoder, encoder, dataset)
            load_weights(path, checkpoint, decoder, encoder)
        info = {k: checkpoint[k] for k in ("best_epoch", "best_valid_elbo", "epochs_run")}
        info["stop_reason"] = checkpoint.get("stop_reason", "epochs")
        return decoder, encoder, info

    def _train(self, decoder: Decoder, encoder: torch.nn.Module, dataset: Dataset) -> dict:
        """Train (continuing from train_state.pt where it fits), write the checkpoint, record the stage."""
        state_path = self.dir / TRAIN_STATE
        main = self.ranks.is_main  # with train.data_parallel every rank trains; rank 0 alone writes
        config_sha256 = self.folder.stage_hash("train") if main else None
        resume = load_train_state(state_path, config_sha256) if main and state_path.exists() else None
        if self.data_parallel:
            resume = broadcast(resume, self.ranks)
        if main and resume is None and state_path.exists():
            self.log(f"[train] {state_path} is from another config; starting from scratch")
        if main:
            self.folder.start("train")
        self._use_threads("train")
        if resume is not None:
            self.log(f"[train] resuming after epoch {resume['epoch']} ({state_path})")
        t = self.config.train
        decoder.to(self.device), encoder.to(self.device)
        if main and resume is None:
            shutil.rmtree(self.dir / SNAPSHOTS, ignore_errors=True)  # from an earlier training
        self.deadline.begin()
        try:
            result = train(
                decoder, encoder, dataset.train.to(self.device), dataset.valid.to(self.device), epochs=t.epochs,
                batch_size=t.batch_size,
                learning_rate=t.learning_rate, adam_eps=t.adam_eps, warmup_epochs=t.warmup_epochs, schedule=t.schedule,
                binarization=self.config.data.binarization, threshold=self.config.data.threshold,
                valid_every=t.valid_every, valid_num_samples=t.valid_num_samples,
                early_stopping_patience=t.early_stopping_patience, semi_amortized=t.semi_amortized(),
                on_epoch=self._snapshot(decoder, encoder) if t.snapshot_every and main else None,
                generator=stage_generator(self.config.seed, "train", device=self.device), resume_from=resume,
                on_checkpoint=(lambda state: io.save_torch(state_path, {**state, "config_sha256": config_sha256}))
                if main else None,
                checkpoint_seconds=TRAIN_STATE_SECONDS, progress=self.progress,
                data_parallel=(self.ranks.rank, self.ranks.world_size) if self.data_parallel else None,
                should_stop=self._should_stop,
            )
        except ResumeError as error:
            raise RunError(f"{state_path} does not fit this run ({error}); delete it to start training "
                           "from scratch") from None
        except FloatingPointError as error:
            raise RunError(str(error)) from None
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "config": self.config.model_dump(mode="json"), "data_size": dataset.data_size,
            "posterior": self.config.model.posterior,
            "decoder": _cpu(result.decoder_state), "encoder": _cpu(result.encoder_state),
            "best_epoch": result.best_epoch, "best_valid_elbo": result.best_valid_elbo,
            "epochs_run": len(result.history), "stop_reason": result.stop_reason,
        }
        if not main:
            return checkpoint
        io.write_csv(self.dir / "train_history.csv", pd.DataFrame([r._asdict() for r in result.history]))
        io.save_torch(self.dir / "checkpoint.pt", checkpoint)
        self.folder.finish("train", sum(r.seconds for r in result.history))
        state_path.unlink(missing_ok=True)  # after the record: until then it is the way back in
        stopped = {"epochs": "", "early_stopping": " (stopped early)",
                   "diverged": f" (stopped: the training ELBO diverged at epoch {len(result.history)})"}
        self.log(f"[train] best validation ELBO {result.best_valid_elbo:.3f} at epoch {result.best_epoch}"
                 f"{stopped[result.stop_reason]}")
        return checkpoint

    def _snapshot(self, decoder, encoder) -> Callable:
        """An on_epoch callback saving the weights every ``train.snapshot_every`` epochs (and the
        last) to snapshots/epoch_NNNNN.pt, for `gapbench track`."""
        every = self.config.train.snapshot_every

        def save(record, is_best: bool) -> None:
            if record.epoch % every == 0 or record.epoch == self.config.train.epochs:
                io.save_torch(self.dir / SNAPSHOTS / f"epoch_{record.epoch:05d}.pt",
                              {"epoch": record.epoch, "decoder": _cpu(decoder.state_dict()),
                               "encoder": _cpu(encoder.state_dict())})
        return save

    def _plan(self, num_datapoints: int, unit_size: int | None = None) -> list[list[Unit]]:
        """Every rank's datapoints (its shard) in batches of ``eval.batch_size``, cut into units of at most
        ``unit_size`` datapoints (default: one unit per batch); ``plan[r]`` holds rank r's units."""
        size = self.config.eval.batch_size
        plan = []
        for rank in range(self.ranks.world_size):
            mine = shard(num_datapoints, self.ranks._replace(rank=rank))
            batches = [range(start, min(start + size, mine.stop)) for start in range(mine.start, mine.stop, size)]
            plan.append(units_of(batches, unit_size or size))
        return plan

    def _should_stop(self) -> bool:
        """After an epoch: with train.data_parallel rank 0 asks the deadline and every rank gets its answer;
        otherwise rank 0 trains alone and asks it."""
        self.deadline.progressed()
        if not self.data_parallel:
            return self.deadline.should_stop()
        return broadcast(self.deadline.should_stop() if self.ranks.is_main else None, self.ranks)

    def _stop_inside(self) -> None:
        """Inside a unit of work (one process only: ranks cannot agree in the middle of a unit)."""
        if not self.ranks.is_distributed and self.deadline.is_expired():
            raise StopRequested("stopped inside a unit")

    def _partial_key(self, stage: str, reads: tuple[str, ...]) -> str:
        """The key of a stage's partial files: its config hash and the sha256 of the files it reads."""
        digest = hashlib.sha256(self.folder.stage_hash(stage).encode())
        for name in reads:
            digest.update(sha256_file(self.dir / name).encode())
        return digest.hexdigest()

    def _evaluate(self, stage: str, plan: list[list[Unit]], compute: Callable[[Unit], UnitResult], *,
                  reads: tuple[str, ...] = ("checkpoint.pt",), part: str | None = None,
                  desc: str) -> list[UnitResult] | None:
        """Every unit of ``plan`` through ``compute``, resuming from and saving to partial/ (see
        ``gapbench.runner.partial``); the results in datapoint order on rank 0, None on the others."""
        from tqdm.auto import tqdm
        name = stage if part is None else f"{stage}_{part}"
        store = PartialStore(self.dir, name, self._partial_key(stage, reads)) if self.ranks.is_main else None
        self.deadline.begin()
        with tqdm(total=sum(u.size for units in plan for u in units), desc=desc, unit="datapoint",
                  disable=not self.progress) as bar:
            def on_round(num_datapoints: int) -> None:
                bar.update(num_datapoints)
                self.deadline.progressed()
            return run_units(plan, compute, store=store, ranks=self.ranks, should_stop=self.deadline.should_stop,
                             what=name, on_round=on_round, on_saved=bar.update)

    def _write_frame(self, stage: str, path: Path, results: list[UnitResult] | None,
                     start: float) -> pd.DataFrame | None:
        """The end of a one-file evaluation stage: rank 0 joins the units' rows, writes ``path``, records the
        stage and removes its partial results; the other ranks return None."""
        if not self.ranks.is_main:
            return None
        frame, _ = concat(results)
        io.write_csv(path, frame)
        self.folder.finish(stage, time.perf_counter() - start)
        self._clear_partial(stage)
        return frame

    def _clear_partial(self, stage: str, parts: tuple[str, ...] = ()) -> None:
        for name in [f"{stage}_{p}" for p in parts] or [stage]:
            PartialStore(self.dir, name, "").clear()

    def _streams(self, stage: str, offset: int, batch: torch.Tensor, *, part: str | None = None) -> DatapointStreams:
        return datapoint_streams(self.config.seed, stage, range(offset, offset + batch.shape[0]), self.device,
                                 part=part)

    def amortized_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        path = self.dir / "amortized.csv"
        if self._is_finished("amortized"):
            self.log(f"[amortized] skipped: finished ({path})")
            return read_finished(path, self.config) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("amortized")
        self._use_threads("amortized")
        e = self.config.eval
        start = time.perf_counter()

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(self.device)
            with torch.no_grad():
                q = encoder(batch)
            pair = bounds_of(decoder, q, batch, num_samples=e.num_samples,
                             chunk_size=self._chunk_size(batch.shape[0], with_gradient=False),
                             generator=self._streams("amortized", unit.start, batch))
            return UnitResult(with_index(pd.DataFrame({**estimate_columns("elbo_q", pair.elbo),
                                                       **estimate_columns("iwae_q", pair.iwae)}), unit.start), {})
        results = self._evaluate("amortized", self._plan(x.shape[0], max(1, AMORTIZED_UNIT_ROWS // e.num_samples)),
                                 compute, desc="L[q], IWAE")
        return self._write_frame("amortized", path, results, start)

    def local_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        """Refine every family of ``refine.families`` for every datapoint; one frame, columns per family."""
        path = self.dir / "local.csv"
        if self._is_finished("local"):
            self.log(f"[local] skipped: finished ({path})")
            return read_finished(path, self.config) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("local")
        self._use_threads("local")
        start = time.perf_counter()
        frames, params = [], {}
        for name in self.config.refine.families:
            results = self._evaluate("local", self._plan(x.shape[0]), self._refine_unit(decoder, encoder, x, name),
                                     part=name, desc=f"refine q*_{name}")
            if self.ranks.is_main:
                frame, params[name] = concat(results)
                frames.append(frame)
        if not self.ranks.is_main:
            return None
        frame = join_on_index(frames)
        io.save_torch(self.dir / "local.pt", params)
        io.write_csv(path, frame)
        self.folder.finish("local", time.perf_counter() - start)
        self._clear_partial("local", tuple(self.config.refine.families))
        return frame

    def _refine_unit(self, decoder, encoder, x: torch.Tensor, name: str) -> Callable[[Unit], UnitResult]:
        """q*_name for a unit of datapoints: the per-datapoint columns and the parameters (on the CPU).
        Each family draws from its own streams (per datapoint, keyed by the family's name too), so adding
        a family changes no other family's numbers."""
        from tqdm.auto import tqdm
        e, r = self.config.eval, self.config.refine
        family = local_family(self.config, name)
        procedure = r.resolved(name)

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(self.device)
            generator = self._streams("local", unit.start, batch, part=name)
            with tqdm(total=unit.size, desc=f"  [{unit.start}:{unit.stop}] stopped", unit="datapoint", leave=False,
                      disable=not self.progress) as bar:
                def callback(step: int, num_active: int) -> None:  # datapoints leave as they converge
                    bar.set_postfix(step=step, active=num_active, refresh=False)
                    bar.update(unit.size - num_active - bar.n)
                    self._stop_inside()
                result = local_posterior(decoder, encoder, batch, family=family, init=r.init,
                                         procedure=procedure, generator=generator, callback=callback)
            pair = bounds_of(decoder, family.posterior(result.params), batch, num_samples=e.num_samples,
                             chunk_size=self._chunk_size(batch.shape[0], with_gradient=False), generator=generator)
            return UnitResult(with_index(pd.DataFrame({
                **estimate_columns(f"elbo_q_star_{name}", pair.elbo),
                **estimate_columns(f"iwae_q_star_{name}", pair.iwae),
                f"refine_steps_{name}": result.num_steps.cpu().numpy(),
                f"refine_converged_{name}": result.is_converged.cpu().numpy(),
                f"refine_diverged_{name}": result.is_diverged.cpu().numpy(),
            }), unit.start), _cpu(result.params))
        return compute

    def ais_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
        """AIS from the configured start for every datapoint; None when ``ais.enabled`` is false."""
        a = self.config.ais
        if not a.enabled:
            return None
        path = self.dir / "ais.csv"
        if self._is_finished("ais"):
            self.log(f"[ais] skipped: finished ({path})")
            return read_finished(path, self.config) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("ais")
        self._use_threads("ais")
        from tqdm.auto import tqdm
        own = self.config.model.posterior  # AIS from q* starts from the encoder's family's q*
        family = local_family(self.config, own)
        q_star_params = None
        if a.init == "q_star":  # rank 0 reads local.pt and sends it: no shared file system needed
            saved = read_q_star(self.dir / "local.pt", own, x.shape[0]) if self.ranks.is_main else None
            q_star_params = broadcast(saved, self.ranks)
        start = time.perf_counter()

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(self.device)
            q_star = None
            if q_star_params is not None:
                q_star = family.posterior({k: v[unit.start:unit.stop].to(self.device)
                                           for k, v in q_star_params.items()})
            with tqdm(total=a.num_steps, desc=f"  [{unit.start}:{unit.stop}] annealing", unit="step", leave=False,
                      disable=not self.progress) as bar:
                def callback(t: int) -> None:
                    bar.update(1)
                    self._stop_inside()
                estimate = ais_of(decoder, batch, init=a.init, encoder=encoder, q_star=q_star,
                                  procedure=a.procedure(),
                                  chunk_size=self._chunk_size(batch.shape[0], with_gradient=True),
                                  generator=self._streams("ais", unit.start, batch), callback=callback)
            return UnitResult(with_index(pd.DataFrame({
                **estimate_columns("ais", estimate),
                **{k: v.cpu().numpy() for k, v in ais_diagnostics(estimate).items()}}), unit.start), {})
        reads = ("checkpoint.pt", "local.pt") if a.init == "q_star" else ("checkpoint.pt",)
        results = self._evaluate("ais", self._plan(x.shape[0]), compute, reads=reads, desc="AIS")
        return self._write_frame("ais", path, results, start)

    def calibration_stage(self, decoder, encoder) -> dict | None:
        """BDMC with the run's AIS settings on ``ais.calibration_datapoints`` datapoints simulated from the
        model (rank 0, on the CPU: a few dozen datapoints, and simulation draws on the CPU;
        ``gapbench.calibration``); None when that is 0 or AIS is off."""
        a = self.config.ais
        if not (a.enabled and a.calibration_datapoints):
            return None
        path = self.dir / "ais_calibration.json"
        if self.folder.is_finished("calibration"):
            self.log(f"[calibration] skipped: finished ({path})")
            return json.loads(path.read_text())
        self.folder.start("calibration")
        from tqdm.auto import tqdm
        start = time.perf_counter()
        with tqdm(total=2 * a.num_steps, desc="AIS calibration (BDMC)", unit="step", disable=not self.progress) as bar:
            cpu_decoder, cpu_encoder = (copy.deepcopy(network).cpu() for network in (decoder, encoder))
            calibration = calibrate_ais(cpu_decoder, cpu_encoder, num_datapoints=a.calibration_datapoints,
                                        procedure=a.procedure(), init="prior" if a.init == "prior" else "encoder",
                                        tolerance=a.calibration_tolerance,
                                        generator=stage_generator(self.config.seed, "calibration"),
                                        callback=lambda t: bar.update(1))
        io.write_json(path, calibration)
        self.folder.finish("calibration", time.perf_counter() - start)
        for line in calibration_lines(calibration):
            self.log(f"[calibration] {line}")
        return calibration

    def log_px_stage(self, decoder, encoder, x: torch.Tensor, pilot: pd.DataFrame | None) -> pd.DataFrame:
        """log p_hat(x) for every datapoint: the estimator chosen on the pilot bounds (``pilot``, rank 0's
        frame of amortized.csv, local.csv and ais.csv side by side), drawn again from the datapoint's
        streams of this stage, one part per estimator (``gapbench.estimators.log_px.selected_log_px``, as
        ``measure_gaps``)."""
        path = self.dir / "log_px.csv"
        if self._is_finished("log_px"):
            self.log(f"[log_px] skipped: finished ({path})")
            return read_finished(path, self.config) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("log_px")
        self._use_threads("log_px")
        c = self.config
        candidates = log_px_candidates(c)
        columns = [n for name in candidates for n in (name, f"{name}_stderr", f"{name}_ess")]
        if self.ranks.is_main and "ais_unhealthy" in pilot:
            columns.append("ais_unhealthy")
        pilot = broadcast(pilot[columns] if self.ranks.is_main else None, self.ranks)  # every rank chooses
        saved = torch.load(self.dir / "local.pt", weights_only=True) if self.ranks.is_main else None
        if saved is not None:  # one family's tensors at the top level: a folder from before flows
            saved = {f: saved.get(f, saved) for f in c.refine.families}
        q_star_params = broadcast(saved, self.ranks)
        a = c.ais
        start = time.perf_counter()

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(self.device)
            rows = slice(unit.start, unit.stop)
            q_stars = {f"iwae_q_star_{f}": (local_family(c, f), {k: v[rows].to(self.device) for k, v in
                                                                 q_star_params[f].items()})
                       for f in c.refine.families}
            ais = None if not a.enabled else {
                "init": a.init, "encoder": encoder, "procedure": a.procedure(),
                "q_star": f"iwae_q_star_{c.model.posterior}" if a.init == "q_star" else None,
                "chunk_size": self._chunk_size(batch.shape[0], with_gradient=True)}

            def streams(name: str, positions: torch.Tensor) -> DatapointStreams:
                return datapoint_streams(c.seed, "log_px", (positions + unit.start).tolist(), self.device, part=name)
            fns = fresh_estimators(decoder, batch, encoder=encoder, q_stars=q_stars, num_samples=c.eval.num_samples,
                                   chunk_size=self._chunk_size(batch.shape[0], with_gradient=False), ais=ais,
                                   streams=streams)
            chosen = selected_log_px(pilot.iloc[rows].reset_index(drop=True), candidates, fns)
            return UnitResult(with_index(chosen, unit.start), {})
        reads = ("checkpoint.pt", "amortized.csv", "local.csv", "local.pt", *(("ais.csv",) if a.enabled else ()))
        results = self._evaluate("log_px", self._plan(x.shape[0]), compute, reads=reads,
                                 desc="log p_hat(x), fresh draws")
        return self._write_frame("log_px", path, results, start)

    def curve_stage(self, decoder, encoder, x: torch.Tensor, local: pd.DataFrame) -> pd.DataFrame | None:
        """The refinement curve of every datapoint (``gapbench.inference.curves``); None when ``curve.enabled`` is
        false. The fraction of the gap closed uses L[q*] of the local stage."""
        c = self.config.curve
        if not c.enabled:
            return None
        path = self.dir / "curve.csv"
        if self._is_finished("curve"):
            self.log(f"[curve] skipped: finished ({path})")
            return io.read_csv(path) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("curve")
        self._use_threads("curve")
        from tqdm.auto import tqdm
        procedure = c.procedure()
        # L[q*] of every datapoint: local.csv is rank 0's, so rank 0 sends the column to every rank
        elbo_q_star = broadcast(local[q_star_column(local)].to_numpy() if self.ranks.is_main else None, self.ranks)
        start = time.perf_counter()

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(self.device)
            with tqdm(total=procedure.steps[-1], desc=f"  [{unit.start}:{unit.stop}] SVI", unit="step", leave=False,
                      disable=not self.progress) as bar:
                def callback(step: int) -> None:
                    bar.update(1)
                    self._stop_inside()
                curve = refinement_curve(decoder, encoder, batch, **procedure._asdict(),
                                         chunk_size=self.config.eval.chunk_size,
                                         generator=self._streams("curve", unit.start, batch), callback=callback)
            return UnitResult(curve_frame(curve, elbo_q_star[unit.start:unit.stop], offset=unit.start), {})
        results = self._evaluate("curve", self._plan(x.shape[0]), compute, reads=("checkpoint.pt", "local.csv"),
                                 desc="curve")
        return self._write_frame("curve", path, results, start)

    def _pilot(self, amortized: pd.DataFrame, local: pd.DataFrame, ais: pd.DataFrame | None) -> pd.DataFrame:
        """amortized.csv, local.csv (in this version's form) and ais.csv side by side: the pilot bounds."""
        local = _local_in_current_form(local, self.config.model.posterior)
        if ais is not None:  # a flagged AIS estimate stays in the frame but not in log p_hat (gapbench.estimators.health)
            ais = pd.concat([ais, ais_flags(ais, **self.config.ais.flags())], axis=1)
        return join_on_index([amortized, local] + ([ais] if ais is not None else []))

    def report_stage(self, x: torch.Tensor, amortized: pd.DataFrame, local: pd.DataFrame,
                     ais: pd.DataFrame | None, log_px: pd.DataFrame, curve: pd.DataFrame | None, dataset: Dataset,
                     training: dict, calibration: dict | None = None) -> dict:
        if self.folder.is_finished("report"):
            self.log(f"[report] skipped: finished ({self.dir / 'summary.json'})")
            return read_summary_of(self.dir)
        self.folder.start("report")
        frame = join_on_index([self._pilot(amortized, local, ais), log_px])
        own = self.config.model.posterior  # the run's gaps compare L[q] with L[q*] of the encoder's family
        for column in ("elbo_q_star", "elbo_q_star_stderr", "elbo_q_star_ess", "refine_steps", "refine_converged",
                       "refine_diverged"):
            frame[column] = frame[family_column(column, own)]
        candidates = log_px_candidates(self.config)
        frame = decompose(frame)
        flags = tuple(f"refine_diverged_{f}" for f in self.config.refine.families)
        frame["fault"] = find_faults(frame, ("elbo_q", "elbo_q_star", *candidates, "log_px"), flags=flags)
        io.write_csv(self.dir / "datapoints.csv", frame)
        summary = self.summary(frame, x, dataset, training)
        if calibration is not None:
            summary["ais_calibration"] = calibration
        if curve is not None:
            summary["curve"] = summarize_curve(curve, local[q_star_column(local)].to_numpy())
        io.write_json(self.dir / "summary.json", summary)
        io.write_text(self.dir / "table.md", gap_table_markdown(summary))
        shutil.rmtree(self.dir / "figures", ignore_errors=True)  # a redone report leaves no figures of the last
        if self.figures:
            from gapbench.report.figures.common import write_run_figures
            self.log("[report] figures: " + ", ".join(p.name for p in write_run_figures(self.dir, frame, summary)
                                                      if p.suffix == ".png") + f" in {self.dir / 'figures'}")
        self.folder.finish("report", 0.0)
        faults = summary["faults"]
        if ais is not None and summary["ais"]["unhealthy"]["num_unhealthy"]:
            unhealthy = summary["ais"]["unhealthy"]
            self.log(f"[report] AIS was flagged unhealthy for {unhealthy['num_unhealthy']} of "
                     f"{faults['num_datapoints']} "
                     f"datapoints ({', '.join(f'{k}: {v}' for k, v in unhealthy.items() if k != 'num_unhealthy')}); "
                     f"their AIS is left out of log p_hat(x) (datapoints.csv, column {UNHEALTHY})")
        if faults["num_faulty"]:
            self.log(f"[report] {faults['num_faulty']} of {faults['num_datapoints']} datapoints had numerical "
                     f"faults ({', '.join(f'{k}: {v}' for k, v in faults['counts'].items())}); they are left "
                     "out of the means and flagged in datapoints.csv, column fault")
        return summary

    def summary(self, frame: pd.DataFrame, x: torch.Tensor, dataset: Dataset, training: dict) -> dict:
        c = self.config
        summary = summarize(frame)
        usable = frame[frame["fault"] == NO_FAULT]
        families = c.refine.families
        candidates = log_px_candidates(c)
        for name in families:  # L[q*] of every refined family, on the same datapoints
            column = f"elbo_q_star_{name}"
            summary["bounds"][column] = summarize_column(usable[column], usable[f"{column}_stderr"])
        summary["other_bounds"] = {name: summarize_column(usable[name], usable[f"{name}_stderr"])
                                   for name in candidates}
        # the per-datapoint max of the pilot bounds: biased upward (a max of noisy estimates), in no gap and
        # no regression check
        summary["diagnostics"] = {"max_pilot_bound": summarize_column(usable["max_pilot_bound"])}
        k = c.eval.num_samples
        summary["estimators"] = {  # what produced each bound of "bounds" and "other_bounds"
            "elbo_q": f"ELBO, {k} samples of the encoder's q", "iwae_q": f"IWAE-{k} under the encoder's q",
            "elbo_q_star": f"ELBO, {k} samples of q*_{c.model.posterior} (the encoder's family)",
            **{f"elbo_q_star_{f}": f"ELBO, {k} samples of q*_{f}" for f in families},
            **{f"iwae_q_star_{f}": f"IWAE-{k} under q*_{f}" for f in families},
            **({"ais": f"AIS, {c.ais.num_chains} chains x {c.ais.num_steps} steps from {c.ais.init}"}
               if c.ais.enabled else {}),
            "log_px": method_description(candidates),
            "max_pilot_bound": "per-datapoint max of " + ", ".join(candidates) + " (diagnostic: biased upward, in no gap)",
        }
        summary["log_px_source_counts"] = {k: int(v) for k, v in usable["log_px_source"].value_counts().items()}
        summary["refinement"] = {name: {
            "mean_steps": float(frame[f"refine_steps_{name}"].mean()),
            "max_steps_taken": int(frame[f"refine_steps_{name}"].max()),
            "converged_fraction": float(frame[f"refine_converged_{name}"].mean()),
            "diverged_count": int(frame[f"refine_diverged_{name}"].sum()),
        } for name in families}
        if c.ais.enabled:
            summary["ais"] = {
                "mean_acceptance_rate": float(frame["ais_acceptance_rate"].mean()),
                "mean_step_size": float(frame["ais_step_size"].mean()),
                "mean_divergence_rate": float(frame["ais_divergence_rate"].mean()),
                "mean_ess": float(frame["ais_ess"].mean()),
                "min_ess": float(frame["ais_ess"].min()),
                "unhealthy": health_counts(frame),
            }
        summary["settings"] = {
            "name": c.name,
            "seed": c.seed,
            "dataset": dataset.name,
            "split": c.eval.split,
            "num_datapoints": c.eval.num_datapoints,
            "datapoints": f"the first {c.eval.num_datapoints} of the {c.eval.split} split",
            "binarization": {"mode": c.data.binarization, "threshold": c.data.threshold,
                             "evaluation_stream_seed": c.seed if c.data.binarization == "dynamic" else None},
            "likelihood": {"name": c.model.likelihood,
                           "num_levels": dataset.num_levels if c.model.likelihood == "logistic" else 2,
                           "bits": c.data.bits},
            "evaluation_data_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
            "num_samples": {"elbo": c.eval.num_samples, "iwae_k": c.eval.num_samples,
                            "elbo_and_iwae_share_samples": True},
            "chunk_size": c.eval.chunk_size,
            "random_streams": RANDOM_STREAMS,
            "device": self.device.type,
            "log_px": method_description(candidates),
            "encoder_family": c.model.posterior,
            "refinement": {"families": list(families), "init": c.refine.init, "preset": c.refine.procedure,
                           "procedures": {name: effective_procedure(local_family(c, name),
                                                                    c.refine.resolved(name))._asdict()
                                          for name in families}},
            "ais": hashed_sections(c.model_dump(mode="json"), "report")["ais"],  # the health thresholds when set
            **({"curve": c.curve.model_dump(mode="json")} if c.curve.enabled else {}),
            "model": c.model.model_dump(mode="json"),
            "train": hashed_sections(c.model_dump(mode="json"), "train")["train"],  # semi_amortized_* only when K > 0
        }
        summary["training"] = training
        summary["data"] = dataset.provenance
        summary["versions"] = versions()
        return summary

    def execute(self) -> dict:
        """Run every stage that has not finished yet; returns the summary."""
        dataset = dataset_of(self.config)
        for split in ("train", "valid"):  # checked before anything is written
            check_values(dataset.split(split), f"{dataset.name} {split} split")
        x = evaluation_data(self.config, dataset)
        if self.config.model.factory is not None:  # built and checked before anything is written
            self.config = with_checkpoint_sha256(self.config)
            self.external = external_networks(self.config, x, self.device)
        resolved = self.config.model_dump(mode="json")
        self._check_memory(dataset, resolved)  # before the folder is opened: nothing written, nothing moved
        joined = self.ranks.is_distributed and not torch.distributed.is_initialized()
        init_ranks(self.ranks, self.device)
        is_done = False
        try:
            with ExitStack() as stack:
                self._open_folder(stack, resolved)
                stack.enter_context(self._stopping())
                try:
                    with torch.random.fork_rng(devices=[]):
                        decoder, encoder, training = self.networks(dataset)
                        amortized = self.amortized_stage(decoder, encoder, x)
                        local = self.local_stage(decoder, encoder, x)
                        ais = self.ais_stage(decoder, encoder, x)
                        calibration = self.calibration_stage(decoder, encoder) if self.ranks.is_main else None
                        log_px = self.log_px_stage(decoder, encoder, x, self._pilot(amortized, local, ais)
                                                   if self.ranks.is_main else None)
                        curve = self.curve_stage(decoder, encoder, x, local)
                        summary = self.report_stage(x, amortized, local, ais, log_px, curve, dataset,
                                                    training, calibration) \
                            if self.ranks.is_main else None
                        is_done = True
                        return summary
                except OSError as error:  # a full disk, a folder made read-only under a running process
                    where = error.filename or self.dir
                    raise RunError(f"cannot write {where}: {error.strerror or error}; make room or fix the "
                                   "permissions, then rerun the same command to resume") from None
        finally:
            if joined:
                close_ranks(self.ranks, wait=is_done)

    @contextmanager
    def _stopping(self) -> Iterator[None]:
        """SIGTERM stops the stages at a safe point like the time limit; a stop says what is done and what
        remains (rank 0's folder knows)."""
        with self.deadline.handling_sigterm():
            try:
                yield
            except StopRequested as stop:
                finished = [s for s in STAGES if self.folder is not None and s in self.folder.records]
                remaining = [s for s in STAGES if s not in finished and self._is_enabled(s)]
                raise StopRequested(
                    f"stopped at {self.deadline.reason()} in the {remaining[0]} stage: {stop} (saved); "
                    f"finished: {', '.join(finished) or 'nothing yet'}; to do: {', '.join(remaining)}. "
                    "Run the same command again to continue.") from None

    def _is_enabled(self, stage: str) -> bool:
        a = self.config.ais
        return {"ais": a.enabled, "calibration": a.enabled and a.calibration_datapoints > 0,
                "curve": self.config.curve.enabled}.get(stage, True)

    def _check_memory(self, dataset: Dataset, resolved: dict) -> None:
        """Refuse (RunError) a config whose unfinished stages cannot fit in the device's free memory
        (``gapbench.runner.resources``)."""
        finished = recorded_stages(self.dir, resolved) if self.ranks.is_main else set()
        problems = memory_problems(self.config, dataset.data_size, self.device, skip=finished)
        if problems:
            raise RunError("the run cannot fit in memory: " + "; ".join(problems)
                           + " (estimates of the largest arrays, gapbench/runner/resources.py)")

    def _open_folder(self, stack: ExitStack, resolved: dict) -> None:
        """Rank 0 opens (and locks) the folder; a refusal stops every rank with rank 0's message."""
        error = None
        if self.ranks.is_main:
            try:
                self.folder = stack.enter_context(open_run_folder(
                    self.dir, resolved, force=self.force, log=self.log,
                    normalize=lambda previous: comparable_config(previous, resolved)))
            except (RunError, ConfigError, OSError) as caught:
                error = caught
        message = broadcast(None if error is None else str(error), self.ranks)
        if error is not None:
            raise error
        if message is not None:
            raise RunError(f"rank 0 could not open the run folder: {message}")


def q_star_column(local: pd.DataFrame) -> str:
    """The column of local.csv holding L[q*] of the diagonal Gaussian (the family a curve refines)."""
    return "elbo_q_star_ffg" if "elbo_q_star_ffg" in local else "elbo_q_star"


def family_column(column: str, family: str) -> str:
    """The local.csv column of ``family`` for an unsuffixed name: elbo_q_star_stderr ->
    elbo_q_star_<family>_stderr, refine_steps -> refine_steps_<family>."""
    return column.replace("q_star", f"q_star_{family}") if "q_star" in column else f"{column}_{family}"


def _local_in_current_form(local: pd.DataFrame, own: str) -> pd.DataFrame:
    """local.csv as this version writes it: a file from before flows (one family, unsuffixed columns)
    gets its columns suffixed with the encoder's family; one from before refinement flagged divergence
    gets no divergence."""
    if "elbo_q_star" in local and f"elbo_q_star_{own}" not in local:
        local = local.rename(columns={c: family_column(c, own) for c in local.columns if c != "index"})
    if f"refine_diverged_{own}" not in local:
        local = local.assign(**{f"refine_diverged_{own}": False})
    return local


def comparable_config(previous: dict, current: dict) -> dict:
    """A config recorded by an older version, in this version's form: keys it lacks take their
    defaults, and a section it lacks (one added since, such as ``[ais]``) takes the current value,
    since nothing in that folder depends on it, so the folder resumes and only the new stage runs.
    A config that does not validate is returned as it is (and then differs)."""
    from gapbench.runner.config import parse_config

    try:
        normalized = parse_config(previous, source="config.json", ignore_unknown=True).model_dump(mode="json")
    except ConfigError:
        return previous
    for section, value in current.items():
        if section not in previous:
            normalized[section] = value
    return normalized


def run_experiment(config: ExperimentConfig, out_dir: str | Path, *, force: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print,
                   device: torch.device | str = "cpu", ranks: Ranks = ONE_PROCESS,
                   threads: int | None = None, figures: bool = True, deadline: Deadline | None = None) -> dict | None:
    """Run (or resume) an experiment into ``out_dir``; returns the summary dict (None on ranks other
    than 0 of a distributed job: see ``gapbench.runner.distributed``). ``threads``: torch threads of every
    stage (None: chosen per stage from its size, ``gapbench.runner.device.stage_threads``); ``figures``: the
    report stage writes figures/ (``gapbench.report.figures.common``).

    ``deadline``: a time limit (and SIGTERM handling): the stages stop at a safe point before it and
    raise :class:`~gapbench.deadline.StopRequested`; the same call again continues."""
    return Run(config, out_dir, force=force, progress=progress, log=log, device=device, ranks=ranks,
               threads=threads, figures=figures, deadline=deadline).execute()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def open_run_config(run_dir: str | Path) -> ExperimentConfig:
    """A trained run's config; keys this version does not know are ignored with a warning, and
    sections it lacks take their defaults, so folders written by other versions load."""
    from gapbench.runner.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise RunError(f"{run_dir} is not a trained gapbench run (no config.json and checkpoint.pt); "
                       "train one with `gapbench run EXPERIMENT.toml --out DIR` first")
    return load_config(run_dir / "config.json", ignore_unknown=True)


def open_run(run_dir: str | Path, *, num_datapoints: int | None = None
             ) -> tuple[ExperimentConfig, Decoder, torch.nn.Module, torch.Tensor]:
    """A trained run's config, networks (eval mode) and evaluation datapoints (N, D).

    ``num_datapoints`` replaces the run's ``eval.num_datapoints`` (same split, same binarisation).
    """
    run_dir = Path(run_dir)
    config = open_run_config(run_dir)
    dataset = dataset_of(config)
    with_checkpoint_sha256(config)  # an external model's checkpoint must still be the one the run measured
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt", config, dataset.data_size)
    decoder, encoder = networks_for(config, dataset)
    if config.model.factory is None:  # an external model is rebuilt by its factory
        load_weights(run_dir / "checkpoint.pt", checkpoint, decoder, encoder)
    if num_datapoints is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"num_datapoints": num_datapoints})})
    return config, decoder, encoder, evaluation_data(config, dataset)
