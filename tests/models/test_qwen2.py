"""Qwen2 (`Qwen2ForCausalLM`): greedy tokens equal transformers' generate on tiny random
models (q/k/v biases; GQA and a tied head; sliding-window layers)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

CONFIGS = {
    # Qwen2.5-0.5B's shape: GQA, a tied head, no window.
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    # Layer 1 slides over 16 positions, layer 0 attends to everything; an untied head.
    "window-layer-1": {"num_key_value_heads": 4, "tie_word_embeddings": False,
                       "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
}


@pytest.fixture(scope="module")
def qwen2_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_model_builder(Qwen2Config, Qwen2ForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def test_sliding_window_layers_under_a_small_pool_match_transformers(qwen2_dir):
    check_fp32(qwen2_dir("window-layer-1"), num_kv_blocks=24)


@pytest.mark.slow
def test_gqa_tied_matches_transformers(qwen2_dir):
    check_fp32(qwen2_dir("gqa-tied"))


def test_bfloat16_stays_within_transformers_top3(qwen2_dir):
    check_bf16(qwen2_dir("gqa-tied"))


def test_beams_samples_and_prefix_hits_match_transformers(qwen2_dir):
    """On the windowed Qwen2, one LLM: beam search equals transformers' (num_beams), n = 3
    top-1 samples each equal the greedy tokens, and prompts sharing a 40-token prefix,
    computed again from the prefix cache, too."""
    from family_tests import MAX_TOKENS
    from hf_reference import greedy_token_ids, hf_greedy, load_hf_model, token_prompts
    from test_beam_search import hf_beams

    from pagedllm import LLM, BeamSearchParams, SamplingParams

    model_dir = qwen2_dir("window-layer-1")
    hf = load_hf_model(model_dir)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=200, block_size=8,
              enable_prefix_caching=True)
    prompts = [[7 + i for i in range(n)] for n in (5, 23)]
    beams = llm.beam_search(token_prompts(prompts),
                            BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True))
    for prompt, output in zip(prompts, beams):
        assert [s.tokens[len(prompt):] for s in output.sequences] == hf_beams(hf, prompt, 3, 10,
                                                                              1.0)
    # n = 3 forks of each prompt, sampled with top_k = 1: each sample is the greedy one.
    top1 = SamplingParams(n=3, temperature=1.0, top_k=1, seed=0, max_tokens=MAX_TOKENS,
                          ignore_eos=True)
    out = llm.generate(token_prompts(prompts), top1, use_tqdm=False)
    expected = hf_greedy(hf, prompts, MAX_TOKENS)
    assert [[c.token_ids for c in o.outputs] for o in out] == [[e] * 3 for e in expected]
    prefix = [100 + i for i in range(40)]
    shared = [prefix + [3 + i, 4 + i] for i in range(4)]
    first = greedy_token_ids(llm, shared, MAX_TOKENS)
    hits = llm.llm_engine.get_stats().prefix_cache_hits
    again = greedy_token_ids(llm, shared, MAX_TOKENS)
    assert llm.llm_engine.get_stats().prefix_cache_hits >= hits + 4 * 40
    assert first == again == hf_greedy(hf, shared, MAX_TOKENS)
    assert llm.llm_engine.get_stats().num_free_blocks == 200


def test_a_config_contradicting_its_weights_is_refused(qwen2_dir, tmp_path):
    """A missing bias and a wrong shape are ValueErrors naming the tensor, at LLM(path)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from pagedllm import LLM

    model_dir = shutil.copytree(qwen2_dir("gqa-tied"), tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        LLM(str(model_dir), num_kv_blocks=16)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the weights hold 2 kv heads
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape .* but the config makes it"):
        LLM(str(model_dir), num_kv_blocks=16)
