"""The `mp` backend through the public API: greedy fp32 outputs equal the in-process `uni`
backend's token for token, on one small pool where requests are preempted by swap and by
recompute, prefills are chunked and prefixes are cached. One worker process serves the module
(starting one costs seconds)."""

from __future__ import annotations

import _thread
import random
import threading
import time

import psutil
import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams

# 16 blocks of 8 tokens: a few requests fill the pool. The host pool (swap_space) holds 5
# blocks, so some preemptions swap and the rest fall back to recompute.
SETTINGS = {"num_kv_blocks": 16, "block_size": 8, "max_model_len": 128,
            "preemption_mode": "swap", "swap_space": 0.00002, "max_num_batched_tokens": 32,
            "dtype": "float32", "seed": 5}


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def uni(tiny_dir):
    return LLM(str(tiny_dir), distributed_executor_backend="uni", **SETTINGS)


@pytest.fixture(scope="module")
def mp(tiny_dir):
    llm = LLM(str(tiny_dir), distributed_executor_backend="mp", **SETTINGS)
    yield llm
    llm.shutdown()


def prompts_of(n: int, seed: int, max_len: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(1, max_len))]}
            for _ in range(n)]


def completions(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def both(uni: LLM, mp: LLM, *args):
    """The same generate call on each engine, with each engine's stats delta."""
    results = []
    for llm in (uni, mp):
        before = llm.llm_engine.get_stats()
        outputs = llm.generate(*args, use_tqdm=False)
        after = llm.llm_engine.get_stats()
        results.append((completions(outputs), before, after))
    return results


def test_the_engines_run_where_they_should(uni, mp):
    assert uni.llm_engine.worker.model is not None  # in this process
    executor = mp.llm_engine.model_executor
    assert executor.worker_pids and all(psutil.pid_exists(p) for p in executor.worker_pids)
    with pytest.raises(AttributeError, match="other processes"):
        _ = mp.llm_engine.worker
    assert mp.llm_engine.get_stats().num_blocks == uni.llm_engine.get_stats().num_blocks == 16


def test_ragged_batch_with_swap_and_recompute_preemption(uni, mp):
    rng = random.Random(1)
    prompts = prompts_of(10, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 40), ignore_eos=True)
              for _ in prompts]
    (want, before_u, after_u), (got, before_m, after_m) = both(uni, mp, prompts, params)
    assert got == want
    swaps = after_m.num_swap_outs - before_m.num_swap_outs
    recomputes = after_m.num_preemptions - before_m.num_preemptions - swaps
    assert swaps > 0 and recomputes > 0
    assert (swaps, recomputes) == (
        after_u.num_swap_outs - before_u.num_swap_outs,
        after_u.num_preemptions - before_u.num_preemptions
        - (after_u.num_swap_outs - before_u.num_swap_outs))
    assert after_m.num_free_blocks == after_m.num_blocks
    assert after_m.num_free_cpu_blocks == after_m.num_cpu_blocks


def test_requests_added_mid_decode(uni, mp):
    prompts = prompts_of(6, seed=2, max_len=20)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for llm in (uni, mp):
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
    assert results[1] == results[0]
    assert len(results[1]) == len(prompts)


def test_parallel_sampling_and_seeded_sampling(uni, mp):
    prompts = prompts_of(3, seed=3, max_len=20)
    params = [SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
              SamplingParams(n=2, best_of=3, temperature=0.8, seed=12, max_tokens=10),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, ignore_eos=True)]
    (want, *_), (got, *_) = both(uni, mp, prompts, params)
    assert got == want
    assert [len(c) for c in got] == [3, 2, 1]


def test_beam_search(uni, mp):
    prompts = prompts_of(2, seed=4, max_len=16)
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    want, got = (llm.beam_search(prompts, params) for llm in (uni, mp))
    want, got = list(want), list(got)
    assert [[s.tokens for s in o.sequences] for o in got] == \
           [[s.tokens for s in o.sequences] for o in want]
    assert len(got[0].sequences) == 3


