"""The run driver: open and verify the folder, then the stages in order, one folder per run.

The stages are small functions (``gapbench.runner.stages``, the train stage in
``gapbench.runner.training``); what each hashes, reads and writes is in ``gapbench.runner.stage_table``.
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

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from gapbench.data import Dataset, check_values
from gapbench.deadline import Deadline, StopRequested
from gapbench.models import Decoder
from gapbench.posteriors import DatapointStreams
from gapbench.runner import stages, training
from gapbench.runner.build import (build_networks, datapoint_streams, dataset_of, evaluation_data, external_networks,
    local_family, networks_for, stage_generator, stage_seed)
from gapbench.runner.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_weights
from gapbench.runner.config import ConfigError, ExperimentConfig
from gapbench.runner.device import row_bytes, rows_that_fit, samples_per_chunk, use_stage_threads
from gapbench.runner.distributed import ONE_PROCESS, Ranks, broadcast, close_ranks, init_ranks, shard
from gapbench.runner.external import ExternalModel, with_checkpoint_sha256
from gapbench.runner.migrate import comparable_config
from gapbench.runner.partial import Unit, units_of
from gapbench.runner.resources import activation_widths, memory_problems
from gapbench.runner.rundir import RunError, RunFolder, open_run_folder, recorded_stages
from gapbench.runner.stage_table import STAGE_OF, STAGES
from gapbench.runner.training import SNAPSHOTS

__all__ = ["CHECKPOINT_FORMAT", "Run", "RunError", "SNAPSHOTS", "build_networks", "datapoint_streams", "dataset_of",
           "evaluation_data", "external_networks", "load_checkpoint", "local_family", "networks_for", "open_run",
           "open_run_config", "run_experiment", "stage_generator", "stage_seed"]

Value = TypeVar("Value")


class Run:
    """One run: its config, folder and ranks, and what every stage asks of them (the stages themselves
    are functions of a Run: ``gapbench.runner.stages``)."""

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

    def on_main(self, value_fn: Callable[[], Value]) -> Value | None:
        """``value_fn()`` on rank 0 (which alone holds the folder and the stages' frames); None on the others."""
        return value_fn() if self.ranks.is_main else None

    def from_main(self, value_fn: Callable[[], Value]) -> Value:
        """Rank 0's ``value_fn()``, on every rank (only rank 0 calls it)."""
        return broadcast(self.on_main(value_fn), self.ranks)

    def is_finished(self, stage: str) -> bool:
        """Rank 0's answer, on every rank."""
        return self.from_main(lambda: self.folder.is_finished(stage))

    def chunk_size(self, num_datapoints: int, *, with_gradient: bool) -> int | None:
        """Samples (IWAE) or chains (AIS) per chunk: ``eval.chunk_size`` when set (IWAE), else from the
        GPU's free memory, else None (the estimators' CPU defaults)."""
        if self.config.eval.chunk_size is not None and not with_gradient:
            return self.config.eval.chunk_size
        if self.external is not None:  # sizes unknown: eval.chunk_size (IWAE) or the estimators' defaults
            return None if with_gradient else self.config.eval.chunk_size
        latent, hidden = activation_widths(self.config, self.data_size)
        rows = rows_that_fit(self.device, row_bytes(self.data_size, latent, hidden, with_gradient=with_gradient))
        return samples_per_chunk(rows, num_datapoints)

    def use_threads(self, stage: str) -> None:
        use_stage_threads(self.config, stage, self.data_size, device=self.device, threads=self.threads, log=self.log)

    def plan(self, unit_size: int | None = None) -> list[list[Unit]]:
        """Every rank's evaluation datapoints (its shard) in batches of ``eval.batch_size``, cut into units of at
        most ``unit_size`` datapoints (default: one unit per batch); ``plan[r]`` holds rank r's units."""
        size, num_datapoints = self.config.eval.batch_size, self.config.eval.num_datapoints
        plan = []
        for rank in range(self.ranks.world_size):
            mine = shard(num_datapoints, self.ranks._replace(rank=rank))
            batches = [range(start, min(start + size, mine.stop)) for start in range(mine.start, mine.stop, size)]
            plan.append(units_of(batches, unit_size or size))
        return plan

    def streams(self, stage: str, offset: int, batch: torch.Tensor, *, part: str | None = None) -> DatapointStreams:
        """The streams of a batch's datapoints, the first at position ``offset`` of the evaluation data."""
        return datapoint_streams(self.config.seed, stage, range(offset, offset + batch.shape[0]), self.device,
                                 part=part)

    def should_stop_training(self) -> bool:
        """After an epoch: with train.data_parallel rank 0 asks the deadline and every rank gets its answer;
        otherwise rank 0 trains alone and asks it."""
        self.deadline.progressed()
        if not self.data_parallel:
            return self.deadline.should_stop()
        return self.from_main(self.deadline.should_stop)

    def stop_inside(self) -> None:
        """Inside a unit of work (one process only: ranks cannot agree in the middle of a unit)."""
        if not self.ranks.is_distributed and self.deadline.is_expired():
            raise StopRequested("stopped inside a unit")

    def execute(self) -> dict | None:
        """Run every stage that has not finished yet; returns the summary (None on ranks other than 0)."""
        dataset, x = self._inputs()
        resolved = self.config.model_dump(mode="json")
        self._check_memory(dataset, resolved)  # before the folder is opened: nothing written, nothing moved
        joined = self.ranks.is_distributed and not torch.distributed.is_initialized()
        init_ranks(self.ranks, self.device)
        is_done = False
        try:
            with ExitStack() as stack:
                self._open_folder(stack, resolved)
                stack.enter_context(self._stopping())
                with self._os_errors(), torch.random.fork_rng(devices=[]):
                    summary = self._stages(dataset, x)
                    is_done = True
                    return summary
        finally:
            if joined:
                close_ranks(self.ranks, wait=is_done)

    def _stages(self, dataset: Dataset, x: torch.Tensor) -> dict | None:
        """The stages in order, each skipped when finished."""
        self.data_size = dataset.data_size
        decoder, encoder, trained = training.networks(self, dataset)
        amortized = stages.amortized(self, decoder, encoder, x)
        local = stages.local(self, decoder, encoder, x)
        ais = stages.ais(self, decoder, encoder, x)
        calibration = stages.calibration(self, decoder, encoder)
        pilot = self.on_main(lambda: stages.pilot_frame(self, amortized, local, ais))
        log_px = stages.log_px(self, decoder, encoder, x, pilot)
        curve = stages.curve(self, decoder, encoder, x, pilot)
        return stages.report(self, x, pilot, log_px, curve, dataset, trained, calibration)

    def _inputs(self) -> tuple[Dataset, torch.Tensor]:
        """The dataset and evaluation datapoints, checked (and an external model built and checked)
        before anything is written."""
        dataset = dataset_of(self.config)
        for split in ("train", "valid"):
            check_values(dataset.split(split), f"{dataset.name} {split} split")
        x = evaluation_data(self.config, dataset)
        if self.config.model.factory is not None:
            self.config = with_checkpoint_sha256(self.config)
            self.external = external_networks(self.config, x, self.device)
        return dataset, x

    @contextmanager
    def _os_errors(self) -> Iterator[None]:
        """A full disk or a folder made read-only under a running process: RunError with the fix."""
        try:
            yield
        except OSError as error:
            where = error.filename or self.dir
            raise RunError(f"cannot write {where}: {error.strerror or error}; make room or fix the "
                           "permissions, then rerun the same command to resume") from None

    @contextmanager
    def _stopping(self) -> Iterator[None]:
        """SIGTERM stops the stages at a safe point like the time limit; a stop says what is done and what
        remains (rank 0's folder knows)."""
        with self.deadline.handling_sigterm():
            try:
                yield
            except StopRequested as stop:
                finished = [s for s in STAGES if self.folder is not None and s in self.folder.records]
                remaining = [s for s in STAGES if s not in finished and STAGE_OF[s].is_enabled(self.config)]
                raise StopRequested(
                    f"stopped at {self.deadline.reason()} in the {remaining[0]} stage: {stop} (saved); "
                    f"finished: {', '.join(finished) or 'nothing yet'}; to do: {', '.join(remaining)}. "
                    "Run the same command again to continue.") from None

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
