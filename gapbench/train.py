"""Training a VAE (decoder + amortized encoder) by maximising the ELBO with Adam.

Linear KL warm-up (Bowman et al., 2016; Sonderby et al., 2016): the weight beta on
log p(z) - log q(z|x) rises linearly from 0 to 1 over the first ``warmup_epochs`` epochs.
Optional learning-rate schedule of Burda et al. (2016), used by Cremer et al. (2018): in stage
i = 0, 1, 2, ... the rate is lr * 10^(-i/7), and stage i lasts 3^i epochs.
Optional semi-amortized training (Kim et al., 2018): the encoder's output refined by K SVI steps
inside every training step (``gapbench.inference.semi_amortized``).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from gapbench.data import binarize, check_values
from gapbench.deadline import StopRequested
from gapbench.errors import GapbenchError
from gapbench.estimators import elbo
from gapbench.posteriors import as_posterior, fork_seed
from gapbench.inference.semi_amortized import SemiAmortized, semi_amortized_gradients

SCHEDULES = ("constant", "paper")
# Implementations of the same Adam update (torch.optim.Adam's foreach / fused flags): "fused" updates every
# tensor in one kernel, "foreach" in a few multi-tensor ops, "for-loop" one tensor at a time (torch's default
# on the CPU). They differ only in rounding; the optimiser state (state_dict) is the same, so a training
# state saved under one continues under another. `gapbench bench train` times them.
ADAM_IMPLEMENTATIONS = {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": None, "foreach": True},
                        "for-loop": {"fused": None, "foreach": False}}


def paper_learning_rate(epoch: int, base: float) -> float:
    """Burda et al. (2016): lr * 10^(-i/7) during stage i, which spans epochs [3^i - 1)/2, (3^(i+1) - 1)/2)."""
    stage, start = 0, 0
    while epoch >= start + 3**stage:
        start += 3**stage
        stage += 1
    return base * 10 ** (-stage / 7)


def warmup_weight(step: int, warmup_steps: int) -> float:
    """beta = min(1, step / warmup_steps); 1 when there is no warm-up."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class EpochRecord(NamedTuple):
    epoch: int  # 1-based
    train_elbo: float  # mean single-sample warm-up-free ELBO over the epoch's batches
    valid_elbo: float  # mean ELBO on the validation set (NaN where not evaluated)
    learning_rate: float
    beta: float  # warm-up weight at the end of the epoch
    seconds: float


STOP_REASONS = ("epochs", "early_stopping", "diverged")
TRAIN_STATE_FORMAT = "gapbench-train-state"


class TrainResult(NamedTuple):
    best_epoch: int
    best_valid_elbo: float
    decoder_state: dict  # state_dict of the best decoder
    encoder_state: dict
    history: list[EpochRecord]
    stop_reason: str  # "epochs" (all run), "early_stopping" or "diverged" (a non-finite training ELBO)


def negative_elbo(decoder, encoder, x: torch.Tensor, *, beta: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm-up loss -(log p(x|z) + beta (log p(z) - log q(z|x))), one sample, mean over the batch,
    and the plain ELBO per datapoint (B,) for logging."""
    q = as_posterior(encoder(x))
    z, log_q = q.rsample_and_log_prob(1, generator=generator)  # (1, B, Z), (1, B)
    log_lik = decoder.log_likelihood(x, z)  # (1, B)
    kl_term = decoder.log_prior(z) - log_q  # (1, B)
    loss = -(log_lik + beta * kl_term).mean()
    return loss, (log_lik + kl_term)[0].detach()


class WarmupLoss(nn.Module):
    """:func:`negative_elbo` as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module):
        super().__init__()
        self.decoder, self.encoder = decoder, encoder

    def forward(self, x: torch.Tensor, beta: float, generator: torch.Generator | None):
        return negative_elbo(self.decoder, self.encoder, x, beta=beta, generator=generator)


