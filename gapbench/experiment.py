"""The staged runner: train -> amortized -> local -> ais -> report, one folder per run.

Each stage writes its outputs atomically and is recorded in stages.json when they are complete;
a rerun skips recorded stages, and training continues from its last saved epoch (train_state.pt), so a
run killed at any moment resumes where it stopped and ends with the same numbers. A folder holding
a run with another config is refused unless ``force``, which redoes only the stages the change
affects (see ``gapbench.rundir``).

The evaluation stages (amortized, local, ais) draw every datapoint's noise from its own stream
(``datapoint_streams``), so a datapoint's numbers depend on the seed and its index only. Under
torchrun each rank evaluates a shard of the datapoints and rank 0, which alone owns the folder and
trains, gathers the rows and writes the same files as one process (``gapbench.distributed``).

Files of a run folder:
    config.json        the resolved configuration (every default filled in)
    checkpoint.pt      best decoder and encoder weights, with the config (torch.load(weights_only=True))
    train_history.csv  one row per epoch
    train_state.pt     while training: a recent epoch's weights, Adam state, random stream and history
    amortized.csv      per datapoint: L[q] and IWAE under q, with standard errors and ESS
    local.csv, local.pt   per datapoint: L[q*], IWAE under q*, refinement steps and flags; the q* parameters
    ais.csv            per datapoint: AIS estimate of log p(x) with standard error, ESS and HMC diagnostics
    datapoints.csv     everything per datapoint, with log p_hat(x), the three gaps and numerical faults
    summary.json       means with standard errors, fault counts, and every setting that changes a number
    table.md           the gap table
    stages.json        which stages finished, with which config (sha256), when, and how long they took
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from . import io
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, load_train_state,
                          load_weights)
from .config import ConfigError, ExperimentConfig
from .data import Dataset, binarize, check_binary, check_values, load_dataset
from .device import row_bytes, rows_that_fit, samples_per_chunk
from .distributed import ONE_PROCESS, Ranks, broadcast, close_ranks, gather, init_ranks, shard
from .gaps import NO_FAULT, best_bound, decompose, estimate_columns, find_faults, summarize, summarize_column
from .measure import ais_diagnostics, ais_of, bounds_of, local_posterior
from .models import Decoder
from .posteriors import DatapointStreams, GaussianEncoder, get_family
from .report import gap_table_markdown
from .rundir import TRAIN_STATE, RunError, RunFolder, open_run_folder
from .train import ResumeError, train

__all__ = ["CHECKPOINT_FORMAT", "Run", "RunError", "build_networks", "datapoint_streams", "evaluation_data",
           "load_checkpoint", "open_run", "open_run_config", "run_experiment", "stage_generator", "stage_seed"]

LOG_PX_CANDIDATES = ("iwae_q", "iwae_q_star")  # and "ais" when the AIS stage runs
# The random stream of each stage, fixed by name: adding a stage changes no other stage's numbers.
STAGE_STREAMS = {"train": 1, "amortized": 2, "local": 3, "report": 4, "ais": 5}
# Training saves train_state.pt at most this often: a save costs 20 ms (digits) to 100 ms (the
# paper's Fashion-MNIST model), so this keeps it under 1% of training time; a kill loses at most this.
TRAIN_STATE_SECONDS = 10.0


RANDOM_STREAMS = ("per datapoint: SplitMix64 counter streams keyed by (seed, stage, datapoint index), "
                  "independent of batch, shard and number of ranks")


def stage_seed(seed: int, stage: str) -> int:
    """A 63-bit seed per (seed, stage)."""
    state = np.random.SeedSequence([seed, STAGE_STREAMS[stage]]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def stage_generator(seed: int, stage: str, device: torch.device | str = "cpu") -> torch.Generator:
    """An independent random stream per (seed, stage), so a resumed stage repeats exactly (training)."""
    return torch.Generator(device=device).manual_seed(stage_seed(seed, stage))


def datapoint_streams(seed: int, stage: str, indices: range | list[int],
                      device: torch.device | str = "cpu") -> DatapointStreams:
    """The evaluation stages' streams: datapoint i of the split draws from its own stream of (seed,
    stage, i), so its numbers do not depend on its batch, its shard or the number of ranks."""
    return DatapointStreams.from_seed(stage_seed(seed, stage), list(indices), device=device)


def build_networks(config: ExperimentConfig, data_size: int) -> tuple[Decoder, GaussianEncoder]:
    """Decoder and encoder initialised from the run seed, without touching torch's global stream."""
    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        decoder = Decoder(data_size, m.latent_size, tuple(m.decoder_hidden), m.activation)
        encoder = GaussianEncoder(data_size, m.latent_size, tuple(m.encoder_hidden), m.activation)
    return decoder, encoder


