"""The train stage: the trained networks on every rank, trained (or loaded) by rank 0, or by every rank
with ``train.data_parallel``; an external model skips it.

Training saves train_state.pt at the end of an epoch (at most every ``TRAIN_STATE_SECONDS``) and
continues from it when the stage is rerun with the same config; the file goes once the stage is
recorded, so a process killed at any moment resumes training where it stopped.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Callable

import pandas as pd
import torch

from gapbench import io
from gapbench.data import Dataset
from gapbench.deadline import StopRequested
from gapbench.models import Decoder
from gapbench.runner.build import networks_for, stage_generator
from gapbench.runner.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, load_weights, \
    load_train_state
from gapbench.runner.config import ConfigError
from gapbench.runner.distributed import broadcast
from gapbench.runner.rundir import TRAIN_STATE, RunError
from gapbench.runner.stages import cpu_tensors
from gapbench.train import ResumeError, train

if TYPE_CHECKING:
    from gapbench.runner.run import Run

# Training saves train_state.pt at most this often: a save costs 20 ms (digits) to 100 ms (the
# paper's Fashion-MNIST model), so this keeps it under 1% of training time; a kill loses at most this.
TRAIN_STATE_SECONDS = 10.0
SNAPSHOTS = "snapshots"  # train.snapshot_every: weights every N epochs, for `gapbench track`


def networks(run: Run, dataset: Dataset) -> tuple[Decoder, torch.nn.Module, dict]:
    """The trained networks on the run's device, on every rank: rank 0 trains (or loads) them and sends
    the weights to the others, so no rank needs rank 0's file system; with ``train.data_parallel`` every
    rank trains (DistributedDataParallel) and holds the same weights."""
    if run.external is not None:
        return external(run, dataset)
    parallel = run.data_parallel and not run.is_finished("train")  # every rank trains
    if parallel and run.config.train.batch_size < run.ranks.world_size:
        raise ConfigError(f"train.data_parallel splits each minibatch of train.batch_size = "
                          f"{run.config.train.batch_size} over {run.ranks.world_size} processes; raise "
                          "train.batch_size to at least the number of processes")
    decoder = encoder = training = None
    if run.ranks.is_main or parallel:
        try:
            decoder, encoder, training = trained(run, dataset)
        except StopRequested as stop:
            if run.ranks.is_distributed and not parallel:  # the other ranks wait for the weights
                broadcast(stop, run.ranks)
            raise
    if run.ranks.is_distributed and not parallel:
        decoder, encoder, training = shared_networks(run, dataset, decoder, encoder, training)
    return decoder.to(run.device).eval(), encoder.to(run.device).eval(), training


def shared_networks(run: Run, dataset: Dataset, decoder, encoder, training) -> tuple[Decoder, torch.nn.Module, dict]:
    """Rank 0's networks and training record, sent to every rank (a stop on rank 0 stops them all)."""
    shared = run.from_main(lambda: (cpu_tensors(decoder.state_dict()), cpu_tensors(encoder.state_dict()), training))
    if isinstance(shared, StopRequested):
        raise shared
    if not run.ranks.is_main:
        decoder, encoder = networks_for(run.config, dataset)
        decoder.load_state_dict(shared[0]), encoder.load_state_dict(shared[1])
        training = shared[2]
    return decoder, encoder, training


def external(run: Run, dataset: Dataset) -> tuple[object, object, dict]:
    """The train stage of an external model: nothing is trained; checkpoint.pt records the factory,
    the checkpoint's sha256, versions and the weights of the networks that are nn.Modules, and
    train_history.csv has no rows. Every rank built the networks itself (``run.external``)."""
    model = run.external
    training = {"best_epoch": None, "best_valid_elbo": None, "epochs_run": 0, "stop_reason": "external model",
                "external": model.record}
    if run.ranks.is_main and not run.folder.is_finished("train"):
        run.folder.start("train")

        def weights(part) -> dict:
            return cpu_tensors(part.state_dict()) if isinstance(part, torch.nn.Module) else {}
        io.save_torch(run.dir / "checkpoint.pt", {
            **checkpoint_header(run, dataset), "decoder": weights(model.model), "encoder": weights(model.encoder),
            **training})
        io.write_csv(run.dir / "train_history.csv", pd.DataFrame(columns=["epoch"]))
        run.folder.finish("train", 0.0)
        run.log(f"[train] skipped: external model {model.record['factory']}"
                f"{'' if model.record['checkpoint'] is None else ' from ' + model.record['checkpoint']}")
    return model.model, model.encoder, training


def checkpoint_header(run: Run, dataset: Dataset) -> dict:
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "config": run.config.model_dump(mode="json"), "data_size": dataset.data_size,
            "posterior": run.config.model.posterior}


def trained(run: Run, dataset: Dataset) -> tuple[Decoder, torch.nn.Module, dict]:
    """The networks with the checkpoint's weights: loaded when the stage finished, else trained."""
    path = run.dir / "checkpoint.pt"
    decoder, encoder = networks_for(run.config, dataset)
    if run.ranks.is_main and run.folder.is_finished("train"):
        checkpoint = load_checkpoint(path, run.config, dataset.data_size)
        load_weights(path, checkpoint, decoder, encoder)
        run.folder.refuse_changed_checkpoint()
        (run.dir / TRAIN_STATE).unlink(missing_ok=True)  # left if killed right after the record
        run.log(f"[train] skipped: finished ({path})")
    else:
        checkpoint = train_stage(run, decoder, encoder, dataset)
        load_weights(path, checkpoint, decoder, encoder)
    info = {k: checkpoint[k] for k in ("best_epoch", "best_valid_elbo", "epochs_run")}
    info["stop_reason"] = checkpoint.get("stop_reason", "epochs")
    return decoder, encoder, info