@torch.no_grad()
def validation_elbo(decoder, encoder, x: torch.Tensor, *, num_samples: int, batch_size: int,
                    seed: int) -> float:
    """Mean ELBO over x (N, D), the same random numbers at every call (common random numbers)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size]
        total += float(elbo(decoder, encoder(batch), batch, num_samples=num_samples,
                            generator=generator).value.sum())
    return total / x.shape[0]


def make_adam(params: list[nn.Parameter], *, learning_rate: float, eps: float,
              implementation: str = "fused") -> torch.optim.Adam:
    """torch.optim.Adam (Kingma & Ba, 2015) with the given implementation (:data:`ADAM_IMPLEMENTATIONS`)."""
    if implementation not in ADAM_IMPLEMENTATIONS:
        raise ValueError(f"unknown Adam implementation {implementation!r}; choose one of {tuple(ADAM_IMPLEMENTATIONS)}")
    return torch.optim.Adam(params, lr=learning_rate, eps=eps, **ADAM_IMPLEMENTATIONS[implementation])


class ResumeError(GapbenchError, ValueError):
    """A ``resume_from`` snapshot that does not fit the networks or optimiser it is loaded into."""


class _Progress(NamedTuple):
    """Everything besides weights, optimiser and generator that the loop carries between epochs."""

    epoch: int  # epochs finished
    step: int  # optimiser steps taken (drives the warm-up)
    best_elbo: float
    best_epoch: int
    bad_checks: int  # validation checks since the last improvement
    best_state: tuple[dict, dict] | None  # (decoder, encoder) state_dicts of the best epoch
    history: list[EpochRecord]
    stop_reason: str | None  # None while training goes on


def train_state(decoder: nn.Module, encoder: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, progress: _Progress) -> dict:
    """A snapshot from which :func:`train` continues exactly: weights, Adam moments, the random
    stream, the best weights so far and the history. Plain tensors, numbers and lists, so it saves
    and loads with ``torch.load(weights_only=True)``; copied, so later steps do not change it."""
    best = progress.best_state
    return copy.deepcopy({
        "format": TRAIN_STATE_FORMAT,
        "epoch": progress.epoch, "step": progress.step,
        "decoder": decoder.state_dict(), "encoder": encoder.state_dict(),
        "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
        "best_elbo": progress.best_elbo, "best_epoch": progress.best_epoch, "bad_checks": progress.bad_checks,
        "best_decoder": best[0] if best else None, "best_encoder": best[1] if best else None,
        "history": [list(r) for r in progress.history],
        "stop_reason": progress.stop_reason,
    })


def _restore(state: dict, decoder: nn.Module, encoder: nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator) -> _Progress:
    """Load a :func:`train_state` snapshot into the networks, optimiser and generator."""
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ResumeError("not a gapbench training state")
    try:
        decoder.load_state_dict(state["decoder"])
        encoder.load_state_dict(state["encoder"])
        flags = {k: optimizer.param_groups[0][k] for k in ("fused", "foreach")}
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a saved state carries the flags of the Adam that saved it
            group.update(flags)
        generator.set_state(state["generator"])
        best = (state["best_decoder"], state["best_encoder"]) if state["best_decoder"] is not None else None
        return _Progress(int(state["epoch"]), int(state["step"]), float(state["best_elbo"]),
                         int(state["best_epoch"]), int(state["bad_checks"]), best,
                         [EpochRecord(*r) for r in state["history"]], state["stop_reason"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        message = str(error).strip().splitlines()
        raise ResumeError(f"{type(error).__name__}: {message[-1].strip() if message else ''}") from None


class _Loop(NamedTuple):
    """What every epoch of one training uses, fixed from the first epoch to the last."""

    decoder: nn.Module
    encoder: nn.Module
    loss_fn: nn.Module  # WarmupLoss, wrapped in DistributedDataParallel when data-parallel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    train_x: torch.Tensor  # grey levels; binarised anew every epoch when static_train is None
    static_train: torch.Tensor | None
    batch_size: int
    num_batches: int
    warmup_steps: int
    semi_amortized: SemiAmortized
    data_parallel: tuple[int, int] | None


def check_arguments(*, schedule: str, checkpoint_seconds: float, data_parallel: tuple[int, int] | None,
                    semi_amortized: SemiAmortized, train_x: torch.Tensor, valid_x: torch.Tensor) -> None:
    """Refuse settings :func:`train` cannot run (ValueError naming the setting)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}")
    if not checkpoint_seconds >= 0:
        raise ValueError(f"checkpoint_seconds must be at least 0, got {checkpoint_seconds}")
    if data_parallel is not None and semi_amortized.num_steps:
        raise ValueError("semi-amortized training (semi_amortized.num_steps > 0) does not run data-parallel: "
                         "train it in one process (train.data_parallel = false)")
    check_values(train_x, "training data")
    check_values(valid_x, "validation data")


