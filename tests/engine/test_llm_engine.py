"""Engine behaviour through the public API: sampling, stops, logprobs, bad input, freeing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagedllm import LLM, SamplingParams

NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), num_kv_blocks=NUM_BLOCKS, block_size=8, seed=7)


def prompts_of(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(2, 30))]}
        for _ in range(n)
    ]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_running == stats.num_waiting == 0
    assert not llm.llm_engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    target = prompts_of(1, seed=10)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(llm.generate(target, seeded, use_tqdm=False))[0]
    others = prompts_of(7, seed=11)
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = others[:3] + [target] + others[3:]
    params = [unseeded] * 3 + [seeded] + [unseeded] * 4
    in_batch = tokens(llm.generate(batch, params, use_tqdm=False))[3]
    assert alone == in_batch
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert tokens(llm.generate(target, other_seed, use_tqdm=False))[0] != alone
    assert_all_blocks_free(llm)


def test_temperature_zero_and_top_k_one_equal_greedy(llm):
    prompts = prompts_of(6, seed=12)
    greedy = tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16,
                                                         ignore_eos=True), use_tqdm=False))
    top_k_1 = tokens(llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, seed=3,
                                                          max_tokens=16, ignore_eos=True),
                                  use_tqdm=False))
    assert greedy == top_k_1


def test_stop_strings_cut_the_text_exactly(llm):
    prompt = prompts_of(1, seed=13)[0]
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[5:9]
    first = text.find(stop)
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:first]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: first + len(stop)]
    # The tokens stop at the token that completed the stop string.
    assert base.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert len(cut.token_ids) < len(base.token_ids)
    assert_all_blocks_free(llm)


def test_min_tokens_holds_stop_strings_back(llm):
    """As vLLM has it: a stop string ends nothing before min_tokens tokens; from then on, only
    text added after that point is searched."""
    prompt = prompts_of(1, seed=13)[0]
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = base.text[5:9]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop"
    min_tokens = len(cut.token_ids) + 2
    held = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop=[stop], min_tokens=min_tokens),
                        use_tqdm=False)[0].outputs[0]
    # Same greedy tokens, no stop before min_tokens; where the text checked after it (its
    # last min_tokens-th token's text on) holds the stop string again, it stops there.
    assert held.token_ids == base.token_ids[: len(held.token_ids)]
    assert len(held.token_ids) > min_tokens
    checked_from = len(llm.get_tokenizer().decode(base.token_ids[:min_tokens]))
    later = base.text.find(stop, checked_from - len(stop) + 1)
    if later == -1:
        assert held.finish_reason == "length" and held.text == base.text
    else:
        assert held.finish_reason == "stop" and held.text == base.text[:later]
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_max_tokens(llm):
    prompt = prompts_of(1, seed=14)[0]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    base = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == base.token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id


def test_logprobs_match_the_model_distribution(llm, tiny_dir):
    from hf_reference import load_hf_model

    prompt = prompts_of(1, seed=15)[0]["prompt_token_ids"]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    model = load_hf_model(tiny_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    assert len(out.logprobs) == 6
    total = 0.0
    for step, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top3 = torch.topk(expected[step], 3)
        ranked = sorted((lp.rank, t) for t, lp in entry.items())
        assert [t for _, t in ranked[:3]] == top3.indices.tolist()
        for t, lp in entry.items():
            assert math.isclose(lp.logprob, expected[step, t].item(), abs_tol=1e-4)
        assert entry[token_id].rank == 1  # greedy picks the top token
        total += entry[token_id].logprob
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-6)


def test_cumulative_logprob_only_where_it_is_needed(llm, tiny_dir):
    """None without logprobs (as in vLLM: the sampler then skips its exps); with best_of > n,
    the sum of the chosen tokens' logprobs under the model's distribution."""
    from hf_reference import load_hf_model

    prompt = prompts_of(1, seed=16)[0]["prompt_token_ids"]
    plain = llm.generate({"prompt_token_ids": prompt},
                         [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)],
                         use_tqdm=False)[0].outputs[0]
    assert plain.cumulative_logprob is None and plain.logprobs is None
    best = llm.generate({"prompt_token_ids": prompt},
                        SamplingParams(temperature=1.0, seed=3, n=1, best_of=2, max_tokens=4,
                                       ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    model = load_hf_model(tiny_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + best.token_ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    total = sum(expected[step, t].item() for step, t in enumerate(best.token_ids))
    assert math.isclose(best.cumulative_logprob, total, abs_tol=1e-4)


def test_abort_frees_blocks_and_others_finish(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts_of(4, seed=16)):
        engine.add_request(f"abort-{i}", p, params)
    engine.step()
    engine.step()
    aborted = engine.abort_request("abort-1")
    assert aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["abort-0", "abort-2", "abort-3"]
    assert all(len(o.outputs[0].token_ids) == 12 for o in done.values())
    assert_all_blocks_free(llm)


def test_step_can_return_only_finished_outputs(llm):
    # What LLM.generate asks for: the same final outputs, no per-step ones for running requests.
    engine = llm.llm_engine
    prompts = prompts_of(3, seed=21)
    lengths = [3, 6, 9]
    results = []
    for finished_only in (False, True):
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(f"final-{finished_only}-{i}", p,
                               SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        per_step, final = [], {}
        while engine.has_unfinished_requests():
            outputs = engine.step(finished_only=finished_only)
            per_step.append(len(outputs))
            final.update({o.request_id[-1]: o for o in outputs if o.finished})
        results.append((per_step, {k: (o.outputs[0].token_ids, o.outputs[0].text)
                                   for k, o in final.items()}))
    (all_steps, all_final), (finished_steps, finished_final) = results
    assert all_final == finished_final and sorted(finished_final) == ["0", "1", "2"]
    assert max(all_steps) == 3 and sum(finished_steps) == 3
    assert_all_blocks_free(llm)


def test_stats_count_tokens_and_reserved_slots(llm):
    engine = llm.llm_engine
    engine.add_request("stats", {"prompt_token_ids": list(range(3, 22))},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # prefill of 19 tokens: 3 blocks of 8
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_tokens_stored, stats.num_slots_reserved) == (1, 19, 24)
    assert stats.num_free_blocks == NUM_BLOCKS - 3
    engine.abort_request("stats")
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    "bad_prompt, message",
    [
        ("", "empty"),
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [5, 512]}, "outside the vocabulary"),
        ({"prompt_token_ids": [5, -1]}, "outside the vocabulary"),
        ({"prompt_token_ids": [5] * 600}, "max_model_len"),
        (42, "prompt must be"),
    ],
)
def test_generate_rejects_a_bad_prompt_by_index_before_any_work(llm, bad_prompt, message):
    prompts = prompts_of(3, seed=17)
    prompts.insert(2, bad_prompt)
    with pytest.raises(ValueError, match=rf"prompt 2: .*{message}"):
        llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    assert_all_blocks_free(llm)


def test_generate_rejects_a_request_larger_than_the_whole_cache(tiny_dir):
    small = LLM(str(tiny_dir), num_kv_blocks=8, block_size=8)  # 64 slots
    with pytest.raises(ValueError, match="prompt 0: .*KV cache slots"):
        small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=60),
                       use_tqdm=False)
    out = small.generate({"prompt_token_ids": [5] * 10},
                         SamplingParams(max_tokens=54, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 54


def test_max_tokens_none_runs_as_far_as_the_cache_holds(tiny_dir, caplog):
    """Without max_tokens a request generates to the end of the context, or, with a cache
    smaller than the context, as far as the whole cache takes it (instead of being refused);
    the engine says so when it starts."""
    with caplog.at_level("WARNING", logger="pagedllm.engine.llm_engine"):
        small = LLM(str(tiny_dir), num_kv_blocks=8, block_size=8)  # 64 slots, context 512
    assert "the KV cache holds 64 tokens, fewer than max_model_len (512)" in caplog.text
    prompt = {"prompt_token_ids": [5] * 10}
    out = small.generate(prompt, SamplingParams(max_tokens=None, ignore_eos=True),
                         use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 54
    assert out[0].outputs[0].finish_reason == "length"
    # Two samples share the prompt's 2 blocks; each may fill its own and copy the shared tail:
    # (8 - 2) // 2 - 1 = 2 blocks of its own, 16 tokens.
    out = small.generate(prompt, SamplingParams(n=2, temperature=1.0, max_tokens=None,
                                                ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in out[0].outputs] == [16, 16]
    assert_all_blocks_free(small)


def test_groups_that_could_never_be_scheduled_are_refused(tiny_dir):
    """A sequence group runs whole: wider than max_num_seqs, or larger than the cache in the
    worst case, it would wait forever, so it is refused up front and the others still run."""
    from pagedllm import BeamSearchParams

    small = LLM(str(tiny_dir), num_kv_blocks=16, block_size=8, max_num_seqs=2)  # 128 slots
    prompt = {"prompt_token_ids": [5] * 10}
    with pytest.raises(ValueError, match="3 sequences at once.*max_num_seqs is 2"):
        small.generate(prompt, SamplingParams(n=3, temperature=1.0), use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_seqs is 2"):
        small.generate(prompt, SamplingParams(n=1, best_of=3, temperature=1.0), use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_seqs is 2"):
        small.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=4))
    with pytest.raises(ValueError, match="2 sequences of up to 60 .*KV cache slots"):
        small.generate(prompt, SamplingParams(n=2, temperature=1.0, max_tokens=60),
                       use_tqdm=False)
    with pytest.raises(ValueError, match="KV cache slots"):
        small.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=60))
    out = small.generate(prompt, SamplingParams(n=2, temperature=1.0, max_tokens=40,
                                                ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in out[0].outputs] == [40, 40]
    assert_all_blocks_free(small)


@pytest.mark.parametrize("settings, message", [
    ({"model": 123}, "model must be a path"),
    ({"block_size": True}, "block_size"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching"),
    ({"swap_space": float("nan")}, "swap_space"),
    ({"swap_space": 10**6}, "GiB of host memory"),
    ({"num_kv_blocks": 10**9}, "GiB of host memory"),
])
def test_engine_settings_the_host_cannot_hold_or_take_are_refused(tiny_dir, settings, message):
    """Pools are written in full at start: one larger than the host's memory would grow until
    the OOM killer ended the process, so it is refused before anything is allocated."""
    kwargs = {"model": str(tiny_dir), **settings}
    with pytest.raises(ValueError, match=message):
        LLM(**kwargs)


def test_unreadable_model_directories_say_what_is_wrong(tiny_dir, tmp_path):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors.* cannot be read"):
        LLM(str(corrupt))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(tiny_dir, untokenized)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (untokenized / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no tokenizer in"):
        LLM(str(untokenized))


def test_invalid_sampling_params_name_the_field():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=2, best_of=1)


def test_add_request_refuses_bad_input_while_running_requests_complete(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    good = prompts_of(2, seed=18)
    expected = tokens(llm.generate(good, params, use_tqdm=False))
    engine.add_request("good-0", good[0], params)
    engine.step()
    engine.add_request("good-1", good[1], params)
    for bad in ("", {"prompt_token_ids": [10**6]}, {"prompt_token_ids": [5] * 700}):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good-0", good[0], params)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request("bad", good[0], {"temperature": 0})
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("bad", good[0], SamplingParams(logit_bias={10**6: 1.0}))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done["good-0"], done["good-1"]] == expected
    assert_all_blocks_free(llm)


def test_profile_breaks_each_step_down(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8, profile=True)
    llm.generate(prompts_of(3, seed=19), SamplingParams(temperature=0, max_tokens=5,
                                                        ignore_eos=True), use_tqdm=False)
    profiler = llm.llm_engine.profiler
    assert profiler.num_steps == 5  # one prefill step, four decode steps
    seconds = profiler.seconds
    for section in ("schedule", "prepare inputs", "forward", "attention block", "mlp",
                    "lm head", "sampling", "update", "output processing"):
        assert seconds[section] > 0, section
    assert seconds["forward"] >= seconds["attention block"] + seconds["mlp"]
    assert seconds["step"] >= seconds["forward"]
    assert "attention block" in profiler.report()


def test_a_prompt_is_encoded_once_and_checked_once(tiny_llama_factory, monkeypatch):
    # The tokenizer's full vocabulary, so text prompts are valid.
    llm = LLM(str(tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)),
              num_kv_blocks=16)
    engine = llm.llm_engine
    tokenizer = engine.get_tokenizer()
    encoded: list[str] = []
    checked: list[object] = []
    real_encode, real_process = tokenizer.encode, engine.input_processor.process

    def counting_encode(text, *args, **kwargs):
        encoded.append(text)
        return real_encode(text, *args, **kwargs)

    def counting_process(prompt, *args, **kwargs):
        checked.append(prompt)
        return real_process(prompt, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", counting_encode)
    monkeypatch.setattr(engine.input_processor, "process", counting_process)
    prompts = ["The quick brown fox", "jumps over the lazy dog"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    assert encoded == prompts
    assert checked == prompts
    assert [o.prompt_token_ids for o in outputs] == [real_encode(p) for p in prompts]
    # A ProcessedRequest is queued as it is: no second check.
    processed = engine.process_inputs("one more", SamplingParams(max_tokens=2))
    checked.clear()
    engine.add_request("pre-processed", processed)
    assert checked == []
    with pytest.raises(ValueError, match="carries its own params"):
        engine.add_request("twice", processed, SamplingParams())
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)
