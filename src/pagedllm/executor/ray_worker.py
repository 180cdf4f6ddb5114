"""A rank of the `ray` backend: the Ray actor that builds the Worker and runs the steps that
RayDistributedExecutor (ray_executor.py) sends, and what it needs to know at start.

Plain classes and functions: the driver wraps RayWorkerWrapper with `ray.remote`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from pagedllm.executor.abstract import call_worker
from pagedllm.executor.step_message import StepDecoder, StepMessage, encode_runner_output
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pagedllm.config import EngineConfig


class RayWorkerWrapper:
    """One rank: a Ray actor that builds the Worker and runs the steps the driver sends.

    Wrapped by `ray.remote` where it is started, so this module's class stays plain.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.worker: Any = None
        self.decoder = StepDecoder()
        self.comm_buffer: Any = None  # rank 0's, when the ranks share one node

    def node_info(self) -> tuple[str, str, int]:
        """(node id, node ip, pid)."""
        return (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
                os.getpid())

    def free_port(self) -> int:
        """A free TCP port on this rank's node, for the process group's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def create_comm_buffer(self) -> str:
        """Rank 0, when every rank is on its node: the shared buffer of the collectives
        (distributed/shm_comm.py, as the `mp` driver makes it); returns its name."""
        from pagedllm.distributed.shm_comm import create_shm_buffer

        self.comm_buffer = create_shm_buffer(self.world_size)
        return self.comm_buffer.name

    def unlink_comm_buffer(self) -> None:
        """Once every rank has mapped it: the name goes, the mappings stay, so nothing is
        left in /dev/shm whenever and however the ranks end."""
        self.comm_buffer.unlink()

    def start(self, config: EngineConfig, hf_config: PretrainedConfig, model_dir: str,
              max_model_len: int, layout: RankLayout) -> tuple[int, int]:
        """Takes this rank's cores, joins the ranks' group, builds the Worker; returns its
        pool sizes."""
        bind_threads(layout)
        if config.device.startswith("cuda"):
            # "cuda:N" names a GPU of the driver's machine; Ray shows this rank only its own.
            config = dataclasses.replace(config, device="cuda")
        if self.world_size > 1:
            from pagedllm.distributed.parallel_state import init_tensor_parallel

            if layout.init_method.startswith("tcp://127.0.0.1"):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            init_tensor_parallel(self.rank, self.world_size, layout.init_method,
                                 backend="nccl" if config.device.startswith("cuda") else "gloo",
                                 shm_name=layout.shm_name)
        from pagedllm.worker.worker import Worker

        self.worker = Worker(config, hf_config, Path(model_dir), max_model_len,
                             StepProfiler(enabled=config.profile))
        return self.worker.num_kv_blocks, self.worker.num_cpu_blocks

    def execute_model(self, payload: bytes) -> Any:
        profiler = self.worker.profiler  # profile=True: the rank's own sections
        with profiler.section("step"):
            with profiler.section("decode step"):
                scheduler_output = self.decoder.decode(
                    StepMessage.from_wire(pickle.loads(payload)))
            output = self.worker.execute_model(scheduler_output)
            # Only rank 0 samples (under TP the other ranks' LM heads gather their logits to
            # it).
            rows = encode_runner_output(scheduler_output, output) if self.rank == 0 else None
        profiler.num_steps += 1
        return rows

    def rpc(self, method: str | Callable[..., Any], args: tuple,
            kwargs: dict[str, Any] | None) -> Any:
        return call_worker(self.worker, method, args, kwargs)


@dataclass(frozen=True)
class RankLayout:
    """Where a rank runs among the others, as its actor needs it at start."""

    # This rank's index among the ranks on its node, and their number.
    local_rank: int
    ranks_on_node: int
    # The process group's rendezvous (rank 0's node; 127.0.0.1 when all share one node).
    init_method: str
    # The shared buffer of the collectives when all ranks share one node, else None (gloo).
    shm_name: str | None
    # The driver's OMP_NUM_THREADS, if it set one.
    omp_num_threads: str | None


def bind_threads(layout: RankLayout) -> None:
    """A rank's share of its node's cores, pinned, as the `mp` ranks take theirs
    (PAGEDLLM_CPU_THREADS_BIND; OMP_NUM_THREADS, where the user set it, wins).

    NOTE: Ray sets OMP_NUM_THREADS in an actor to its reserved CPUs (one here); that is not
    the user's setting, so it is dropped.
    """
    import torch

    from pagedllm.distributed.utils import rank_cores

    cores = rank_cores(layout.local_rank, layout.ranks_on_node)
    if cores:
        os.sched_setaffinity(0, cores)
    if layout.omp_num_threads is not None:
        os.environ["OMP_NUM_THREADS"] = layout.omp_num_threads
        torch.set_num_threads(int(layout.omp_num_threads))
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
        share = max(1, len(os.sched_getaffinity(0)) // layout.ranks_on_node)
        torch.set_num_threads(len(cores) if cores else share)
