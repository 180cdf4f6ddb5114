"""Executors: how the engine runs the model (in-process, or one worker process per rank).

Imports no torch: the backend modules are imported when one is built (`build_executor`)."""

from pagedllm.executor.abstract import (
    DISTRIBUTED_EXECUTOR_BACKENDS,
    Executor,
    build_executor,
    resolve_backend,
)

__all__ = ["DISTRIBUTED_EXECUTOR_BACKENDS", "Executor", "build_executor", "resolve_backend"]
