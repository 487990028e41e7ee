"""Evaluation spread over processes with torch.distributed: one shard of datapoints per rank.

``torchrun --nproc-per-node N -m gapbench run EXP.toml`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`init_ranks` joins them into one process group
(gloo on CPU, nccl on GPU). Rank r evaluates the datapoints ``shard(N, r, world_size)``, a contiguous
slice, and rank 0 gathers the per-datapoint rows in rank order, so the gathered frame has the rows of
a one-process run in the same order. Without those variables (a plain ``gapbench run``) everything
here is a no-op for one rank.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(hours=2)  # rank 0 may train for a long time while the others wait


class Ranks(NamedTuple):
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


ONE_PROCESS = Ranks()


def ranks_from_env() -> Ranks:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (one rank when unset)."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def init_ranks(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) unless single-process or already joined."""
    if not ranks.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)


def close_ranks(ranks: Ranks, *, wait: bool = True) -> None:
    """Leave the group, after every rank is done with it when ``wait`` (a rank that leaves early can
    abort the others); after an error, without waiting for ranks that may never come (torchrun then
    stops them)."""
    if ranks.is_distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard(num_datapoints: int, ranks: Ranks) -> range:
    """Rank r's datapoints: [r N / W, (r + 1) N / W), contiguous, sizes differing by at most one."""
    start = ranks.rank * num_datapoints // ranks.world_size
    stop = (ranks.rank + 1) * num_datapoints // ranks.world_size
    return range(start, stop)


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; tensors travel as CPU tensors)."""
    if not ranks.is_distributed:
        return obj
    box = [obj if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
    if not ranks.is_distributed:
        return [obj]
    out = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
