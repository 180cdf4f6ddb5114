"""Speculative decoding with a draft model, through the public API: a tiny random draft for
another tiny random target of the same vocabulary (proposals mostly rejected), and the target
drafting for itself (every proposal accepted, which also shows that the draft's KV cache holds
what it should after prefix hits, forks, swaps and recomputation). Greedy output equals decoding
without speculation token for token; sampling keeps the distribution with the draft's q."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from tests.spec_decode.helpers import (
    assert_all_blocks_free,
    assert_same_distribution,
    chi_square_p_value,
    completions,
    position_counts,
    repetitive_prompts,
    sharp_copy,
)

K = 4


@pytest.fixture(scope="module")
def target_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def draft_dir(tiny_llama_factory):
    # Smaller in every way but the vocabulary.
    return tiny_llama_factory(num_heads=2, num_kv_heads=1, hidden_size=32, num_layers=1, seed=1)


def draft_spec(model, **extra) -> dict:
    # Tests speculate at every batch size (the default skips batches above 8 sequences).
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": K,
            "disable_by_batch_size": 1024, **extra}


def make_llm(path, spec: dict | None, **kwargs) -> LLM:
    kwargs = {"num_kv_blocks": 256, "block_size": 8, "seed": 3, **kwargs}
    return LLM(str(path), speculative_config=spec, **kwargs)


@pytest.fixture(scope="module")
def base(target_dir):
    return make_llm(target_dir, None)


@pytest.fixture(scope="module")
def drafted(target_dir, draft_dir):
    return make_llm(target_dir, draft_spec(draft_dir))


@pytest.fixture(scope="module")
def self_drafted(target_dir):
    return make_llm(target_dir, draft_spec(target_dir))


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    stats = llm.llm_engine.get_stats()
    return (stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens,
            stats.spec_decode_num_accepted_tokens)


def assert_all_accepted(llm: LLM, before: tuple[int, int, int]) -> None:
    drafts, proposed, accepted = (a - b for a, b in zip(spec_counts(llm), before))
    assert drafts > 0 and accepted == proposed
    stats = llm.llm_engine.get_stats()
    assert sum(stats.spec_decode_num_accepted_tokens_per_pos) == \
        stats.spec_decode_num_accepted_tokens


@pytest.mark.parametrize("bad, match", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"method": "draft_model", "model": "", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 0},
     "num_speculative_tokens"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2,
      "prompt_lookup_max": 3}, "are for method 'ngram'"),
    ({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "not built yet"),
])
def test_bad_settings_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(speculative_config=bad)


def test_a_draft_of_another_vocabulary_is_refused_at_start(tiny_llama_factory, target_dir):
    other = tiny_llama_factory(vocab_size=256, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(target_dir, draft_spec(other))
    with pytest.raises(ValueError, match="does not exist"):
        make_llm(target_dir, draft_spec(target_dir / "missing"))
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        make_llm(target_dir, draft_spec(target_dir), tensor_parallel_size=2)


def test_greedy_ragged_batch_equals_plain_decoding(base, drafted, self_drafted):
    prompts = repetitive_prompts(6, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=24 + 7 * i, ignore_eos=True,
                             logprobs=2 if i % 2 else None) for i in range(6)]
    want = completions(base.generate(prompts, params, use_tqdm=False))
    before = spec_counts(drafted)
    assert completions(drafted.generate(prompts, params, use_tqdm=False)) == want
    drafts, proposed, accepted = (a - b for a, b in zip(spec_counts(drafted), before))
    assert drafts > 0 and proposed >= drafts and accepted <= proposed
    assert_all_blocks_free(drafted)
    before = spec_counts(self_drafted)
    assert completions(self_drafted.generate(prompts, params, use_tqdm=False)) == want
    assert_all_accepted(self_drafted, before)
    assert_all_blocks_free(self_drafted)


def test_stops_inside_accepted_runs_cut_where_plain_decoding_does(base, self_drafted):
    # Drafting for itself, every proposal is accepted: each cut below falls inside a run.
    prompt = repetitive_prompts(1, seed=2)[0]
    reference = base.generate(prompt, SamplingParams(temperature=0, max_tokens=48,
                                                     ignore_eos=True), use_tqdm=False)
    out = reference[0].outputs[0].token_ids
    tokenizer = base.get_tokenizer()
    params = []
    for i in range(1, 40, 3):
        params.append(SamplingParams(temperature=0, max_tokens=i, ignore_eos=True))
        params.append(SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                     stop_token_ids=[out[i]], min_tokens=i + 2))
        text = tokenizer.decode([out[i]]).strip()
        if text:
            params.append(SamplingParams(temperature=0, max_tokens=48, stop=[text],
                                         ignore_eos=True, logprobs=1))
    for bias in (3.0, 6.0, 9.0):  # EOS pushed up: it comes at some point, the same with both
        params.append(SamplingParams(temperature=0, max_tokens=48,
                                     logit_bias={tokenizer.eos_token_id: bias}))
    prompts = [prompt] * len(params)
    before = spec_counts(self_drafted)
    generated = self_drafted.llm_engine.get_stats().num_generation_tokens
    want = completions(base.generate(prompts, params, use_tqdm=False))
    got = self_drafted.generate(prompts, params, use_tqdm=False)
    assert completions(got) == want
    assert_all_accepted(self_drafted, before)
    reasons = Counter(c[2] for o in want for c in o)
    assert reasons["stop"] and reasons["length"]
    # Tokens past a stop string in an accepted run are not generated tokens.
    assert self_drafted.llm_engine.get_stats().num_generation_tokens - generated == \
        sum(len(c.token_ids) for o in got for c in o.outputs)
    assert_all_blocks_free(self_drafted)


def test_requests_added_mid_decode(base, drafted, self_drafted):
    prompts = repetitive_prompts(5, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)

    def run(llm):
        engine = llm.llm_engine
        finals, pending, steps = {}, list(enumerate(prompts)), 0
        while pending or engine.has_unfinished_requests():
            if pending and steps % 3 == 0:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, params)
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
            steps += 1
        return completions([finals[f"r{i}"] for i in range(len(prompts))])

    want = run(base)
    for llm in (drafted, self_drafted):
        before = spec_counts(llm)
        assert run(llm) == want
        assert spec_counts(llm)[0] > before[0]
        assert_all_blocks_free(llm)
    assert_all_accepted(self_drafted, before)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_small_pool_preemption(base, target_dir, mode):
    # Drafting for itself: every proposal still accepted after the draft's blocks were swapped
    # out and in, or freed and recomputed (then partly found in the prefix cache).
    prompts = repetitive_prompts(6, seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # NOTE: greedy output does not depend on the pool (batch invariance): `base` has 256 blocks.
    want = completions(base.generate(prompts, params, use_tqdm=False))
    llm = make_llm(target_dir, draft_spec(target_dir), num_kv_blocks=24, preemption_mode=mode,
                   swap_space=0.01)
    assert completions(llm.generate(prompts, params, use_tqdm=False)) == want
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    if mode == "swap":
        assert stats.num_swap_outs > 0
    assert_all_accepted(llm, (0, 0, 0))
    assert_all_blocks_free(llm)


def test_seeded_sampling_n_and_prefix_caching(drafted, self_drafted):
    prompts = repetitive_prompts(3, seed=5)
    params = SamplingParams(temperature=0.8, top_k=50, n=3, seed=11, max_tokens=20,
                            ignore_eos=True, logprobs=1)
    for llm in (drafted, self_drafted):
        before = spec_counts(llm)
        hits = llm.llm_engine.get_stats().prefix_cache_hits
        first = completions(llm.generate(prompts, params, use_tqdm=False))
        again = completions(llm.generate(prompts, params, use_tqdm=False))  # prefix hits
        # NOTE: the same seed gives the same output (rejection sampling draws seeded noise).
        assert first == again
        assert llm.llm_engine.get_stats().prefix_cache_hits > hits
        assert all(len(c[0]) == 20 for o in first for c in o)
        assert spec_counts(llm)[0] > before[0]
        assert_all_blocks_free(llm)
    # Drafting for itself, q = p: every proposal is accepted (min(1, p/q) = 1).
    assert_all_accepted(self_drafted, before)


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampler_emits_p_whatever_q(k):
    # The first emitted token (the first proposal or the correction) must be distributed as p,
    # the target's row 0, with q far from p (half the mass accepted). NOTE: drawing the
    # correction from p instead of max(p - q, 0) gives token 0 a frequency of 0.3, not 0.4.
    from pagedllm.spec_decode.rejection import rejection_sample

    p_row = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q_row = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])
    p, q = p_row.repeat(k + 1, 1), q_row.repeat(k, 1)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    num_draws = 4000
    first = Counter()
    for _ in range(num_draws):
        proposals = torch.multinomial(q, 1, generator=generator).flatten().tolist()
        tokens = rejection_sample(p, q, proposals, params, 0, 0, generator)
        assert 1 <= len(tokens) <= k + 1 and tokens[:-1] == proposals[: len(tokens) - 1]
        first[tokens[0]] += 1
    expected = Counter({t: int(num_draws * float(v)) for t, v in enumerate(p_row)})
    assert chi_square_p_value(first, expected) > 0.001
    # Seeded: the same (seed, sample, position) gives the same tokens.
    seeded = SamplingParams(temperature=1.0, seed=7)
    runs = [rejection_sample(p, q, [2] * k, seeded, 1, 5, generator) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_sampling_with_the_drafts_q_keeps_the_distribution(tiny_llama_factory, tmp_path):
    # A 64-token vocabulary and sharp logits (as in test_ngram's test); the draft is the
    # target with its LM head perturbed, so that q is close to p but not equal: proposals are
    # accepted often and rejected often. NOTE: accepting every proposal fails this test.
    path = tmp_path / "sharp"
    weights = sharp_copy(tiny_llama_factory(vocab_size=64, num_heads=4, num_kv_heads=2), path)
    draft = tmp_path / "draft"
    shutil.copytree(path, draft)
    generator = torch.Generator().manual_seed(0)
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = head + 1.5 * head.std() * torch.randn(head.shape,
                                                                      generator=generator)
    save_file(weights, draft / "model.safetensors", metadata={"format": "pt"})
    prompts = repetitive_prompts(4, seed=6, vocab=64)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    counts = []  # per run: per output position, Counter of (prompt, token)
    for spec in (None, draft_spec(draft, min_acceptance_rate=0.0)):
        llm = make_llm(path, spec, num_kv_blocks=2048, max_num_seqs=256,
                       enable_prefix_caching=False)
        counts.append(position_counts(llm, prompts, params, num_samples=600))
    assert_same_distribution(*counts)
    _, proposed, accepted = spec_counts(llm)
    assert accepted >= 100 and proposed - accepted >= 100  # both branches, many times
