"""The `mp` backend's lifecycle: a worker that dies (killed, or an exception in a step) makes
generation raise a clear error within seconds, the server's async engine dies with it (its
requests fail with EngineDeadError, which the server answers with 503), and neither shutdown()
nor interpreter exit leaves a worker process behind. Bad settings are refused up front."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(4)]


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


def worker_processes() -> list[psutil.Process]:
    """This process's multiprocessing children that run a worker (not the resource tracker,
    which multiprocessing keeps for the life of the interpreter)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(
                    child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def start_mp(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), distributed_executor_backend="mp", num_kv_blocks=256,
               block_size=8, max_model_len=512)


def test_a_killed_worker_fails_generate_within_seconds(tiny_dir):
    llm = start_mp(tiny_dir)
    executor = llm.llm_engine.model_executor
    (pid,) = executor.worker_pids
    killed_at = []

    def kill_once_generating() -> None:
        while executor.num_steps < 3:
            time.sleep(0.005)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_generating, daemon=True).start()
    with pytest.raises(RuntimeError, match=r"rank 0 \(pid \d+\) died \(killed by SIGKILL\)"):
        llm.generate(PROMPTS, LONG, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 30
    assert not llm.llm_engine.has_unfinished_requests()  # generate aborted its requests
    # Later calls fail at once with the same reason.
    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        llm.generate(PROMPTS[0], use_tqdm=False)

    # The server's engine thread dies on the first step, and its requests fail with
    # EngineDeadError (the API server's 503).
    async def serve_one():
        engine = AsyncLLMEngine(llm.llm_engine)
        engine.start()
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            async for _ in engine.generate(PROMPTS[0], LONG, "served"):
                pass
        assert not engine.is_running
        await engine.shutdown()

    asyncio.run(asyncio.wait_for(serve_one(), 30))
    llm.shutdown()
    assert worker_processes() == []


def test_an_exception_in_a_step_fails_generate_with_the_workers_traceback(tiny_dir):
    with start_mp(tiny_dir) as llm:
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False)
        # Break the worker's model runner: its next step raises in the worker process.
        llm.llm_engine.model_executor.collective_rpc(setattr, args=("runner", None))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 0 failed during a step") as info:
            llm.generate(PROMPTS, LONG, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert "execute_model" in str(info.value.__cause__)  # the worker's traceback
    assert worker_processes() == []


def test_interpreter_exit_leaves_no_worker_process(tiny_dir):
    """A script that never calls shutdown(): its worker goes when it exits."""
    script = textwrap.dedent(f"""
        from pagedllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(tiny_dir)!r}, distributed_executor_backend="mp", num_kv_blocks=64)
            llm.generate([{{"prompt_token_ids": [5, 6]}}], SamplingParams(max_tokens=2),
                         use_tqdm=False)
            print(*llm.llm_engine.model_executor.worker_pids, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    (pid,) = map(int, proc.stdout.split())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("settings, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1"),
    ({"tensor_parallel_size": 1.0}, "tensor_parallel_size must be an integer >= 1"),
    ({"distributed_executor_backend": "mpi"}, "one of uni, mp, ray or None"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, "use 'mp'"),
])
def test_bad_parallel_settings_are_refused_before_anything_starts(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)
    with pytest.raises(ValueError, match=message):
        LLM("/nonexistent", **settings)  # refused before the model is looked for


def test_ray_without_ray_installed_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install pagedllm\[ray\]"):
        EngineConfig(distributed_executor_backend="ray")
