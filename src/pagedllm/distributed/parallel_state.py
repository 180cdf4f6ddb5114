"""This process's tensor-parallel group (vLLM's `parallel_state`): its rank and size.

A process that never calls `init_tensor_parallel` is rank 0 of 1 with no process group, so a
model built at one rank (the `uni` backend, every in-process test) never touches
torch.distributed. Under the `mp` backend each worker process joins the group once, before it
builds its model, and its layers read their shard from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from pagedllm.distributed.shm_comm import ShmCommunicator


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    # The process group the collectives run in; None at one rank.
    group: dist.ProcessGroup | None = None
    # The shared-memory collectives of ranks on one host (faster than gloo's), where set up.
    shm: ShmCommunicator | None = None


_TP_GROUP = TensorParallelGroup(rank=0, world_size=1)


def get_tp_group() -> TensorParallelGroup:
    return _TP_GROUP


def get_tensor_model_parallel_rank() -> int:
    return _TP_GROUP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP_GROUP.world_size


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str = "gloo",
                         shm_name: str | None = None,
                         timeout_s: float = 600.0) -> TensorParallelGroup:
    """Joins the group of `world_size` ranks at `init_method` (e.g. tcp://127.0.0.1:PORT, which
    rank 0 serves) as `rank`; every rank calls it before building its model. With `shm_name`
    (a buffer from shm_comm.create_shm_buffer) the all-reduces go through shared memory."""
    global _TP_GROUP
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        shm = None
        if shm_name is not None:
            from pagedllm.distributed.shm_comm import ShmCommunicator

            shm = ShmCommunicator(shm_name, rank, world_size)
        _TP_GROUP = TensorParallelGroup(rank, world_size, dist.group.WORLD, shm)
    else:
        _TP_GROUP = TensorParallelGroup(rank=0, world_size=1)
    return _TP_GROUP


def destroy_tensor_parallel() -> None:
    global _TP_GROUP
    if _TP_GROUP.shm is not None:
        _TP_GROUP.shm.close()
    if _TP_GROUP.group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP = TensorParallelGroup(rank=0, world_size=1)
