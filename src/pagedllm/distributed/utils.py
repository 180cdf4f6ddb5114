"""What a tensor-parallel run checks before it starts, and how each rank sets itself up."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

import torch

from pagedllm.distributed.parallel_state import TensorParallelGroup, init_tensor_parallel

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# vLLM's VLLM_CPU_OMP_THREADS_BIND: "auto" (default: each rank takes its share of the cores
# this process may run on, one thread per core), "nobind" (threads = cores // ranks, unpinned),
# or one core list per rank separated by "|", e.g. "0-1|2-3" or "0,2|1,3".
THREADS_BIND_ENV = "PAGEDLLM_CPU_THREADS_BIND"


# How the ranks' collectives travel: "auto" (default: shared memory when all ranks are on one
# host, else the process group) or "process_group" (always the process group: gloo on CPU).
TP_COMM_ENV = "PAGEDLLM_TP_COMM"
_TP_COMM_CHOICES = ("auto", "process_group")


def use_shm_collectives(one_host: bool) -> bool:
    """Whether the ranks' collectives go through shared memory (the driver asks at start)."""
    choice = os.environ.get(TP_COMM_ENV, "auto").strip() or "auto"
    if choice not in _TP_COMM_CHOICES:
        raise ValueError(f"{TP_COMM_ENV}={choice!r}: expected one of "
                         f"{', '.join(_TP_COMM_CHOICES)}")
    return one_host and choice == "auto"


def check_tensor_parallel_heads(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Refuses a size the model's heads cannot be split by, naming both numbers.

    Query heads must divide by tp; KV heads too, or, where tp exceeds them, tp must be a
    multiple of them (each KV head is replicated on tp / num_kv_heads ranks, as in vLLM).
    """
    if tp_size == 1:
        return
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    if tp_size > num_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is larger than the model's "
                         f"{num_heads} attention heads: use a divisor of {num_heads}")
    if num_heads % tp_size:
        raise ValueError(f"the model's {num_heads} attention heads do not split over "
                         f"tensor_parallel_size={tp_size}: num_attention_heads ({num_heads}) "
                         f"must be divisible by tensor_parallel_size ({tp_size})")
    if (tp_size % num_kv_heads if tp_size >= num_kv_heads else num_kv_heads % tp_size):
        raise ValueError(f"the model's {num_kv_heads} KV heads do not split over "
                         f"tensor_parallel_size={tp_size}: one must divide the other")
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        size = getattr(hf_config, name, None)
        if isinstance(size, int) and size % tp_size:
            raise ValueError(f"the model's {name} ({size}) is not divisible by "
                             f"tensor_parallel_size ({tp_size})")


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (rank 0's store takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_cores(rank: int, world_size: int, bind: str | None = None) -> list[int] | None:
    """The cores rank `rank` pins its threads to, or None (unpinned) for "nobind"."""
    bind = (bind if bind is not None else os.environ.get(THREADS_BIND_ENV, "auto")).strip()
    if bind == "nobind":
        return None
    if bind == "auto":
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // world_size)
        if len(cores) < world_size:  # fewer cores than ranks: they share them all
            return cores
        return cores[rank * share:(rank + 1) * share]
    lists = bind.split("|")
    if len(lists) != world_size:
        raise ValueError(f"{THREADS_BIND_ENV}={bind!r} gives {len(lists)} core lists for "
                         f"{world_size} ranks: give one per rank, separated by '|'")
    return _parse_cores(lists[rank], bind)


def _parse_cores(text: str, whole: str) -> list[int]:
    cores: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cores.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"{THREADS_BIND_ENV}={whole!r}: {text!r} is not a core list such "
                         f"as 0-3 or 0,2") from None
    return cores


def init_worker_distributed(rank: int, world_size: int, init_method: str,
                            shm_name: str | None) -> TensorParallelGroup:
    """A rank's setup before it builds its model: its share of the cores (threads = cores
    // ranks, pinned unless "nobind"; OMP_NUM_THREADS, where set, wins), then the group."""
    if world_size > 1:
        cores = rank_cores(rank, world_size)
        available = len(cores) if cores else os.cpu_count() or 1
        # Ranks that share their cores (more ranks than cores) split them.
        shared = not cores or len(cores) == len(os.sched_getaffinity(0)) and world_size > 1
        threads = max(1, available // world_size) if shared else len(cores)
        if cores:
            os.sched_setaffinity(0, cores)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads)
        logger.info("rank %d: %d threads on cores %s", rank, torch.get_num_threads(),
                    cores or "any")
        # gloo picks its interface from the host name, which may not resolve here.
        if init_method.startswith("tcp://127.0.0.1"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return init_tensor_parallel(rank, world_size, init_method, shm_name=shm_name)