def resume_point(run: Run) -> tuple[dict | None, str | None]:
    """train_state.pt when it belongs to this config (rank 0's, on every rank with data_parallel), and the
    config hash it is saved with."""
    state_path, main = run.dir / TRAIN_STATE, run.ranks.is_main
    config_sha256 = run.folder.stage_hash("train") if main else None
    resume = load_train_state(state_path, config_sha256) if main and state_path.exists() else None
    if run.data_parallel:
        resume = broadcast(resume, run.ranks)
    if main and resume is None and state_path.exists():
        run.log(f"[train] {state_path} is from another config; starting from scratch")
    return resume, config_sha256


def train_stage(run: Run, decoder: Decoder, encoder: torch.nn.Module, dataset: Dataset) -> dict:
    """Train (continuing from train_state.pt where it fits), write the checkpoint, record the stage."""
    state_path, main = run.dir / TRAIN_STATE, run.ranks.is_main  # with data_parallel every rank trains
    resume, config_sha256 = resume_point(run)
    if main:
        run.folder.start("train")
    run.use_threads("train")
    if resume is not None:
        run.log(f"[train] resuming after epoch {resume['epoch']} ({state_path})")
    decoder.to(run.device), encoder.to(run.device)
    if main and resume is None:
        shutil.rmtree(run.dir / SNAPSHOTS, ignore_errors=True)  # from an earlier training
    run.deadline.begin()
    save_state = (lambda state: io.save_torch(state_path, {**state, "config_sha256": config_sha256})) if main else None
    try:
        result = fit(run, decoder, encoder, dataset, resume, save_state)
    except ResumeError as error:
        raise RunError(f"{state_path} does not fit this run ({error}); delete it to start training "
                       "from scratch") from None
    except FloatingPointError as error:
        raise RunError(str(error)) from None
    checkpoint = {**checkpoint_header(run, dataset),
                  "decoder": cpu_tensors(result.decoder_state), "encoder": cpu_tensors(result.encoder_state),
                  "best_epoch": result.best_epoch, "best_valid_elbo": result.best_valid_elbo,
                  "epochs_run": len(result.history), "stop_reason": result.stop_reason}
    if main:
        record_training(run, result, checkpoint)
    return checkpoint


def fit(run: Run, decoder, encoder, dataset: Dataset, resume: dict | None, save_state: Callable | None):
    """``gapbench.train.train`` with the run's settings."""
    settings, main = run.config.train, run.ranks.is_main
    return train(
        decoder, encoder, dataset.train.to(run.device), dataset.valid.to(run.device), epochs=settings.epochs,
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, adam_eps=settings.adam_eps,
        warmup_epochs=settings.warmup_epochs, schedule=settings.schedule,
        binarization=run.config.data.binarization, threshold=run.config.data.threshold,
        valid_every=settings.valid_every, valid_num_samples=settings.valid_num_samples,
        early_stopping_patience=settings.early_stopping_patience, semi_amortized=settings.semi_amortized(),
        on_epoch=snapshot(run, decoder, encoder) if settings.snapshot_every and main else None,
        generator=stage_generator(run.config.seed, "train", device=run.device), resume_from=resume,
        on_checkpoint=save_state, checkpoint_seconds=TRAIN_STATE_SECONDS, progress=run.progress,
        data_parallel=(run.ranks.rank, run.ranks.world_size) if run.data_parallel else None,
        should_stop=run.should_stop_training,
    )


def record_training(run: Run, result, checkpoint: dict) -> None:
    """Rank 0: write train_history.csv and checkpoint.pt, record the stage, then remove train_state.pt."""
    io.write_csv(run.dir / "train_history.csv", pd.DataFrame([r._asdict() for r in result.history]))
    io.save_torch(run.dir / "checkpoint.pt", checkpoint)
    run.folder.finish("train", sum(r.seconds for r in result.history))
    (run.dir / TRAIN_STATE).unlink(missing_ok=True)  # after the record: until then it is the way back in
    stopped = {"epochs": "", "early_stopping": " (stopped early)",
               "diverged": f" (stopped: the training ELBO diverged at epoch {len(result.history)})"}
    run.log(f"[train] best validation ELBO {result.best_valid_elbo:.3f} at epoch {result.best_epoch}"
            f"{stopped[result.stop_reason]}")


def snapshot(run: Run, decoder, encoder) -> Callable:
    """An on_epoch callback saving the weights every ``train.snapshot_every`` epochs (and the
    last) to snapshots/epoch_NNNNN.pt, for `gapbench track`."""
    every = run.config.train.snapshot_every

    def save(record, is_best: bool) -> None:
        if record.epoch % every == 0 or record.epoch == run.config.train.epochs:
            io.save_torch(run.dir / SNAPSHOTS / f"epoch_{record.epoch:05d}.pt",
                          {"epoch": record.epoch, "decoder": cpu_tensors(decoder.state_dict()),
                           "encoder": cpu_tensors(encoder.state_dict())})
    return save
