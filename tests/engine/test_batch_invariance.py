"""Batch invariance through the public API: a request's tokens and logprobs are bit for bit the
same whatever else runs in its steps, however its prompt is chunked, after a prefix-cache hit
on its first blocks and after preemption by recompute or by swap, in fp32 and bf16.

Scenario: one target request (a 520-token prompt, so that a request alone has its keys split
over both threads; greedy with logprobs, or seeded sampling with n=2 siblings) is run alone on
a fresh engine; that is the reference. Then the same request runs
  - among others of random lengths and budgets (the step's row count changes every step),
  - prefilled in chunks of a small, odd token budget (alone, and among others),
  - after a request that shares its first blocks (a prefix-cache hit),
  - on a cache too small for everything, preempted by recompute, or swapped out and back,
and each time its completions (token ids, per-token logprobs with ranks and top-k, cumulative
logprob) must equal the reference's exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.beam_search import BeamSearchParams

BLOCK_SIZE = 16
TARGET_LEN = 520
MAX_TOKENS = 20
# The tiny model: head size 64 (the bf16 dot-product attention paths need a multiple of 32),
# two query heads per kv head, contexts past 512 (split key ranges).
TINY = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2,
        "max_position_embeddings": 1024}


def random_prompt(rng: random.Random, length: int, vocab: int = 512) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def target_params(kind: str) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    return SamplingParams(temperature=0.9, seed=1234, n=2, max_tokens=MAX_TOKENS,
                          ignore_eos=True, logprobs=2)


def others(rng: random.Random, num: int, max_len: int, vocab: int = 512) -> list[tuple]:
    """`num` (prompt, params) of random lengths and budgets, greedy and sampled."""
    result = []
    for _ in range(num):
        prompt = random_prompt(rng, rng.randint(1, max_len), vocab)
        params = (SamplingParams(temperature=0, max_tokens=rng.randint(1, 2 * MAX_TOKENS),
                                 ignore_eos=True)
                  if rng.random() < 0.5 else
                  SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 2 * MAX_TOKENS),
                                 ignore_eos=True, logprobs=1))
        result.append((prompt, params))
    return result


@dataclass
class Result:
    """What must not change: per completion, tokens, logprob dicts and cumulative logprob."""

    completions: list[tuple]

    @classmethod
    def of(cls, output) -> Result:
        return cls([
            (c.token_ids,
             [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in c.logprobs or []],
             c.cumulative_logprob)
            for c in output.outputs
        ])


def run(llm: LLM, target: list[int], params: SamplingParams, crowd: list[tuple] = (),
        position: int = 0) -> Result:
    """Generates the target with `crowd` queued around it (the target at `position`)."""
    prompts = [{"prompt_token_ids": p} for p, _ in crowd]
    params_list = [p for _, p in crowd]
    prompts.insert(position, {"prompt_token_ids": target})
    params_list.insert(position, params)
    outputs = llm.generate(prompts, params_list, use_tqdm=False)
    return Result.of(outputs[position])


def difference(got: Result, expected: Result) -> str | None:
    """Where `got` first departs from `expected`, in words; None where they are the same."""
    if len(got.completions) != len(expected.completions):
        return f"{len(got.completions)} completions instead of {len(expected.completions)}"
    for i, (g, e) in enumerate(zip(got.completions, expected.completions)):
        if g[0] != e[0]:
            first = next((j for j, (a, b) in enumerate(zip(g[0], e[0])) if a != b), None)
            return f"completion {i}: tokens differ from token {first}"
        for j, (step_g, step_e) in enumerate(zip(g[1], e[1])):
            if step_g != step_e:
                return f"completion {i}: logprobs of token {j} differ ({step_g} != {step_e})"
        if g[2] != e[2]:
            return f"completion {i}: cumulative logprob {g[2]} != {e[2]}"
    return None


def crowd_failures(model: str, base: dict, vocab: int = 4096) -> list[str]:
    """A greedy request of 200 tokens alone, then among 6 others of random lengths with a
    budget of 2048 tokens and with chunked prefill (61): where it departs from alone (the
    quantized-path files' check)."""
    rng = random.Random(0)
    target = random_prompt(rng, 200, vocab=vocab)
    params = target_params("greedy")
    reference = run(LLM(model, **base), target, params)
    failures = []
    for budget in [2048, 61]:
        crowd = others(rng, 6, max_len=150, vocab=vocab)
        llm = LLM(model, **dict(base, max_num_batched_tokens=budget))
        problem = difference(run(llm, target, params, crowd, rng.randint(0, len(crowd))),
                             reference)
        if problem is not None:
            failures.append(f"budget {budget}: {problem}")
    return failures


def record_preemptions(llm: LLM) -> list[tuple[str, int]]:
    """Records (request id, tokens it had generated) for each preemption from now on."""
    scheduler = llm.llm_engine.scheduler
    seen: list[tuple[str, int]] = []
    real = scheduler._preempt

    def recording(request, out):
        seen.append((request.request_id, request.seqs[0].num_output_tokens))
        return real(request, out)

    scheduler._preempt = recording
    return seen


# Blocks of room past what the target needs, tried in this order (for each length of the
# others' prompts) until it is preempted mid-decode: how soon that happens hangs on the
# lengths; the first usually does.
PREEMPTION_SLACKS = (8, 4, 0, 12, 16, 24, 32)


def run_preempted(model_dir: str, base: dict, mode: str, target: list[int],
                  params: SamplingParams, seed: int, vocab: int) -> list[Result]:
    """The target on a cache with room for it and a few blocks more, queued behind three
    long-running requests: it, the latest arrival, is preempted (by `mode`) when they grow.
    Tries PREEMPTION_SLACKS until the target is preempted mid-decode; returns every try's
    result."""
    # The engine refuses a request that may need more than the cache: n sequences' worth.
    need = params.n * -(-(len(target) + MAX_TOKENS) // BLOCK_SIZE)
    greedy = SamplingParams(temperature=0, max_tokens=6 * MAX_TOKENS, ignore_eos=True)
    results = []
    # n = 2 siblings share their prompt's blocks: the others must take more.
    for length in (40, 100) if params.n == 1 else (200, 300):
        rng = random.Random(seed)
        crowd = [(random_prompt(rng, rng.randint(length - 30, length), vocab), greedy)
                 for _ in range(3)]
        for slack in PREEMPTION_SLACKS:
            llm = LLM(model_dir, **dict(base, num_kv_blocks=need + slack,
                                        max_num_batched_tokens=128, preemption_mode=mode,
                                        enable_prefix_caching=False,
                                        swap_space=0.05 if mode == "swap" else 0.0))
            seen = record_preemptions(llm)
            results.append(run(llm, target, params, crowd, len(crowd)))
            if any(num for request_id, num in seen if request_id == f"offline-{len(crowd)}"):
                assert mode != "swap" or llm.llm_engine.get_stats().num_swap_outs > 0
                return results
    raise AssertionError(f"{mode}: the target was never preempted mid-decode")


def check_scenarios(model_dir: str, dtype: str, kind: str, seed: int, num_others: int,
                    vocab: int = 512, target_len: int = TARGET_LEN,
                    scenarios: tuple[str, ...] = ("crowd", "chunked", "chunked-crowd",
                                                  "prefix-hit", "recompute", "swap"),
                    engine_kwargs: dict | None = None) -> None:
    rng = random.Random(seed)
    target = random_prompt(rng, target_len, vocab)
    params = target_params(kind)
    base = {"dtype": dtype, "block_size": BLOCK_SIZE, "num_kv_blocks": 256, "seed": seed,
            **(engine_kwargs or {})}
    reference = run(LLM(model_dir, **base), target, params)
    assert len(reference.completions) == params.n

    failures = []
    for scenario in scenarios:
        crowd = others(rng, num_others, max_len=300, vocab=vocab)
        position = rng.randint(0, len(crowd))
        kwargs = dict(base)
        if scenario.startswith("chunked"):
            kwargs["max_num_batched_tokens"] = rng.choice([29, 61, 97, 200])
            if scenario == "chunked":
                crowd, position = [], 0
        if scenario in ("recompute", "swap"):
            for result in run_preempted(model_dir, base, scenario, target, params, seed, vocab):
                problem = difference(result, reference)
                if problem is not None:
                    failures.append(f"{scenario}: {problem}")
            continue
        llm = LLM(model_dir, **kwargs)
        if scenario == "prefix-hit":
            # A request sharing the target's first 320 tokens (20 blocks) fills the cache.
            run(llm, target[:320] + random_prompt(rng, 40, vocab),
                SamplingParams(temperature=0, max_tokens=3))
            hits_before = llm.llm_engine.get_stats().prefix_cache_hits
        got = run(llm, target, params, crowd, position)
        problem = difference(got, reference)
        if problem is not None:
            failures.append(f"{scenario}: {problem}")
        if scenario == "prefix-hit":
            assert llm.llm_engine.get_stats().prefix_cache_hits - hits_before >= 256
    assert not failures, f"{dtype}, {kind}: not invariant in\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return str(tiny_llama_factory(**TINY))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_request_is_batch_invariant(tiny_dir, dtype: str, kind: str) -> None:
    check_scenarios(tiny_dir, dtype, kind, seed=0 if kind == "greedy" else 1, num_others=6)


@pytest.mark.parametrize("dtype,kv_cache_dtype", [("float32", "int8"), ("bfloat16", "int8"),
                                                  ("bfloat16", "fp8")])
def test_8bit_kv_cache_is_batch_invariant(tiny_dir, dtype: str, kv_cache_dtype: str) -> None:
    # Every scenario reads the bytes the target's own steps wrote (a prefix hit those of the
    # request before it, a swapped-in block those copied out and back, scales and all).
    check_scenarios(tiny_dir, dtype, "greedy", seed=2, num_others=6,
                    engine_kwargs={"kv_cache_dtype": kv_cache_dtype})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_beam_search_is_batch_invariant(tiny_dir, dtype: str) -> None:
    rng = random.Random(5)
    target = {"prompt_token_ids": random_prompt(rng, 90)}
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    alone = LLM(tiny_dir, dtype=dtype, num_kv_blocks=256, block_size=BLOCK_SIZE)
    expected = alone.beam_search([target], params)[0]
    crowded = LLM(tiny_dir, dtype=dtype, num_kv_blocks=256, block_size=BLOCK_SIZE,
                  max_num_batched_tokens=53)
    crowd = [{"prompt_token_ids": random_prompt(rng, rng.randint(1, 200))} for _ in range(5)]
    got = crowded.beam_search(crowd[:2] + [target] + crowd[2:], params)[2]
    assert [(s.tokens, s.cum_logprob) for s in got.sequences] == [
        (s.tokens, s.cum_logprob) for s in expected.sequences]


def test_smollm2_bf16_is_batch_invariant(smollm2_dir) -> None:
    check_scenarios(str(smollm2_dir), "bfloat16", "greedy", seed=2, num_others=4, vocab=49152,
                    target_len=300, scenarios=("crowd", "chunked", "prefix-hit"))


def save_family(tokenizer_dir, path, family: str) -> str:
    """A tiny random GPT-2 or OPT of TINY's width (head size 64) for contexts past 512."""
    from hf_reference import save_tiny_model
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    common = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=1024,
                                           **common))
    else:
        model = OPTForCausalLM(OPTConfig(hidden_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, ffn_dim=512,
                                         max_position_embeddings=1024, **common))
    return str(save_tiny_model(model, path, tokenizer_dir))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_gpt2_and_opt_bf16_are_batch_invariant(tokenizer_dir, tmp_path, family: str) -> None:
    # Their own parts (LayerNorm, GELU/ReLU, learned positions, biases in every projection)
    # on the shared kernels: one crowd, one chunked prefill, one prefix-cache hit.
    model_dir = save_family(tokenizer_dir, tmp_path, family)
    check_scenarios(model_dir, "bfloat16", "greedy", seed=3, num_others=5,
                    scenarios=("chunked-crowd", "prefix-hit"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", range(4))
def test_request_is_batch_invariant_randomized(tiny_llama_factory, dtype: str, seed: int) -> None:
    # Other shapes too: MHA with head size 32, GQA with head size 20 (scalar tails), MQA.
    shapes = [TINY, dict(TINY, num_kv_heads=4, hidden_size=128),
              dict(TINY, hidden_size=80, num_heads=4, num_kv_heads=2),
              dict(TINY, num_kv_heads=1, hidden_size=512)]
    model_dir = str(tiny_llama_factory(**shapes[seed % len(shapes)]))
    rng = random.Random(100 + seed)
    check_scenarios(model_dir, dtype, rng.choice(["greedy", "seeded"]), seed=100 + seed,
                    num_others=rng.randint(1, 40), target_len=rng.randint(300, 700))


@pytest.mark.slow
def test_issue_reproductions_give_one_answer(smollm2_dir) -> None:
    # Issue 29's reproductions, offline: SmolLM2 in bf16 on a 160-block cache. A prefix-cache
    # hit (the same prompt three times) and other traffic (16 completions alongside) changed
    # the greedy answer.
    llm = LLM(str(smollm2_dir), dtype="bfloat16", num_kv_blocks=160, block_size=16)
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=1)
    poem = "Écris un poème sur la mer 🌊 et le vent:"
    answers = [Result.of(llm.generate(poem, greedy, use_tqdm=False)[0]) for _ in range(3)]
    assert answers[1] == answers[0] and answers[2] == answers[0]
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    press = "The history of the printing press began"
    alone = Result.of(llm.generate(press, greedy, use_tqdm=False)[0])
    rng = random.Random(29)
    words = ["sea", "wind", "history", "paper", "ink", "press", "type", "metal", "book", "city",
             "river", "light", "music", "science", "war", "peace", "king", "letter", "school"]
    others = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(16)]
    crowd = [SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randint(8, 64))
             for i in range(16)]
    outputs = llm.generate(others[:8] + [press] + others[8:], crowd[:8] + [greedy] + crowd[8:],
                           use_tqdm=False)
    assert Result.of(outputs[8]) == alone
