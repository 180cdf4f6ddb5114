"""The `ray` backend through the public API: greedy fp32 outputs equal the in-process `uni`
backend's token for token (ragged batch with swap and recompute preemption, requests added
mid-decode, n/best_of, beam search, prefix caching); killing the rank's actor mid-generation
raises a clear error within seconds; shutdown() leaves no Ray process behind.

Once tensor parallelism is built, two ranks (two actors in a gloo group) must equal one.

Starting Ray costs seconds: the two-rank engine starts and stops its own local instance, then
one more instance and one actor serve the rest of the module, which ends by killing that actor
and shutting the engine down.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")

from test_mp_executor import SETTINGS, completions, interrupt_after, prompts_of

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.config import EngineConfig

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def uni(tiny_dir):
    return LLM(str(tiny_dir), distributed_executor_backend="uni", **SETTINGS)


@pytest.fixture(scope="module")
def ray_llm(tiny_dir):
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("this test starts (and stops) its own local Ray instance")
    llm = LLM(str(tiny_dir), distributed_executor_backend="ray", **SETTINGS)
    yield llm
    llm.shutdown()


def ray_processes() -> list[psutil.Process]:
    """This process's children that belong to Ray (gcs_server, raylet, its workers...)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(
                    [child.name(), *child.cmdline()]).lower():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def both(uni: LLM, other: LLM, *args):
    results = []
    for llm in (uni, other):
        before = llm.llm_engine.get_stats()
        outputs = llm.generate(*args, use_tqdm=False)
        results.append((completions(outputs), before, llm.llm_engine.get_stats()))
    return results


def test_an_address_where_no_cluster_answers_is_refused_within_seconds(tiny_dir, monkeypatch):
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"no Ray cluster answers at RAY_ADDRESS='127.0.0.1:"
                                           rf"{port}'.*ray start --head --port={port}"):
        LLM(str(tiny_dir), distributed_executor_backend="ray", **SETTINGS)
    assert time.monotonic() - start < 30
    assert not ray.is_initialized()


def tensor_parallelism_is_built() -> bool:
    try:
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray")
    except ValueError as exc:
        if "not implemented" in str(exc):
            return False
        raise
    return True


def test_two_ranks_equal_one_and_leave_no_ray_process(uni, tiny_dir):
    """Tensor parallelism over two Ray actors (gloo) gives the uni backend's greedy tokens
    under preemption. Runs before the module's engine starts: this engine starts Ray and its
    shutdown stops it."""
    if not tensor_parallelism_is_built():
        pytest.skip("tensor parallelism is not built yet")
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("this test starts (and stops) its own local Ray instance")
    rng = random.Random(5)
    prompts = prompts_of(6, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 32), ignore_eos=True)
              for _ in prompts]
    want = completions(uni.generate(prompts, params, use_tqdm=False))
    with LLM(str(tiny_dir), tensor_parallel_size=2, distributed_executor_backend="ray",
             **SETTINGS) as llm:
        started = ray_processes()
        executor = llm.llm_engine.model_executor
        assert executor.owns_ray and len(set(executor.worker_pids)) == 2
        before = llm.llm_engine.get_stats()
        assert completions(llm.generate(prompts, params, use_tqdm=False)) == want
        assert llm.llm_engine.get_stats().num_preemptions > before.num_preemptions
    assert not ray.is_initialized()
    assert wait_for_exit(started) == []


