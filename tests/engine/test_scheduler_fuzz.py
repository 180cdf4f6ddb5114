"""Random engine settings and request mixes under memory pressure, through the public API.

Each case draws a small KV cache, a block size, a preemption mode (swap with little or no host
room falls back to recompute), prefix caching, max_num_seqs and a token budget, then a few
requests: greedy, seeded samples with n / best_of, and beam searches. Every request the engine
accepts must finish within a bounded number of steps (no group may wait forever after a
preemption), leave every block free, and end exactly as it does on a cache large enough that
nothing is ever preempted.
"""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams

MAX_STEPS = 1500


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


def draw_case(rng: random.Random) -> tuple[dict, list]:
    block_size = rng.choice([4, 8, 16])
    mode = rng.choice(["recompute", "swap"])
    settings = {
        "num_kv_blocks": rng.randint(8, 20), "block_size": block_size, "preemption_mode": mode,
        "swap_space": rng.choice([0.0, 0.0002, 0.01]) if mode == "swap" else 0.0,
        "enable_prefix_caching": rng.random() < 0.5, "max_num_seqs": rng.choice([2, 4, 256]),
        "max_num_batched_tokens": rng.choice([8, 32, 2048]),
    }
    requests = []
    for _ in range(rng.randint(3, 8)):
        prompt = {"prompt_token_ids": [rng.randrange(3, 512)
                                       for _ in range(rng.randint(1, 3 * block_size))]}
        max_tokens = rng.randint(1, 3 * block_size)
        if rng.random() < 0.15:
            params = BeamSearchParams(beam_width=rng.randint(1, 3), max_tokens=max_tokens,
                                      ignore_eos=True)
        else:
            n = rng.randint(1, 3)
            best_of = n + rng.randint(0, 2) if rng.random() < 0.3 else None
            temperature = 1.0 if (best_of or n) > 1 else rng.choice([0.0, 1.0])
            params = SamplingParams(temperature=temperature, seed=rng.randint(0, 99), n=n,
                                    best_of=best_of, max_tokens=max_tokens, ignore_eos=True)
        requests.append((prompt, params))
    return settings, requests


def run(llm: LLM, requests: list) -> dict[str, list[list[int]]]:
    """Adds every request the engine accepts, steps until all finish (bounded); returns each
    finished request's token lists."""
    engine = llm.llm_engine
    accepted = []
    for index, (prompt, params) in enumerate(requests):
        request_id = f"r{index}"
        try:
            if isinstance(params, BeamSearchParams):
                engine.add_beam_search_request(request_id, prompt, params)
            else:
                engine.add_request(request_id, prompt, params)
        except ValueError:
            continue  # refused up front: it could never fit this cache
        accepted.append(request_id)
    finished = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
    assert not engine.has_unfinished_requests(), "requests left after the step limit"
    assert sorted(finished) == sorted(accepted)
    return finished


# Cases 75 and 185 waited forever before the input check counted a recomputed group's
# sequences as unshared (a group preempted by recompute could then never come back).
@pytest.mark.parametrize("case", [*range(48), 75, 185])
def test_random_settings_finish_free_and_match_a_roomy_cache(tiny_dir, case):
    settings, requests = draw_case(random.Random(1000 + case))
    tight = LLM(str(tiny_dir), **settings)
    got = run(tight, requests)
    stats = tight.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_free_cpu_blocks == stats.num_cpu_blocks
    roomy = LLM(str(tiny_dir), num_kv_blocks=512, block_size=settings["block_size"])
    expected = run(roomy, requests)
    assert got == {rid: expected[rid] for rid in got}
