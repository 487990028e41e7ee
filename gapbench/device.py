"""Which device a run uses (``--device cpu|cuda|auto``) and how many rows fit in its memory.

On a GPU the estimators' chunks are sized from the free memory (``torch.cuda.mem_get_info``) rather
than from the CPU's cache: IWAE evaluates ``chunk_size`` samples of every datapoint of a batch at once,
AIS ``chunk_size`` chains, so one chunk is (chunk_size x B) rows of decoder activations.
"""

from __future__ import annotations

import torch

from .config import ConfigError

DEVICES = ("cpu", "cuda", "auto")
MEMORY_FRACTION = 0.25  # of the free GPU memory one chunk of activations may take (autograd, copies, allocator slack)
BYTES_PER_VALUE = 4  # float32


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