def wait_for_exit(processes: list[psutil.Process], timeout_s: float = 10) -> list:
    """Those of `processes` still running after `timeout_s` seconds. NOTE: checked by pid, as
    a Ray process whose parent died is no longer this process's child."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_the_rank_runs_in_a_ray_actor(ray_llm):
    executor = ray_llm.llm_engine.model_executor
    assert type(executor).__name__ == "RayDistributedExecutor" and executor.owns_ray
    (pid,) = executor.worker_pids
    assert pid != os.getpid() and psutil.pid_exists(pid)
    assert ray_llm.llm_engine.get_stats().num_blocks == 16
    assert executor.collective_rpc(getattr, args=("num_kv_blocks",)) == [16]
    with pytest.raises(AttributeError, match="no_such_method") as info:
        executor.collective_rpc("no_such_method")
    assert "RayWorkerWrapper.rpc" in str(info.value.__cause__)  # the actor's traceback
    executor.check_health()  # an rpc's error leaves the rank running


def test_ragged_batch_with_swap_and_recompute_preemption(uni, ray_llm):
    rng = random.Random(1)
    prompts = prompts_of(10, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 40), ignore_eos=True)
              for _ in prompts]
    (want, *_), (got, before_r, after_r) = both(uni, ray_llm, prompts, params)
    assert got == want
    swaps = after_r.num_swap_outs - before_r.num_swap_outs
    assert swaps > 0 and after_r.num_preemptions - before_r.num_preemptions > swaps
    assert after_r.num_free_blocks == after_r.num_blocks


def test_requests_added_mid_decode(uni, ray_llm):
    prompts = prompts_of(6, seed=2, max_len=20)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for llm in (uni, ray_llm):
        engine = llm.llm_engine
        finished = {}
        for step in range(400):
            if step % 3 == 0 and step // 3 < len(prompts):
                engine.add_request(f"mid-{step // 3}", prompts[step // 3], greedy)
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
            if len(finished) == len(prompts):
                break
        results.append(finished)
    assert results[1] == results[0] and len(results[1]) == len(prompts)


def test_messages_through_the_object_store(uni, ray_llm, monkeypatch):
    """Messages over the inline limit (a big first prefill) go through one ray.put: every
    message does here, with the limit at 0."""
    from pagedllm.executor import ray_executor

    monkeypatch.setattr(ray_executor, "_INLINE_BYTES", 0)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value: puts.append(len(value)) or real_put(value))
    prompts = prompts_of(4, seed=10)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (want, *_), (got, *_) = both(uni, ray_llm, prompts, greedy)
    assert got == want
    assert len(puts) >= 12  # one per step


def test_sampling_beams_and_prefix_caching(uni, ray_llm):
    prompts = prompts_of(3, seed=3, max_len=20)
    params = [SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
              SamplingParams(n=2, best_of=3, temperature=0.8, seed=12, max_tokens=10),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, ignore_eos=True)]
    (want, *_), (got, *_) = both(uni, ray_llm, prompts, params)
    assert got == want and [len(c) for c in got] == [3, 2, 1]

    beams = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    want, got = (list(llm.beam_search(prompts_of(2, seed=4, max_len=16), beams))
                 for llm in (uni, ray_llm))
    assert [[s.tokens for s in o.sequences] for o in got] == \
           [[s.tokens for s in o.sequences] for o in want]

    shared = list(range(30, 54))  # 3 full blocks
    prefixed = [{"prompt_token_ids": shared + tail["prompt_token_ids"]}
                for tail in prompts_of(3, seed=6, max_len=8)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    both(uni, ray_llm, prefixed, greedy)
    (want, *_), (got, before, after) = both(uni, ray_llm, prefixed, greedy)
    assert got == want and after.prefix_cache_hits > before.prefix_cache_hits
    executor = ray_llm.llm_engine.model_executor
    assert executor.num_steps > 0 and 0 < executor.last_message_bytes < 4096


def test_an_exception_in_a_step_fails_generate_with_the_actors_traceback(tiny_dir, ray_llm):
    """A second engine on the module's Ray (which it did not start): a broken rank fails its
    step with a clear error, and its shutdown leaves Ray and the first engine running."""
    with LLM(str(tiny_dir), distributed_executor_backend="ray", **SETTINGS) as other:
        executor = other.llm_engine.model_executor
        assert not executor.owns_ray
        executor.collective_rpc(setattr, args=("runner", None))  # its next step raises
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 0 failed during a step") as info:
            other.generate(prompts_of(2, seed=8), LONG, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert "execute_model" in str(info.value.__cause__)  # the actor's traceback
        with pytest.raises(RuntimeError, match="failed during a step"):
            other.generate(prompts_of(1, seed=8), use_tqdm=False)
    assert ray.is_initialized()
    out = ray_llm.generate(prompts_of(1, seed=8), SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_ctrl_c_while_a_step_runs_leaves_the_engine_usable(uni, ray_llm):
    """Ctrl-C lands wherever it lands (encoding, submitting, waiting): a step the actor ran
    for an interrupted caller is dropped, one never submitted is resent in full, and the
    next generate gives uni's tokens."""
    executor = ray_llm.llm_engine.model_executor
    prompts = prompts_of(3, seed=9, max_len=12)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for delay_steps in (2, 5, 9):
        threading.Thread(target=interrupt_after, daemon=True,
                         args=(executor, executor.num_steps + delay_steps)).start()
        with pytest.raises(KeyboardInterrupt):
            ray_llm.generate(prompts, greedy, use_tqdm=False)
    (want, *_), (got, *_) = both(uni, ray_llm, prompts, greedy)
    assert got == want
    executor.check_health()


