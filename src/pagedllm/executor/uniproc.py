"""The `uni` backend: one Worker in the engine's process, called directly."""

from __future__ import annotations

from collections.abc import Callable, Container
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.abstract import Executor, call_worker
from pagedllm.profiler import StepProfiler
from pagedllm.worker.worker import Worker

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class UniProcExecutor(Executor):
    """A single rank in-process: a step costs a method call, and nothing is copied."""

    def __init__(self, config: EngineConfig, hf_config: PretrainedConfig, model_dir: Path,
                 max_model_len: int, profiler: StepProfiler | None = None) -> None:
        self.driver_worker = Worker(config, hf_config, model_dir, max_model_len, profiler)

    @property
    def num_kv_blocks(self) -> int:
        return self.driver_worker.num_kv_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.driver_worker.num_cpu_blocks

    def execute_model(self, scheduler_output: SchedulerOutput,
                      live_request_ids: Container[str] = ()) -> ModelRunnerOutput:
        return self.driver_worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return [call_worker(self.driver_worker, method, args, kwargs)]

    def shutdown(self) -> None:
        pass  # the worker's memory goes with the engine
