"""Which part of the work is this process's: torchrun ranks and job slices.

Output shard `j` belongs to worker `w` of `total` when `j % total == w`, where
`total = num_slices * world_size` and `w = slice_index * world_size + rank`.
A slice (`--num-shards K --shard-index i`) is one job of a Slurm array or one
machine; ranks are the processes of one torchrun launch inside it.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

from cogalign.errors import OptionError

__all__ = ["WorkSlice", "from_env", "init_process_group", "barrier", "sum_over_ranks", "destroy", "leave",
           "device_for"]


@dataclass(frozen=True)
class WorkSlice:
    """This process's place in the job: torchrun rank and world size, and its `--num-shards/--shard-index` slice."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    slice_index: int = 0
    num_slices: int = 1

    @property
    def worker(self) -> int:
        """This process's number among all ranks of all slices."""
        return self.slice_index * self.world_size + self.rank

    @property
    def total(self) -> int:
        """Processes over all slices (slices × ranks): shard k goes to worker k mod total."""
        return self.num_slices * self.world_size

    def owns(self, shard: int) -> bool:
        """True when shard `shard` is this process's to write."""
        return shard % self.total == self.worker

    def slice_owns(self, shard: int) -> bool:
        """Shard `shard` belongs to one of this slice's ranks (what a slice's --overwrite may redo)."""
        return (shard % self.total) // self.world_size == self.slice_index

    @property
    def is_main(self) -> bool:
        """True on the first rank of a launch (the one that reports)."""
        return self.rank == 0


def from_env(num_slices: int = 1, slice_index: int = 0) -> WorkSlice:
    """This process's `WorkSlice` from torchrun's RANK/WORLD_SIZE/LOCAL_RANK and the slice; a slice index out of
    range raises `OptionError`."""
    if not 0 <= slice_index < num_slices:
        raise OptionError(f"--shard-index {slice_index} must be in 0..{num_slices - 1} (--num-shards {num_slices})")
    return WorkSlice(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                     slice_index=slice_index, num_slices=num_slices)


def init_process_group(work: WorkSlice) -> bool:
    """Join torchrun's process group (nccl with gloo beside it on GPUs, gloo on CPUs)."""
    if work.world_size <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(work.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=48))
    return True


def _group():
    """torch.distributed if a process group is up; None without importing torch otherwise."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if (dist := _group()) is not None:
        dist.barrier()


def sum_over_ranks(counters: list) -> list:
    """Each Counter summed over the ranks of this launch (every rank gets the sums)."""
    if (dist := _group()) is None:
        return counters
    from collections import Counter

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [dict(c) for c in counters])
    return [sum((Counter(g[i]) for g in gathered), Counter()) for i in range(len(counters))]


def destroy() -> None:
    """Shut the process group down, if one was started."""
    if (dist := _group()) is not None:
        dist.destroy_process_group()


def leave() -> None:
    """Under torchrun: wait for every rank, then shut the group down cleanly (a process that exits
    with a gloo group alive was seen to abort with "terminate called without an active exception")."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(work: WorkSlice, device: str) -> str:
    """`auto` -> this rank's GPU if there is one, else cpu."""
    if device != "auto":
        return device
    import torch

    # Several ranks may share a GPU (more writers per GPU): rank i takes GPU i mod count.
    return f"cuda:{work.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