def test_a_rank_that_cannot_load_the_model_raises_what_uni_raises(tiny_dir, tmp_path, ray_llm):
    """A checkpoint whose MLP does not fit its config: the actor's ValueError (naming the
    tensor) reaches the caller as under `uni`, and the failed engine leaves no actor."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as want:
        LLM(str(bad), distributed_executor_backend="uni", **SETTINGS)
    before = set(ray_processes())
    with pytest.raises(ValueError) as got:
        LLM(str(bad), distributed_executor_backend="ray", **SETTINGS)
    assert str(got.value) == str(want.value)
    assert "RayWorkerWrapper.start" in str(got.value.__cause__)  # the actor's traceback
    assert wait_for_exit([p for p in ray_processes() if p not in before
                          and p.name() == "ray::RayWorkerWrapper"]) == []


def test_ray_is_accepted_by_the_settings_when_installed():
    assert EngineConfig(distributed_executor_backend="ray").distributed_executor_backend == "ray"


# NOTE: last in the module: it kills the module's actor and shuts the engine (and Ray) down.
def test_a_killed_actor_fails_generate_within_seconds_and_shutdown_leaves_no_ray_process(
        ray_llm):
    executor = ray_llm.llm_engine.model_executor
    (pid,) = executor.worker_pids
    start_steps = executor.num_steps
    killed_at = []

    def kill_once_generating() -> None:
        while executor.num_steps < start_steps + 3:
            time.sleep(0.005)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_generating, daemon=True).start()
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(4)]
    with pytest.raises(RuntimeError, match=rf"Ray actor of rank 0 \(pid {pid}, .*\) died "
                                           r"during a step"):
        ray_llm.generate(prompts, LONG, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 30
    assert not ray_llm.llm_engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="died during a step"):  # later calls fail at once
        ray_llm.generate(prompts[0], use_tqdm=False)

    started = ray_processes()  # gcs_server, raylet, its agents and workers
    assert {"gcs_server", "raylet"} <= {p.name() for p in started}
    ray_llm.shutdown()
    assert not ray.is_initialized()
    assert wait_for_exit(started) == []
    ray_llm.shutdown()  # twice is fine


@pytest.mark.slow
def test_serve_with_ray_answers_the_openai_client_and_sigterm_leaves_no_ray_process(
        tiny_dir, tmp_path):
    """`pagedllm serve MODEL -tp 2 --distributed-executor-backend ray` (one rank until TP is
    built): completions, streamed too, then SIGTERM stops the server and every Ray process it
    started."""
    import subprocess
    import sys
    import urllib.request

    import openai

    tp = "2" if tensor_parallelism_is_built() else "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PAGEDLLM_API_KEY")}
    server = subprocess.Popen(
        [sys.executable, "-m", "pagedllm", "serve", str(tiny_dir), "--port", str(port), "-tp", tp,
         "--distributed-executor-backend", "ray", "--dtype", "float32", "--num-kv-blocks", "64"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        kwargs = {"model": str(tiny_dir), "prompt": [5, 6, 7, 8], "max_tokens": 8,
                  "temperature": 0}
        whole = client.completions.create(**kwargs).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            **kwargs, stream=True) if c.choices)
        assert whole and streamed == whole
        started = psutil.Process(server.pid).children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert wait_for_exit(started) == []
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
