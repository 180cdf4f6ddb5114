"""Speculative decoding with n-gram proposals, through the public API: the output is that of
decoding without speculation (greedy token for token, seeded sampling too, unseeded sampling in
distribution), proposals do get accepted, and every block comes back."""

from __future__ import annotations

from collections import Counter

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.spec_decode.ngram import propose_ngram
from tests.spec_decode.helpers import (
    assert_all_blocks_free,
    assert_same_distribution,
    completions,
    position_counts,
    repetitive_prompts,
    sharp_copy,
)

K = 4
# Tests speculate at every batch size (the default skips batches above 8 sequences).
SPEC = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2, "disable_by_batch_size": 1024}


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


def make_llm(path, speculate: bool, spec: dict = SPEC, **kwargs) -> LLM:
    kwargs = {"num_kv_blocks": 256, "block_size": 8, "seed": 3, **kwargs}
    return LLM(str(path), speculative_config=spec if speculate else None, **kwargs)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return make_llm(tiny_dir, False)


@pytest.fixture(scope="module")
def spec(tiny_dir):
    return make_llm(tiny_dir, True)


def accepted(llm: LLM) -> int:
    return llm.llm_engine.get_stats().spec_decode_num_accepted_tokens


@pytest.mark.parametrize("bad, match", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
    ({"method": "medusa2", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "not built yet"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "takes no model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys"),
    ("ngram", "must be a dict"),
])
def test_bad_settings_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(speculative_config=bad)


def test_ngram_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert propose_ngram(tokens, 3, 2, 4) == [5, 6, 1]  # latest earlier `1 2 3` is at 5
    assert propose_ngram(tokens, 9, 2, 4) == [5, 6, 1, 2, 3]  # as many as there are
    assert propose_ngram([7, 8, 9, 7], 3, 2, 4) == []  # no 2-gram recurs
    assert propose_ngram([7, 8, 9, 7], 3, 1, 4) == [8, 9, 7]
    assert propose_ngram([4, 5, 4, 5], 2, 2, 2) == [4, 5]


def test_greedy_ragged_batch_equals_plain_decoding_with_logprobs(base, spec):
    prompts = repetitive_prompts(6, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=24 + 7 * i, ignore_eos=True,
                             logprobs=2 if i % 2 else None) for i in range(6)]
    before = accepted(spec)
    want = completions(base.generate(prompts, params, use_tqdm=False))
    got = completions(spec.generate(prompts, params, use_tqdm=False))
    assert got == want
    stats = spec.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens > before
    assert stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
    assert sum(stats.spec_decode_num_accepted_tokens_per_pos) == \
        stats.spec_decode_num_accepted_tokens
    assert len(stats.spec_decode_num_accepted_tokens_per_pos) == K
    assert_all_blocks_free(spec)


def test_stops_inside_accepted_runs_cut_where_plain_decoding_does(base, spec):
    prompt = repetitive_prompts(1, seed=2)[0]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    reference = base.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    out = reference.token_ids
    tokenizer = base.get_tokenizer()
    eos = tokenizer.eos_token_id
    params = []
    for i in range(1, 40, 3):  # cut points all along, some inside accepted runs
        params.append(SamplingParams(temperature=0, max_tokens=i, ignore_eos=True))
        params.append(SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                     stop_token_ids=[out[i]]))
        params.append(SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                     stop_token_ids=[out[i]], min_tokens=i + 2))
        text = tokenizer.decode([out[i]]).strip()
        if text:
            params.append(SamplingParams(temperature=0, max_tokens=48, stop=[text],
                                         ignore_eos=True))
    for bias in (3.0, 6.0, 9.0):  # EOS pushed up: it comes at some point, the same with both
        params.append(SamplingParams(temperature=0, max_tokens=48, logit_bias={eos: bias}))
    prompts = [prompt] * len(params)
    before = accepted(spec)
    want = completions(base.generate(prompts, params, use_tqdm=False))
    got = completions(spec.generate(prompts, params, use_tqdm=False))
    assert got == want
    assert accepted(spec) > before
    reasons = Counter(c[2] for o in want for c in o)
    assert reasons["stop"] and reasons["length"]
    assert_all_blocks_free(spec)


