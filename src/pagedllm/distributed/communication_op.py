"""Collectives over the tensor-parallel group; each is the identity at one rank.

Ranks on one host with a shared buffer use the shared-memory ops (shm_comm.py); otherwise,
and for dtypes those ops do not take, gloo's (or nccl's) through torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagedllm.distributed.parallel_state import get_tp_group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks, in place (x must be contiguous); returns x."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    if tp.shm is not None and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous():
        return tp.shm.all_reduce(x)
    dist.all_reduce(x, group=tp.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's x, concatenated along `dim` in rank order, on every rank."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    if tp.shm is not None:
        return tp.shm.all_gather(x, dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_gather(x: torch.Tensor, dst: int = 0,
                                 dim: int = -1) -> torch.Tensor | None:
    """Every rank's x, concatenated along `dim` in rank order, on rank `dst`; None elsewhere."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    if tp.shm is not None and x.dim() == 2 and dim in (-1, 1):  # the LM head's logits
        return tp.shm.gather_columns(x, dst)  # each row copied once, on dst only
    if tp.shm is not None:  # a copy per rank through the buffer: cheaper than gloo's gather
        full = tp.shm.all_gather(x, dim)
        return full if tp.rank == dst else None
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)] if tp.rank == dst else None
    dist.gather(x, parts, dst=dst, group=tp.group)
    return torch.cat(parts, dim=dim) if parts is not None else None