def train_epoch(loop: _Loop, step: int) -> tuple[float, int, float, int]:
    """One pass over the (re-binarised, shuffled) training data: (sum of the batches' ELBOs over every
    rank, optimiser steps taken so far, the warm-up weight of the last step, rows in the epoch)."""
    generator = loop.generator
    data = loop.static_train if loop.static_train is not None else binarize(
        loop.train_x, mode="dynamic", generator=generator)
    order = torch.randperm(data.shape[0], generator=generator, device=data.device)
    noise = generator
    if loop.data_parallel is not None:  # the shared stream stays in step on every rank
        rank, world_size = loop.data_parallel
        noise = torch.Generator(device=data.device).manual_seed(fork_seed(generator) + rank)
    loop.decoder.train(), loop.encoder.train()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    beta = warmup_weight(step, loop.warmup_steps)
    for batch_index in range(loop.num_batches):
        batch = data[order[batch_index * loop.batch_size:(batch_index + 1) * loop.batch_size]]
        if loop.data_parallel is not None:
            batch = batch[rank::world_size]  # this rank's share of the minibatch
        step += 1
        beta = warmup_weight(step, loop.warmup_steps)
        total += _training_step(loop, batch, beta, noise)  # on the device: no wait for it at every step
    loop.decoder.eval(), loop.encoder.eval()
    return _sum_over_ranks(float(total), loop.data_parallel, data.device), step, beta, data.shape[0]


def _training_step(loop: _Loop, batch: torch.Tensor, beta: float, noise: torch.Generator) -> torch.Tensor:
    """One Adam step on one minibatch; the sum of its ELBOs (the refined posterior's when semi-amortized)."""
    if loop.semi_amortized.num_steps == 0:
        loss, batch_elbo = loop.loss_fn(batch, beta, noise)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:
        batch_elbo = semi_amortized_gradients(loop.decoder, loop.encoder, batch, settings=loop.semi_amortized,
                                              beta=beta, generator=noise)
    loop.optimizer.step()
    return batch_elbo.sum()