def test_requests_added_mid_decode(base, tiny_dir):
    # 1-gram proposals, never paused: many are rejected, some across a block boundary.
    spec = make_llm(tiny_dir, True, {**SPEC, "prompt_lookup_min": 1, "min_acceptance_rate": 0.0})
    prompts = repetitive_prompts(5, seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1)

    def run(llm):
        engine = llm.llm_engine
        finals = {}
        pending = list(enumerate(prompts))
        steps = 0
        while pending or engine.has_unfinished_requests():
            if pending and steps % 3 == 0:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, params)
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
            steps += 1
            # Rollback: between steps no sequence holds a block past its committed tokens.
            for request in engine.scheduler.running:
                for seq in request.live_seqs():
                    table = engine.block_manager.get_block_table(seq.seq_id)
                    assert len(table) <= -(-seq.num_tokens // 8)
        return completions([finals[f"r{i}"] for i in range(len(prompts))])

    assert run(spec) == run(base)
    stats = spec.llm_engine.get_stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    assert_all_blocks_free(spec)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_small_pool_preemption(tiny_dir, mode):
    prompts = repetitive_prompts(6, seed=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kwargs = {"num_kv_blocks": 24, "preemption_mode": mode, "swap_space": 0.01}
    want = completions(make_llm(tiny_dir, False, **kwargs).generate(prompts, params,
                                                                    use_tqdm=False))
    llm = make_llm(tiny_dir, True, **kwargs)
    got = completions(llm.generate(prompts, params, use_tqdm=False))
    assert got == want
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_decode_num_accepted_tokens > 0
    if mode == "swap":
        assert stats.num_swap_outs > 0
    assert_all_blocks_free(llm)


def test_seeded_sampling_n_and_prefix_caching(base, spec):
    prompts = repetitive_prompts(3, seed=5)
    params = SamplingParams(temperature=0.8, top_k=50, n=3, seed=11, max_tokens=30,
                            ignore_eos=True, logprobs=1)
    want = completions(base.generate(prompts, params, use_tqdm=False))
    hits = spec.llm_engine.get_stats().prefix_cache_hits
    first = completions(spec.generate(prompts, params, use_tqdm=False))
    again = completions(spec.generate(prompts, params, use_tqdm=False))  # prefix-cache hits
    # NOTE: a seeded row draws the noise of its position, so speculation changes nothing.
    assert first == again == want
    assert spec.llm_engine.get_stats().prefix_cache_hits > hits
    assert_all_blocks_free(spec)


def test_unseeded_sampling_keeps_the_distribution(tiny_llama_factory, tmp_path):
    # A 64-token vocabulary, and logits six times as sharp as the random model's, so that
    # proposals are accepted often at temperature 1 (as with a trained model) and often
    # rejected too. NOTE: accepting every proposal fails this test with p < 1e-20.
    path = tmp_path / "sharp"
    sharp_copy(tiny_llama_factory(vocab_size=64, num_heads=4, num_kv_heads=2), path)
    prompts = repetitive_prompts(4, seed=6, vocab=64)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    counts = []  # per run: per output position, Counter of (prompt, token)
    for speculate in (False, True):
        # Proposals at almost every step (1-grams recur in a 64-token vocabulary), however
        # often they are rejected.
        llm = make_llm(path, speculate, {**SPEC, "prompt_lookup_min": 1,
                                         "min_acceptance_rate": 0.0},
                       num_kv_blocks=2048, max_num_seqs=256, enable_prefix_caching=False)
        counts.append(position_counts(llm, prompts, params, num_samples=600))
    assert_same_distribution(*counts)
    stats = llm.llm_engine.get_stats()
    # Both branches of the rejection sampler ran, many times.
    assert stats.spec_decode_num_accepted_tokens >= 30
    assert stats.spec_decode_num_draft_tokens - stats.spec_decode_num_accepted_tokens >= 30


def test_beam_search_runs_without_speculation(base, spec):
    prompts = repetitive_prompts(2, seed=7)
    params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)
    drafts = spec.llm_engine.get_stats().spec_decode_num_drafts
    want = [[(b.tokens, b.cum_logprob) for b in o.sequences]
            for o in base.beam_search(prompts, params)]
    got = [[(b.tokens, b.cum_logprob) for b in o.sequences]
           for o in spec.beam_search(prompts, params)]
    assert got == want
    assert spec.llm_engine.get_stats().spec_decode_num_drafts == drafts  # none proposed
    assert_all_blocks_free(spec)


def test_large_batches_and_low_acceptance_skip_speculation(tiny_dir):
    # The default disable_by_batch_size (8): 12 running sequences never propose.
    llm = make_llm(tiny_dir, True, {"method": "ngram", "num_speculative_tokens": K})
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate(repetitive_prompts(12, seed=8), params, use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_decode_num_drafts == 0
    # A sequence whose recent acceptance falls below min_acceptance_rate stops proposing for
    # cooldown_steps steps (here: any rejection, for the rest of the request).
    prompts, params = repetitive_prompts(1, seed=8), SamplingParams(temperature=0, max_tokens=40)
    runs = []
    for rate in (0.0, 1.0):
        llm = make_llm(tiny_dir, True, {**SPEC, "prompt_lookup_min": 1,
                                        "min_acceptance_rate": rate, "cooldown_steps": 1000})
        tokens = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
        stats = llm.llm_engine.get_stats()
        runs.append((tokens, stats.spec_decode_num_drafts,
                     stats.spec_decode_num_draft_tokens - stats.spec_decode_num_accepted_tokens))
        assert_all_blocks_free(llm)
    (tokens_all, drafts_all, _), (tokens_cool, drafts_cool, rejected_cool) = runs
    assert tokens_cool == tokens_all
    assert rejected_cool > 0 and drafts_cool < drafts_all


def test_prometheus_spec_decode_counters(spec):
    from pagedllm.entrypoints.openai.metrics import ServerMetrics

    spec.generate(repetitive_prompts(2, seed=9),
                  SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    stats = spec.llm_engine.get_stats()
    metrics = ServerMetrics("tiny")
    metrics.observe([], stats)
    text = metrics.render().decode()
    assert stats.spec_decode_num_accepted_tokens > 0
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        line = f'pagedllm:spec_decode_{name}_total{{model_name="tiny"}} '
        assert f"{line}{float(getattr(stats, f'spec_decode_{name}'))}" in text
    first = stats.spec_decode_num_accepted_tokens_per_pos[0]
    assert (f'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",'
            f'position="0"}} {float(first)}') in text


def test_serve_flag_takes_json():
    from pagedllm.entrypoints.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    config = EngineConfig(**EngineConfig.kwargs_from_cli_args(args))
    assert config.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-config", "ngram"])


def test_penalties_see_the_proposals_before_each_row(base, tiny_dir):
    # 1-gram proposals, never paused, so that some are accepted despite the penalties. NOTE:
    # mild penalties (stronger ones break the random model's loops: nothing is accepted), too
    # mild for this test to catch proposal rows that ignore the proposals before them.
    spec = make_llm(tiny_dir, True, {**SPEC, "prompt_lookup_min": 1, "min_acceptance_rate": 0.0})
    prompts = repetitive_prompts(3, seed=10)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                            repetition_penalty=1.05, frequency_penalty=0.1)
    assert completions(spec.generate(prompts, params, use_tqdm=False)) == \
        completions(base.generate(prompts, params, use_tqdm=False))
    assert accepted(spec) > 0
    assert_all_blocks_free(spec)
