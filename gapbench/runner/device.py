"""Which device a run uses (``--device cpu|cuda|auto``), how many rows fit in its memory, and how many
torch threads each stage takes on a CPU.

On a GPU the estimators' chunks are sized from the free memory (``torch.cuda.mem_get_info``) rather
than from the CPU's cache: IWAE evaluates ``chunk_size`` samples of every datapoint of a batch at once,
AIS ``chunk_size`` chains, so one chunk is (chunk_size x B) rows of decoder activations.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from gapbench.runner.config import ConfigError, ExperimentConfig

DEVICES = ("cpu", "cuda", "auto")
MEMORY_FRACTION = 0.25  # of the free GPU memory one chunk of activations may take (autograd, copies, allocator slack)
BYTES_PER_VALUE = 4  # float32
# A CPU stage takes one more torch thread per this many FLOPs of one step (one minibatch of training,
# one chunk of IWAE rows, one refinement or AIS step). Threads of one process wait for each other
# after every operation, so when another process holds a core each small operation waits a whole
# time slice: `gapbench bench threads` measured a decoder step of 0.06 to 4 GFLOP on this project's
# shared 2-core machine at 0.04 to 0.8x the speed of one thread with 2 threads (README, Benchmarks),
# with and without two busy processes beside it; only at 16 GFLOP did 2 threads once gain (1.2x).
# Below this one thread is both faster and safe; above it more threads can pay.
FLOP_PER_THREAD = 16e9
ROWS_PER_CHUNK = 4096  # the estimators' (sample x datapoint) rows per chunk on a CPU (log_weights)


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when PyTorch finds a GPU, else CPU) as a torch device.

    Under torchrun each process of a node takes the GPU of its LOCAL_RANK (``local_rank``).
    """
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device {name}: unknown device; choose cpu, cuda (or cuda:N) or auto")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"--device {name}: PyTorch finds no CUDA GPU (torch {torch.__version__}, {build}); "
                          "run with --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    count = torch.cuda.device_count()
    number = int(index) if index else local_rank % count
    if number >= count:
        raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return torch.device("cuda", number)


def row_bytes(data_size: int, latent_size: int, hidden: list[int], *, with_gradient: bool) -> int:
    """Bytes of activations per (sample, datapoint) row of the decoder: z, its noise and log-densities,
    the hidden layers (value and pre-activation), the logits and the elementwise log-likelihood; twice
    that when autograd keeps them for a gradient (AIS)."""
    values = 4 * latent_size + 2 * sum(hidden) + 3 * data_size
    return BYTES_PER_VALUE * values * (2 if with_gradient else 1)


def rows_that_fit(device: torch.device, bytes_per_row: int) -> int | None:
    """(sample x datapoint) rows one chunk may hold on a GPU: MEMORY_FRACTION of its free memory;
    None on a CPU (the estimators' cache-sized defaults apply)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * MEMORY_FRACTION) // bytes_per_row)


def samples_per_chunk(rows: int | None, num_datapoints: int) -> int | None:
    """Samples (or chains) per chunk for a batch of ``num_datapoints`` within ``rows``; None: default."""
    return None if rows is None else max(1, rows // max(1, num_datapoints))


def flop_per_row(config: ExperimentConfig, data_size: int) -> float:
    """Multiply-add FLOPs (2 per weight) of one decoder evaluation for one (sample, datapoint) row:
    the MLP's layers, or for ``model.kind = "conv"`` its stride-2 3x3 convolutions (channels c_i on a
    quarter of the previous map each) and the dense layers."""
    model = config.model
    if model.kind == "conv":
        channels, pixels, flop = [1, *model.conv_channels], data_size, 0.0
        for c_in, c_out in zip(channels, channels[1:]):
            pixels = max(1, pixels // 4)
            flop += 2 * 9 * c_in * c_out * pixels
        return flop + 2 * model.latent_size * channels[-1] * pixels
    widths = [model.latent_size, *model.decoder_hidden, data_size]
    if model.kind == "hierarchical":  # and the network of p(z1|z2)
        widths = widths + [model.latent_size_2, *model.prior_hidden, 2 * model.latent_size]
    return float(sum(2 * a * b for a, b in zip(widths, widths[1:])))


def stage_flop(config: ExperimentConfig, stage: str, data_size: int) -> float:
    """FLOPs of one step of ``stage``: rows evaluated together x passes (1 forward; 3 forward and
    backward) x :func:`flop_per_row`; the encoder counted as a second decoder in training."""
    evaluation = config.eval
    rows_per_chunk = (evaluation.chunk_size * evaluation.batch_size) if evaluation.chunk_size else ROWS_PER_CHUNK
    rows, passes = {
        "train": (config.train.batch_size, 2 * 3),
        "amortized": (rows_per_chunk, 1),
        "local": (max(config.refine.resolved(f).num_samples for f in config.refine.families) * evaluation.batch_size, 3),
        "ais": (min(ROWS_PER_CHUNK, config.ais.num_chains * evaluation.batch_size), 3),
        "curve": (config.curve.num_samples * evaluation.batch_size, 3),
        # fresh IWAE draws, and fresh AIS where a datapoint chose it: the larger of the two stages' steps
        "log_px": (min(ROWS_PER_CHUNK, config.ais.num_chains * evaluation.batch_size), 3) if config.ais.enabled
        else (rows_per_chunk, 1),
    }.get(stage, (0, 0))
    return float(rows * passes) * flop_per_row(config, data_size)


_DEFAULT_THREADS: list[int] = []  # torch's own choice (OMP_NUM_THREADS, the usable cores), read once


def stage_threads(flop: float, *, threads: int | None = None) -> int:
    """Torch threads for a step of ``flop`` FLOPs: ``threads`` when given (``--threads N``), else one
    per FLOP_PER_THREAD, at most torch's default (which follows OMP_NUM_THREADS and the cores)."""
    if threads is not None:
        return threads
    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    return max(1, min(_DEFAULT_THREADS[0], 1 + math.floor(flop / FLOP_PER_THREAD)))


def use_stage_threads(config: ExperimentConfig, stage: str, data_size: int, *, device: torch.device,
                      threads: int | None = None, log: Callable[[str], None] = print) -> int:
    """Set the torch threads of ``stage`` (:func:`stage_threads`) and say so; on a GPU nothing changes."""
    if device.type != "cpu":
        return torch.get_num_threads()
    flop = stage_flop(config, stage, data_size)
    number = stage_threads(flop, threads=threads)
    torch.set_num_threads(number)
    why = "--threads" if threads is not None else f"{flop / 1e9:.2g} GFLOP per step; --threads N to override"
    log(f"[{stage}] {number} torch thread{'s' if number > 1 else ''} ({why})")
    return number
