"""The 8-bit KV caches (kv_cache_dtype int8 and fp8) beside the features that move KV blocks
around, through the public API: speculative decoding (a model drafting for itself, whose
proposals are all accepted only if its own 8-bit pools hold the bytes and scales the target's
do, after swaps too; n-gram lookup), beam search among other requests, and tensor parallelism
(each rank's pool holding its kv heads' rows and scales)."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams
from tests.spec_decode.helpers import assert_all_blocks_free, completions, repetitive_prompts

KV_DTYPES = ["int8", "fp8"]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_factory):
    return str(tiny_llama_factory(num_heads=4, num_kv_heads=2))


def make_llm(model_dir: str, kv_cache_dtype: str, **kwargs) -> LLM:
    return LLM(model_dir, kv_cache_dtype=kv_cache_dtype,
               **{"num_kv_blocks": 256, "block_size": 8, **kwargs})


def self_draft(model_dir: str) -> dict:
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 4,
            "disable_by_batch_size": 1024}


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_self_drafting_on_an_8bit_cache_accepts_everything_after_swaps(model_dir,
                                                                       kv_cache_dtype):
    prompts = repetitive_prompts(6, seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    want = completions(make_llm(model_dir, kv_cache_dtype).generate(prompts, params,
                                                                     use_tqdm=False))
    llm = make_llm(model_dir, kv_cache_dtype, num_kv_blocks=24, preemption_mode="swap",
                   swap_space=0.01, speculative_config=self_draft(model_dir))
    assert completions(llm.generate(prompts, params, use_tqdm=False)) == want
    stats = llm.llm_engine.get_stats()
    assert stats.num_swap_outs > 0
    assert stats.spec_decode_num_drafts > 0
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_ngram_speculation_on_an_8bit_cache_equals_plain_decoding(model_dir, kv_cache_dtype):
    prompts = repetitive_prompts(8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    want = completions(make_llm(model_dir, kv_cache_dtype).generate(prompts, params,
                                                                     use_tqdm=False))
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "disable_by_batch_size": 1024}
    llm = make_llm(model_dir, kv_cache_dtype, max_num_batched_tokens=37,
                   speculative_config=spec)
    assert completions(llm.generate(prompts, params, use_tqdm=False)) == want
    assert llm.llm_engine.get_stats().spec_decode_num_draft_tokens > 0
    assert_all_blocks_free(llm)


def test_beam_search_on_an_int8_cache_is_the_same_among_others(model_dir):
    rng = random.Random(7)

    def prompt(length: int) -> dict:
        return {"prompt_token_ids": [rng.randrange(3, 512) for _ in range(length)]}

    target = prompt(50)
    crowd = [prompt(rng.randint(1, 80)) for _ in range(4)]
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    alone = make_llm(model_dir, "int8").beam_search([target], params)[0]
    crowded = make_llm(model_dir, "int8", max_num_batched_tokens=29)
    got = crowded.beam_search(crowd[:2] + [target] + crowd[2:], params)[2]
    assert [(s.tokens, s.cum_logprob) for s in got.sequences] == [
        (s.tokens, s.cum_logprob) for s in alone.sequences]


def test_int8_cache_under_tensor_parallelism_gives_the_tokens_of_one_rank(model_dir):
    # fp32, so that the two ranks' split sums pick the same greedy tokens as one rank's.
    prompts = repetitive_prompts(4, seed=6)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    one = make_llm(model_dir, "int8", dtype="float32").generate(prompts, params,
                                                                use_tqdm=False)
    with make_llm(model_dir, "int8", dtype="float32", tensor_parallel_size=2,
                  distributed_executor_backend="mp") as llm:
        two = llm.generate(prompts, params, use_tqdm=False)
        assert_all_blocks_free(llm)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