def _sum_over_ranks(total: float, data_parallel: tuple[int, int] | None, device: torch.device) -> float:
    """The epoch's ELBO sum over every rank's rows (the value itself in one process)."""
    if data_parallel is None:
        return total
    import torch.distributed as dist
    summed = torch.tensor([total], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return float(summed.item())


def _after_epoch(loop: _Loop, state: _Progress, *, epoch: int, total: float, valid_x: torch.Tensor,
                 valid_every: int, valid_num_samples: int, epochs: int,
                 early_stopping_patience: int) -> tuple[_Progress, float, bool]:
    """Validation, best weights and the stopping rule after an epoch whose ELBO sum was ``total``:
    (the progress with this epoch's outcome but not yet its record, the validation ELBO or NaN, whether
    this epoch is the best so far)."""
    best_elbo, best_epoch, bad_checks, best_state = state.best_elbo, state.best_epoch, state.bad_checks, \
        state.best_state
    valid, is_best, stop_reason = math.nan, False, None
    if not math.isfinite(total):
        stop_reason = "diverged"  # the weights are no longer finite: nothing more to learn
    elif epoch % valid_every == 0 or epoch == epochs:
        valid = validation_elbo(loop.decoder, loop.encoder, valid_x, num_samples=valid_num_samples,
                                batch_size=1000, seed=0)
        if valid > best_elbo:
            best_elbo, best_epoch, bad_checks, is_best = valid, epoch, 0, True
            best_state = (copy.deepcopy(loop.decoder.state_dict()), copy.deepcopy(loop.encoder.state_dict()))
        else:
            bad_checks += 1
    if stop_reason is None and early_stopping_patience and bad_checks >= early_stopping_patience:
        stop_reason = "early_stopping"
    if stop_reason is None and epoch == epochs:
        stop_reason = "epochs"
    return state._replace(epoch=epoch, best_elbo=best_elbo, best_epoch=best_epoch, bad_checks=bad_checks,
                          best_state=best_state, stop_reason=stop_reason), valid, is_best


def _make_loop(decoder: nn.Module, encoder: nn.Module, train_x: torch.Tensor, *, generator: torch.Generator,
               batch_size: int, learning_rate: float, adam_eps: float, adam: str, warmup_epochs: float,
               binarization: str, threshold: float, semi_amortized: SemiAmortized,
               data_parallel: tuple[int, int] | None) -> _Loop:
    """The optimiser, loss and fixed data of a training."""
    params = list(decoder.parameters()) + list(encoder.parameters())
    optimizer = make_adam(params, learning_rate=learning_rate, eps=adam_eps, implementation=adam)
    static_train = None if binarization == "dynamic" else binarize(train_x, mode=binarization, threshold=threshold)
    num_batches = math.ceil(train_x.shape[0] / batch_size)
    loss_fn: nn.Module = WarmupLoss(decoder, encoder)
    if data_parallel is not None:
        from torch.nn.parallel import DistributedDataParallel
        loss_fn = DistributedDataParallel(loss_fn)
    return _Loop(decoder, encoder, loss_fn, optimizer, generator, train_x, static_train, batch_size, num_batches,
                 round(warmup_epochs * num_batches), semi_amortized, data_parallel)


def train(decoder: nn.Module, encoder: nn.Module, train_x: torch.Tensor, valid_x: torch.Tensor, *,
          epochs: int, batch_size: int, learning_rate: float, adam_eps: float, warmup_epochs: float, schedule: str,
          binarization: str, threshold: float, valid_every: int, valid_num_samples: int,
          early_stopping_patience: int, generator: torch.Generator,
          semi_amortized: SemiAmortized = SemiAmortized(),
          on_epoch: Callable[[EpochRecord, bool], None] | None = None,
          resume_from: dict | None = None, on_checkpoint: Callable[[dict], None] | None = None,
          checkpoint_seconds: float = 0.0, progress: bool = True,
          data_parallel: tuple[int, int] | None = None,
          should_stop: Callable[[], bool] | None = None, adam: str = "fused") -> TrainResult:
    """Train ``decoder`` and ``encoder`` in place; return the best (validation-ELBO) weights.

    Parameters
    ----------
    train_x, valid_x : (N, D) grey levels in [0, 1]; binarised here ("dynamic": resampled every
        epoch for training, once for validation; "static": thresholded once; "none": used as they
        are, for a likelihood of grey levels)
    epochs : maximum number of epochs
    learning_rate, adam_eps : Adam's step size (initial, under the paper schedule) and epsilon
    warmup_epochs : epochs over which beta rises linearly from 0 to 1 (0: no warm-up)
    schedule : "constant" or "paper" (Burda et al., 2016)
    valid_every : evaluate the validation ELBO every this many epochs (and at the last epoch)
    early_stopping_patience : stop after this many validation checks without improvement (0: never)
    generator : every random draw (shuffling, binarisation, z samples) comes from it; pass a fresh
        generator seeded as for the first call also when resuming
    semi_amortized : with ``num_steps`` K > 0, every training step refines the encoder's output by K
        SVI steps and trains on the refined ELBO (Kim et al., 2018; ``gapbench.inference.semi_amortized``); the
        epoch's train ELBO is then the refined posterior's. K = 0: the plain VAE
    on_epoch : called with each EpochRecord and whether it is the best so far
    resume_from : a snapshot passed to ``on_checkpoint`` by an earlier call with the same arguments;
        training continues after its epoch and ends exactly as an uninterrupted call would
    on_checkpoint : called with a snapshot (see :func:`train_state`) at the end of an epoch when
        ``checkpoint_seconds`` have passed since the last one (0: every epoch), and when training
        stops; e.g. to save it atomically for resuming. Which epochs get a snapshot depends on the
        clock, the result of a resumed training does not.
    progress : show a tqdm bar with the current ELBO
    data_parallel : (rank, world_size) of an initialised torch.distributed group whose every rank calls
        ``train`` with the same arguments: each minibatch is split over the ranks (rows rank, rank +
        world_size, ...) and DistributedDataParallel averages the gradients, so every rank takes the
        same Adam steps. Shuffling and binarisation come from ``generator`` on every rank alike; the z
        samples of a rank from a stream forked from it per epoch and rank. None: one process. Not with
        semi-amortized training (ValueError).
    should_stop : asked after every epoch that does not end training (a time limit, SIGTERM; with
        ``data_parallel`` it must give every rank the same answer): when it says yes, the snapshot goes
        to ``on_checkpoint`` at once and :class:`~gapbench.deadline.StopRequested` is raised, so a call
        with ``resume_from`` that snapshot continues exactly.
    adam : the implementation of Adam's update (:data:`ADAM_IMPLEMENTATIONS`; same update, other rounding)

    Training stops early when an epoch's training ELBO is not finite (``stop_reason="diverged"``);
    the best weights from before are returned. It raises FloatingPointError when no validation ELBO
    was ever finite.
    """
    check_arguments(schedule=schedule, checkpoint_seconds=checkpoint_seconds, data_parallel=data_parallel,
                    semi_amortized=semi_amortized, train_x=train_x, valid_x=valid_x)
    loop = _make_loop(decoder, encoder, train_x, generator=generator, batch_size=batch_size,
                      learning_rate=learning_rate, adam_eps=adam_eps, adam=adam, warmup_epochs=warmup_epochs,
                      binarization=binarization, threshold=threshold, semi_amortized=semi_amortized,
                      data_parallel=data_parallel)
    # The validation set is binarised before a resumed state is restored, exactly as the first call did it.
    valid_bin = binarize(valid_x, mode=binarization, threshold=threshold, generator=generator)
    state = _Progress(0, 0, -math.inf, 0, 0, None, [], None)
    if resume_from is not None:
        state = _restore(resume_from, decoder, encoder, loop.optimizer, generator)
    last_checkpoint = time.perf_counter()
    bar = tqdm(range(state.epoch + 1, epochs + 1), desc="train", unit="epoch", initial=state.epoch,
               total=epochs, disable=not progress or state.stop_reason is not None)
    for epoch in bar:
        if state.stop_reason is not None:
            break
        start_time = time.perf_counter()
        lr = paper_learning_rate(epoch - 1, learning_rate) if schedule == "paper" else learning_rate
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        total, step, beta, num_rows = train_epoch(loop, state.step)
        state, valid, is_best = _after_epoch(loop, state, epoch=epoch, total=total, valid_x=valid_bin,
                                             valid_every=valid_every, valid_num_samples=valid_num_samples,
                                             epochs=epochs, early_stopping_patience=early_stopping_patience)
        record = EpochRecord(epoch, total / num_rows, valid, lr, beta, time.perf_counter() - start_time)
        state = state._replace(step=step, history=[*state.history, record])
        bar.set_postfix(elbo=f"{record.train_elbo:.2f}", valid=f"{state.best_elbo:.2f}", beta=f"{beta:.2f}")
        if on_epoch is not None:
            on_epoch(record, is_best)
        is_stopping = state.stop_reason is None and should_stop is not None and should_stop()
        if on_checkpoint is not None and (state.stop_reason is not None or is_stopping
                                          or time.perf_counter() - last_checkpoint >= checkpoint_seconds):
            on_checkpoint(train_state(decoder, encoder, loop.optimizer, generator, state))
            last_checkpoint = time.perf_counter()
        if is_stopping:
            bar.close()
            raise StopRequested(f"[train] {epoch} of {epochs} epochs done, {epochs - epoch} remain")
    bar.close()
    return _result(state)


def _result(state: _Progress) -> TrainResult:
    """The best weights and the history of a finished training."""
    if state.best_state is None:  # every validation ELBO was NaN
        raise FloatingPointError("training diverged: the validation ELBO was never finite; "
                                 "lower train.learning_rate or check the data")
    return TrainResult(state.best_epoch, state.best_elbo, state.best_state[0], state.best_state[1], state.history,
                       state.stop_reason or "epochs")
