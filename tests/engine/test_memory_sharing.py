"""Sharing through the public API: parallel samples, swap and recompute preemption, prefix caching."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


def prompts_of(n: int, seed: int, min_len: int = 2, max_len: int = 30) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(min_len, max_len))]}
        for _ in range(n)
    ]


def completions(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def peak_used_blocks(llm: LLM, prompts, params) -> int:
    """Runs the requests step by step and returns the most device blocks in use at once."""
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"peak-{i}", prompt, p)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.get_stats()
        peak = max(peak, stats.num_blocks - stats.num_free_blocks)
    return peak


def test_parallel_samples_share_blocks_and_are_reproducible(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=8, enable_prefix_caching=False)
    prompt = {"prompt_token_ids": list(range(5, 5 + 61))}  # 61 tokens: 7 full blocks + 5
    params = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in first.outputs}) == 4  # the samples differ
    assert all(len(c.token_ids) == 12 for c in first.outputs)
    # Reproducible alone and next to other requests.
    again = llm.generate([prompts_of(1, 1)[0], prompt], [SamplingParams(max_tokens=5), params],
                         use_tqdm=False)[1]
    assert completions([again]) == completions([first])
    # Sample 0 of n=4 is the n=1 request with the same seed.
    single = llm.generate(prompt, SamplingParams(temperature=1.0, seed=42, max_tokens=12,
                                                 ignore_eos=True), use_tqdm=False)[0]
    assert single.outputs[0].token_ids == first.outputs[0].token_ids
    # Memory: the prompt's blocks are shared, so 4 samples take far less than 4 requests.
    peak_shared = peak_used_blocks(llm, [prompt], [params])
    peak_single = peak_used_blocks(llm, [prompt], [SamplingParams(max_tokens=12, ignore_eos=True)])
    assert peak_shared < 4 * peak_single
    assert peak_shared <= peak_single + 3 * 2  # each sample owns at most its last two blocks
    assert llm.llm_engine.get_stats().num_free_blocks == 256


def test_best_of_returns_the_n_most_likely_samples(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=8)
    prompt = prompts_of(1, 2)[0]
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, temperature=1.0, seed=7,
                                               max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    every = llm.generate(prompt, SamplingParams(n=5, temperature=1.0, seed=7, max_tokens=8,
                                                ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert sorted(c.token_ids for c in best.outputs) == sorted(c.token_ids for c in ranked)
    assert [c.index for c in best.outputs] == [0, 1]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_identical_outputs(tiny_dir, mode):
    prompts = prompts_of(12, 3, max_len=40)
    params = [
        SamplingParams(n=3, temperature=0.9, seed=i, max_tokens=24, ignore_eos=True)
        if i % 3 == 0 else SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        for i in range(len(prompts))
    ]
    roomy = LLM(str(tiny_dir), num_kv_blocks=1024, block_size=8)
    expected = completions(roomy.generate(prompts, params, use_tqdm=False))
    tight = LLM(str(tiny_dir), num_kv_blocks=24, block_size=8, preemption_mode=mode,
                swap_space=0.01, enable_prefix_caching=False)
    actual = completions(tight.generate(prompts, params, use_tqdm=False))
    stats = tight.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    if mode == "swap":
        assert stats.num_swap_outs > 0
    else:
        assert stats.num_swap_outs == 0
    assert actual == expected
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_free_cpu_blocks == stats.num_cpu_blocks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_group_preempted_by_recompute_fits_when_it_comes_back(tiny_dir, prefix_caching):
    """Recomputed, the samples of a group share nothing: 3 samples of 20 + 16 tokens need 15
    blocks, more than a 12-block cache, though sharing the prompt they need 12. Such a group
    is refused at the call (it could wait forever after a preemption, and everything behind
    it); one that fits unshared comes back and ends as it would have alone."""
    older = ({"prompt_token_ids": [5] * 48}, SamplingParams(temperature=0, max_tokens=24,
                                                           ignore_eos=True))
    group = {"prompt_token_ids": list(range(10, 30))}
    tight = LLM(str(tiny_dir), num_kv_blocks=12, block_size=8,
                enable_prefix_caching=prefix_caching)
    too_wide = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=16, ignore_eos=True)
    with pytest.raises(ValueError, match="3 sequences of up to 16 .*120 KV cache slots"):
        tight.llm_engine.add_request("too-wide", group, too_wide)
    params = SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True)
    expected = completions(LLM(str(tiny_dir), num_kv_blocks=64, block_size=8).generate(
        [older[0], group], [older[1], params], use_tqdm=False))
    engine = tight.llm_engine
    engine.add_request("older", *older)
    engine.add_request("group", group, params)
    finished = {}
    for _ in range(200):  # a bounded loop: a group that never comes back fails, not hangs
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"older", "group"}
    assert engine.get_stats().num_preemptions > 0
    assert completions([finished["older"], finished["group"]]) == expected


def test_swap_falls_back_to_recompute_when_host_pool_is_full(tiny_dir):
    prompts = prompts_of(8, 4, max_len=40)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = completions(LLM(str(tiny_dir), num_kv_blocks=512, block_size=8).generate(
        prompts, params, use_tqdm=False))
    # Room for 2 blocks on the host only: most preemptions must recompute.
    tiny_swap = LLM(str(tiny_dir), num_kv_blocks=16, block_size=8, preemption_mode="swap",
                    swap_space=2 * 4096 / 2**30, enable_prefix_caching=False)
    assert tiny_swap.llm_engine.get_stats().num_cpu_blocks == 2
    actual = completions(tiny_swap.generate(prompts, params, use_tqdm=False))
    stats = tiny_swap.llm_engine.get_stats()
    assert stats.num_preemptions > stats.num_swap_outs
    assert actual == expected


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny_dir):
    rng = random.Random(5)
    shared = [rng.randrange(3, 512) for _ in range(100)]
    prompts = [{"prompt_token_ids": shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 9))]}
               for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    off = LLM(str(tiny_dir), num_kv_blocks=256, block_size=16, enable_prefix_caching=False)
    expected = completions(off.generate(prompts, params, use_tqdm=False))
    on = LLM(str(tiny_dir), num_kv_blocks=256, block_size=16, enable_prefix_caching=True)
    # The first request fills the cache; the rest arrive after it and hit its 6 full blocks.
    first = completions(on.generate(prompts[:1], params, use_tqdm=False))
    rest = completions(on.generate(prompts[1:], params, use_tqdm=False))
    assert first + rest == expected
    stats_on, stats_off = on.llm_engine.get_stats(), off.llm_engine.get_stats()
    assert stats_on.prefix_cache_hits == 7 * 96
    assert stats_on.prefix_cache_queries == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert stats_on.num_tokens_computed == stats_off.num_tokens_computed - 7 * 96
    assert stats_on.num_free_blocks == stats_on.num_blocks  # cached blocks are free, not lost
    assert stats_on.num_cached_blocks > 0