def evaluation_data(config: ExperimentConfig, dataset: Dataset) -> torch.Tensor:
    """The first ``num_datapoints`` of the chosen split, binarised once with a fixed stream."""
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
    check_binary(x, f"binarised {what}")  # what the Bernoulli likelihood is a density of
    return x


def versions() -> dict[str, str]:
    from . import __version__
    return {"gapbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__}


class Run:
    """One run folder and the stages that fill it (see ``gapbench.rundir`` for the bookkeeping)."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print,
                 device: torch.device | str = "cpu", ranks: Ranks = ONE_PROCESS):
        self.config = config
        self.dir = Path(out_dir)
        self.force = force
        self.ranks = ranks  # rank 0 owns the folder; every rank evaluates its shard of datapoints
        self.progress = progress and ranks.is_main
        self.log = log if ranks.is_main else (lambda message: None)
        self.device = torch.device(device)
        self.folder: RunFolder | None = None  # rank 0 only
        self.data_size: int | None = None  # D, known once the dataset is loaded

    @property
    def data_parallel(self) -> bool:
        return self.config.train.data_parallel and self.ranks.is_distributed

    def _is_finished(self, stage: str) -> bool:
        """Rank 0's answer, on every rank."""
        return broadcast(self.folder.is_finished(stage) if self.ranks.is_main else None, self.ranks)

    def _gather(self, frames: list[pd.DataFrame]) -> pd.DataFrame | None:
        """Every rank's rows on rank 0, in datapoint order; None on the other ranks."""
        parts = gather(pd.concat(frames, ignore_index=True) if frames else None, self.ranks)
        return None if parts is None else pd.concat([p for p in parts if p is not None], ignore_index=True)

    def _chunk_size(self, num_datapoints: int, *, with_gradient: bool) -> int | None:
        """Samples (IWAE) or chains (AIS) per chunk: ``eval.chunk_size`` when set (IWAE), else from the
        GPU's free memory, else None (the estimators' CPU defaults)."""
        if self.config.eval.chunk_size is not None and not with_gradient:
            return self.config.eval.chunk_size
        m = self.config.model
        rows = rows_that_fit(self.device, row_bytes(self.data_size, m.latent_size, m.decoder_hidden,
                                                    with_gradient=with_gradient))
        return samples_per_chunk(rows, num_datapoints)

    def networks(self, dataset: Dataset) -> tuple[Decoder, GaussianEncoder, dict]:
        """The trained networks on this run's device, on every rank: rank 0 trains (or loads) them and
        sends the weights to the others, so no rank needs rank 0's file system; with
        ``train.data_parallel`` every rank trains (DistributedDataParallel) and holds the same weights."""
        self.data_size = dataset.data_size
        parallel = self.data_parallel and not self._is_finished("train")  # every rank trains
        if parallel and self.config.train.batch_size < self.ranks.world_size:
            raise ConfigError(f"train.data_parallel splits each minibatch of train.batch_size = "
                              f"{self.config.train.batch_size} over {self.ranks.world_size} processes; raise "
                              "train.batch_size to at least the number of processes")
        if self.ranks.is_main or parallel:
            decoder, encoder, training = self.train_stage(dataset)
        if self.ranks.is_distributed and not parallel:
            shared = broadcast((_cpu(decoder.state_dict()), _cpu(encoder.state_dict()), training)
                               if self.ranks.is_main else None, self.ranks)
            if not self.ranks.is_main:
                decoder, encoder = build_networks(self.config, dataset.data_size)
                decoder.load_state_dict(shared[0]), encoder.load_state_dict(shared[1])
                training = shared[2]
        return decoder.to(self.device).eval(), encoder.to(self.device).eval(), training

    # --- stages -------------------------------------------------------------------------------
    def train_stage(self, dataset: Dataset) -> tuple[Decoder, GaussianEncoder, dict]:
        path = self.dir / "checkpoint.pt"
        decoder, encoder = build_networks(self.config, dataset.data_size)
        if self.ranks.is_main and self.folder.is_finished("train"):
            checkpoint = load_checkpoint(path, self.config, dataset.data_size)
            load_weights(path, checkpoint, decoder, encoder)
            (self.dir / TRAIN_STATE).unlink(missing_ok=True)  # left if killed right after the record
            self.log(f"[train] skipped: finished ({path})")
        else:
            checkpoint = self._train(decoder, encoder, dataset)
            load_weights(path, checkpoint, decoder, encoder)
        info = {k: checkpoint[k] for k in ("best_epoch", "best_valid_elbo", "epochs_run")}
        info["stop_reason"] = checkpoint.get("stop_reason", "epochs")
        return decoder, encoder, info

    def _train(self, decoder: Decoder, encoder: GaussianEncoder, dataset: Dataset) -> dict:
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
        if resume is not None:
            self.log(f"[train] resuming after epoch {resume['epoch']} ({state_path})")
        t = self.config.train
        decoder.to(self.device), encoder.to(self.device)
        try:
            result = train(
                decoder, encoder, dataset.train.to(self.device), dataset.valid.to(self.device), epochs=t.epochs,
                batch_size=t.batch_size,
                learning_rate=t.learning_rate, adam_eps=t.adam_eps, warmup_epochs=t.warmup_epochs, schedule=t.schedule,
                binarization=self.config.data.binarization, threshold=self.config.data.threshold,
                valid_every=t.valid_every, valid_num_samples=t.valid_num_samples,
                early_stopping_patience=t.early_stopping_patience,
                generator=stage_generator(self.config.seed, "train", self.device), resume_from=resume,
                on_checkpoint=(lambda state: io.save_torch(state_path, {**state, "config_sha256": config_sha256}))
                if main else None,
                checkpoint_seconds=TRAIN_STATE_SECONDS, progress=self.progress,
                data_parallel=(self.ranks.rank, self.ranks.world_size) if self.data_parallel else None,
            )
        except ResumeError as error:
            raise RunError(f"{state_path} does not fit this run ({error}); delete it to start training "
                           "from scratch") from None
        except FloatingPointError as error:
            raise RunError(str(error)) from None
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "config": self.config.model_dump(mode="json"), "data_size": dataset.data_size,
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

    def _batches(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """This rank's datapoints in batches of ``eval.batch_size``: (index of the first, (b, D) on the device)."""
        size, mine = self.config.eval.batch_size, shard(x.shape[0], self.ranks)
        return [(start, x[start:min(start + size, mine.stop)].to(self.device))
                for start in range(mine.start, mine.stop, size)]

    def _streams(self, stage: str, offset: int, batch: torch.Tensor) -> DatapointStreams:
        return datapoint_streams(self.config.seed, stage, range(offset, offset + batch.shape[0]), self.device)

    def amortized_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        path = self.dir / "amortized.csv"
        if self._is_finished("amortized"):
            self.log(f"[amortized] skipped: finished ({path})")
            return io.read_csv(path) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("amortized")
        from tqdm.auto import tqdm
        e = self.config.eval
        start = time.perf_counter()
        frames = []
        for offset, batch in tqdm(self._batches(x), desc="L[q], IWAE", unit="batch", disable=not self.progress):
            with torch.no_grad():
                q = encoder(batch)
            pair = bounds_of(decoder, q, batch, num_samples=e.num_samples,
                             chunk_size=self._chunk_size(batch.shape[0], with_gradient=False),
                             generator=self._streams("amortized", offset, batch))
            frames.append(pd.DataFrame({**estimate_columns("elbo_q", pair.elbo),
                                        **estimate_columns("iwae_q", pair.iwae)}))
        frame = self._gather(frames)
        if self.ranks.is_main:
            io.write_csv(path, frame)
            self.folder.finish("amortized", time.perf_counter() - start)
        return frame

    def local_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        path = self.dir / "local.csv"
        if self._is_finished("local"):
            self.log(f"[local] skipped: finished ({path})")
            return io.read_csv(path) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("local")
        from tqdm.auto import tqdm
        e, r = self.config.eval, self.config.refine
        procedure = r.resolved()
        family = get_family(r.family)
        start = time.perf_counter()
        frames, params = [], []
        for offset, batch in self._batches(x):
            generator = self._streams("local", offset, batch)
            with tqdm(desc=f"refine q* [{offset}:{offset + batch.shape[0]}]", unit="step",
                      disable=not self.progress) as bar:
                def callback(step: int, num_active: int) -> None:
                    bar.update(1)
                    bar.set_postfix(active=num_active)
                result = local_posterior(decoder, encoder, batch, family=r.family, init=r.init,
                                         procedure=procedure, generator=generator, callback=callback)
            pair = bounds_of(decoder, family.posterior(result.params), batch, num_samples=e.num_samples,
                             chunk_size=self._chunk_size(batch.shape[0], with_gradient=False), generator=generator)
            frames.append(pd.DataFrame({
                **estimate_columns("elbo_q_star", pair.elbo), **estimate_columns("iwae_q_star", pair.iwae),
                "refine_steps": result.num_steps.cpu().numpy(), "refine_converged": result.is_converged.cpu().numpy(),
                "refine_diverged": result.is_diverged.cpu().numpy(),
            }))
            params.append(_cpu(result.params))
        frame = self._gather(frames)
        all_params = gather(params, self.ranks)
        if self.ranks.is_main:
            params = [p for part in all_params for p in part]
            io.save_torch(self.dir / "local.pt", {k: torch.cat([p[k] for p in params]) for k in params[0]})
            io.write_csv(path, frame)
            self.folder.finish("local", time.perf_counter() - start)
        return frame

    def ais_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
        """AIS from the configured start for every datapoint; None when ``ais.enabled`` is false."""
        a = self.config.ais
        if not a.enabled:
            return None
        path = self.dir / "ais.csv"
        if self._is_finished("ais"):
            self.log(f"[ais] skipped: finished ({path})")
            return io.read_csv(path) if self.ranks.is_main else None
        if self.ranks.is_main:
            self.folder.start("ais")
        from tqdm.auto import tqdm
        family = get_family(self.config.refine.family)
        q_star_params = None
        if a.init == "q_star":  # rank 0 reads local.pt and sends it: no shared file system needed
            q_star_params = broadcast(torch.load(self.dir / "local.pt", weights_only=True)
                                      if self.ranks.is_main else None, self.ranks)
        start = time.perf_counter()
        frames = []
        for offset, batch in self._batches(x):
            q_star = None
            if q_star_params is not None:
                q_star = family.posterior({k: v[offset:offset + batch.shape[0]].to(self.device)
                                           for k, v in q_star_params.items()})
            with tqdm(total=a.num_steps, desc=f"AIS [{offset}:{offset + batch.shape[0]}]", unit="step",
                      disable=not self.progress) as bar:
                estimate = ais_of(decoder, batch, init=a.init, encoder=encoder, q_star=q_star,
                                  procedure=a.procedure(),
                                  chunk_size=self._chunk_size(batch.shape[0], with_gradient=True),
                                  generator=self._streams("ais", offset, batch),
                                  callback=lambda t: bar.update(1))
            frames.append(pd.DataFrame({**estimate_columns("ais", estimate),
                                        **{k: v.cpu().numpy() for k, v in ais_diagnostics(estimate).items()}}))
        frame = self._gather(frames)
        if self.ranks.is_main:
            io.write_csv(path, frame)
            self.folder.finish("ais", time.perf_counter() - start)
        return frame

    @property
    def log_px_candidates(self) -> tuple[str, ...]:
        return LOG_PX_CANDIDATES + (("ais",) if self.config.ais.enabled else ())

    def report_stage(self, x: torch.Tensor, amortized: pd.DataFrame, local: pd.DataFrame,
                     ais: pd.DataFrame | None, dataset: Dataset, training: dict) -> dict:
        if self.folder.is_finished("report"):
            self.log(f"[report] skipped: finished ({self.dir / 'summary.json'})")
            return json.loads((self.dir / "summary.json").read_text())
        self.folder.start("report")
        frame = pd.concat([amortized, local] + ([ais] if ais is not None else []), axis=1)
        if "refine_diverged" not in frame:  # local.csv from before refinement flagged divergence
            frame["refine_diverged"] = False
        candidates = self.log_px_candidates
        frame = decompose(pd.concat([frame, best_bound(frame, candidates)], axis=1))
        frame["fault"] = find_faults(frame, ("elbo_q", "elbo_q_star", *candidates), flags=("refine_diverged",))
        frame.insert(0, "index", np.arange(len(frame)))
        io.write_csv(self.dir / "datapoints.csv", frame)
        summary = self.summary(frame, x, dataset, training)
        io.write_json(self.dir / "summary.json", summary)
        io.write_text(self.dir / "table.md", gap_table_markdown(summary))
        self.folder.finish("report", 0.0)
        faults = summary["faults"]
        if faults["num_faulty"]:
            self.log(f"[report] {faults['num_faulty']} of {faults['num_datapoints']} datapoints had numerical "
                     f"faults ({', '.join(f'{k}: {v}' for k, v in faults['counts'].items())}); they are left "
                     "out of the means and flagged in datapoints.csv, column fault")
        return summary

    def summary(self, frame: pd.DataFrame, x: torch.Tensor, dataset: Dataset, training: dict) -> dict:
        c = self.config
        summary = summarize(frame)
        usable = frame[frame["fault"] == NO_FAULT]
        summary["other_bounds"] = {name: summarize_column(usable[name], usable[f"{name}_stderr"])
                                   for name in self.log_px_candidates}
        summary["log_px_source_counts"] = {k: int(v) for k, v in usable["log_px_source"].value_counts().items()}
        summary["refinement"] = {
            "mean_steps": float(frame["refine_steps"].mean()),
            "max_steps_taken": int(frame["refine_steps"].max()),
            "converged_fraction": float(frame["refine_converged"].mean()),
            "diverged_count": int(frame["refine_diverged"].sum()),
        }
        if c.ais.enabled:
            summary["ais"] = {
                "mean_acceptance_rate": float(frame["ais_acceptance_rate"].mean()),
                "mean_step_size": float(frame["ais_step_size"].mean()),
                "mean_divergence_rate": float(frame["ais_divergence_rate"].mean()),
                "mean_ess": float(frame["ais_ess"].mean()),
                "min_ess": float(frame["ais_ess"].min()),
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
            "evaluation_data_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
            "num_samples": {"elbo": c.eval.num_samples, "iwae_k": c.eval.num_samples,
                            "elbo_and_iwae_share_samples": True},
            "chunk_size": c.eval.chunk_size,
            "random_streams": RANDOM_STREAMS,
            "device": self.device.type,
            "log_px": "per-datapoint max of " + ", ".join(self.log_px_candidates),
            "refinement": {"family": c.refine.family, "init": c.refine.init,
                           "preset": c.refine.procedure, **c.refine.resolved()._asdict()},
            "ais": c.ais.model_dump(mode="json"),
            "model": c.model.model_dump(mode="json"),
            "train": c.train.model_dump(mode="json"),
        }
        summary["training"] = training
        summary["data"] = dataset.provenance
        summary["versions"] = versions()
        return summary

    def execute(self) -> dict:
        """Run every stage that has not finished yet; returns the summary."""
        dataset = load_dataset(self.config.data.dataset, data_dir=self.config.data.data_dir,
                               download=self.config.data.download)
        for split in ("train", "valid"):  # checked before anything is written
            check_values(dataset.split(split), f"{dataset.name} {split} split")
        x = evaluation_data(self.config, dataset)
        resolved = self.config.model_dump(mode="json")
        joined = self.ranks.is_distributed and not torch.distributed.is_initialized()
        init_ranks(self.ranks, self.device)
        is_done = False
        try:
            with ExitStack() as stack:
                self._open_folder(stack, resolved)
                try:
                    with torch.random.fork_rng(devices=[]):
                        decoder, encoder, training = self.networks(dataset)
                        amortized = self.amortized_stage(decoder, encoder, x)
                        local = self.local_stage(decoder, encoder, x)
                        ais = self.ais_stage(decoder, encoder, x)
                        summary = self.report_stage(x, amortized, local, ais, dataset, training) \
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


def comparable_config(previous: dict, current: dict) -> dict:
    """A config recorded by an older version, in this version's form: keys it lacks take their
    defaults, and a section it lacks (one added since, such as ``[ais]``) takes the current value,
    since nothing in that folder depends on it, so the folder resumes and only the new stage runs.
    A config that does not validate is returned as it is (and then differs)."""
    from .config import parse_config

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
                   device: torch.device | str = "cpu", ranks: Ranks = ONE_PROCESS) -> dict | None:
    """Run (or resume) an experiment into ``out_dir``; returns the summary dict (None on ranks other
    than 0 of a distributed job: see ``gapbench.distributed``)."""
    return Run(config, out_dir, force=force, progress=progress, log=log, device=device, ranks=ranks).execute()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def open_run_config(run_dir: str | Path) -> ExperimentConfig:
    """A trained run's config; keys this version does not know are ignored with a warning, and
    sections it lacks take their defaults, so folders written by other versions load."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise RunError(f"{run_dir} is not a trained gapbench run (no config.json and checkpoint.pt); "
                       "train one with `gapbench run EXPERIMENT.toml --out DIR` first")
    return load_config(run_dir / "config.json", ignore_unknown=True)


def open_run(run_dir: str | Path, *, num_datapoints: int | None = None
             ) -> tuple[ExperimentConfig, Decoder, GaussianEncoder, torch.Tensor]:
    """A trained run's config, networks (eval mode) and evaluation datapoints (N, D).

    ``num_datapoints`` replaces the run's ``eval.num_datapoints`` (same split, same binarisation).
    """
    run_dir = Path(run_dir)
    config = open_run_config(run_dir)
    dataset = load_dataset(config.data.dataset, data_dir=config.data.data_dir, download=config.data.download)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt", config, dataset.data_size)
    decoder, encoder = build_networks(config, dataset.data_size)
    load_weights(run_dir / "checkpoint.pt", checkpoint, decoder, encoder)
    if num_datapoints is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"num_datapoints": num_datapoints})})
    return config, decoder, encoder, evaluation_data(config, dataset)