def test_prefix_caching(uni, mp):
    shared = list(range(30, 54))  # 3 full blocks
    prompts = [{"prompt_token_ids": shared + tail["prompt_token_ids"]}
               for tail in prompts_of(3, seed=6, max_len=8)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = both(uni, mp, prompts, greedy)
    again = both(uni, mp, prompts, greedy)
    assert first[1][0] == first[0][0] and again[1][0] == again[0][0] == first[0][0]
    (_, before_u, after_u), (_, before_m, after_m) = again
    hits = after_m.prefix_cache_hits - before_m.prefix_cache_hits
    assert hits > 0 and hits == after_u.prefix_cache_hits - before_u.prefix_cache_hits


def test_collective_rpc_answers_per_rank_and_survives_an_error(mp):
    executor = mp.llm_engine.model_executor
    # A builtin pickles by name: getattr(worker, "num_kv_blocks") on every rank.
    assert executor.collective_rpc(getattr, args=("num_kv_blocks",)) == [16]
    with pytest.raises(AttributeError, match="no_such_method") as info:
        executor.collective_rpc("no_such_method")
    assert "Traceback" in str(info.value.__cause__)  # the rank's own traceback
    executor.check_health()
    out = mp.generate(prompts_of(1, seed=7), SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert executor.num_steps > 0 and 0 < executor.last_message_bytes < 4096


def test_ctrl_c_while_a_step_runs_leaves_the_engine_usable(uni, mp):
    """Ctrl-C lands wherever it lands (encoding, sending, waiting): the next call drops the
    stale answer, or resends what the worker never got, and generates the same tokens."""
    executor = mp.llm_engine.model_executor
    prompts = prompts_of(3, seed=9, max_len=12)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for delay_steps in (2, 5, 9):
        threading.Thread(target=interrupt_after, daemon=True,
                         args=(executor, executor.num_steps + delay_steps)).start()
        with pytest.raises(KeyboardInterrupt):
            mp.generate(prompts, greedy, use_tqdm=False)
    (want, *_), (got, *_) = both(uni, mp, prompts, greedy)
    assert got == want


def interrupt_after(executor, num_steps: int) -> None:
    """Ctrl-C for the main thread once the executor has started `num_steps` steps."""
    while executor.num_steps < num_steps:
        time.sleep(0.0005)
    _thread.interrupt_main()


# NOTE: last in the module, since it ends the module's worker process.
def test_shutdown_stops_the_worker_process(mp):
    executor = mp.llm_engine.model_executor
    pids = executor.worker_pids
    mp.shutdown()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    mp.shutdown()  # twice is fine
    with pytest.raises(RuntimeError, match="shut down"):
        mp.generate(prompts_of(1, seed=8), use_tqdm=False)


def test_ngram_speculation_is_verified_by_the_worker_process(tiny_dir, uni):
    """The step message carries each row's proposals to the ranks: under mp they are verified
    and accepted as in-process, with the same greedy tokens."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "disable_by_batch_size": 64}
    settings = {**SETTINGS, "num_kv_blocks": 64, "max_num_batched_tokens": 256}
    rng = random.Random(11)
    phrases = [[rng.randrange(3, 512) for _ in range(4)] for _ in range(3)]
    prompts = [{"prompt_token_ids": p * 4 + p[:2]} for p in phrases]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = []
    for backend in ("uni", "mp"):
        llm = LLM(str(tiny_dir), distributed_executor_backend=backend,
                  speculative_config=spec, **settings)
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            stats = llm.llm_engine.get_stats()
        finally:
            llm.shutdown()
        results.append((completions(outputs), stats.spec_decode_num_draft_tokens,
                        stats.spec_decode_num_accepted_tokens))
    assert results[0] == results[1]
    assert results[1][1] > 0
    assert completions(uni.generate(prompts, params, use_tqdm=False)) == results[0][0]
