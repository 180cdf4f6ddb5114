"""The executor seam: how the engine runs the model, in its own process or in others.

The engine builds one Executor (`build_executor`) and calls only it, so it never knows how many
processes run the model. Backends, chosen by `distributed_executor_backend`:

    uni  one Worker in the engine's process (UniProcExecutor)
    mp   one worker process per rank on this host (MultiprocExecutor)
    ray  one Ray actor per rank, on this host or a Ray cluster (RayDistributedExecutor)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PretrainedConfig

    from pagedllm.config import EngineConfig
    from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
    from pagedllm.profiler import StepProfiler

# The backends `distributed_executor_backend` may name: the one list the settings check.
DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp", "ray")
# What a rank was doing when it failed, as the `mp` and `ray` executors' errors say it.
DURING = {"start": "while starting", "step": "during a step", "rpc": "during an rpc"}


class RemoteTraceback(Exception):
    """The traceback of an error raised in a rank (chained under the error the driver raises)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.args[0]


def engine_dead(reason: str) -> str:
    """The message of a lost rank, which every later call repeats: `reason`, then what to do."""
    return f"{reason}; the engine cannot run any more steps: shut it down and start a new one"


class Executor(ABC):
    """Runs steps on every rank and answers with rank 0's sampled tokens.

    The KV cache sizes are agreed at start: each is the minimum over the ranks, so one block
    manager in the engine serves them all.
    """

    @property
    @abstractmethod
    def num_kv_blocks(self) -> int:
        """Device KV blocks every rank holds."""

    @property
    @abstractmethod
    def num_cpu_blocks(self) -> int:
        """Host blocks for swapping that every rank holds."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput,
                      live_request_ids: Container[str] = ()) -> ModelRunnerOutput:
        """Runs one step on every rank.

        Args:
            scheduler_output: the step.
            live_request_ids: every request the scheduler still holds; an executor that keeps
                request state in its ranks forgets the others.

        Returns:
            Rank 0's sampled tokens.
        """

    @abstractmethod
    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Calls `method` on every rank's Worker (a name, or a picklable function that gets
        the Worker first) and returns each rank's result, rank 0 first."""

    def check_health(self) -> None:
        """Raises if a rank can no longer run steps."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops every rank and frees what they hold; safe to call twice."""


def resolve_backend(config: EngineConfig) -> str:
    """The backend the settings ask for: `uni` at one rank and `mp` above, unless named."""
    if config.distributed_executor_backend is not None:
        return config.distributed_executor_backend
    return "uni" if config.tensor_parallel_size == 1 else "mp"


def build_executor(config: EngineConfig, hf_config: PretrainedConfig, model_dir: Path,
                   max_model_len: int, profiler: StepProfiler | None = None) -> Executor:
    """Starts the executor the settings ask for (the backend's module is imported only then)."""
    from pagedllm.distributed.utils import check_tensor_parallel_heads

    check_tensor_parallel_heads(hf_config, config.tensor_parallel_size)
    backend = resolve_backend(config)
    if backend == "uni":
        from pagedllm.executor.uniproc import UniProcExecutor as executor_cls
    elif backend == "mp":
        from pagedllm.executor.multiproc import MultiprocExecutor as executor_cls
    elif backend == "ray":
        from pagedllm.executor.ray_executor import RayDistributedExecutor as executor_cls
    else:  # EngineConfig refuses the rest before anything starts
        raise ValueError(f"distributed_executor_backend {backend!r} is not available")
    return executor_cls(config, hf_config, model_dir, max_model_len, profiler)


def call_worker(worker: Any, method: str | Callable[..., Any], args: tuple,
                kwargs: dict[str, Any] | None) -> Any:
    """One rank's share of collective_rpc."""
    if isinstance(method, str):
        return getattr(worker, method)(*args, **(kwargs or {}))
    return method(worker, *args, **(kwargs or {}))
