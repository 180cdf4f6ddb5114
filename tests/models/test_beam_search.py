"""Beam search equals transformers' (num_beams, early_stopping=False, same length penalty)."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, BeamSearchParams


def hf_beams(model, prompt: list[int], width: int, max_new: int, length_penalty: float):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        num_beams=width,
        num_return_sequences=width,
        do_sample=False,
        max_new_tokens=max_new,
        early_stopping=False,
        length_penalty=length_penalty,
        pad_token_id=0,
    )
    beams = []
    for row in out.tolist():
        generated = row[len(prompt):]
        eos = model.generation_config.eos_token_id
        if eos is not None and eos in generated:  # drop the padding after EOS
            generated = generated[: generated.index(eos) + 1]
        beams.append(generated)
    return beams


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_tiny_model_beams_match_transformers(tiny_dir, width, length_penalty):
    from hf_reference import load_hf_model

    hf = load_hf_model(tiny_dir)
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=4)
    rng = random.Random(width * 10 + int(length_penalty * 2))
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    params = BeamSearchParams(beam_width=width, max_tokens=12, ignore_eos=True,
                              length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        assert len(output.sequences) == width
        ours = [seq.tokens[len(prompt):] for seq in output.sequences]
        assert ours == hf_beams(hf, prompt, width, 12, length_penalty)
    assert llm.llm_engine.get_stats().num_free_blocks == 256


def test_beams_share_blocks_while_running(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=4, enable_prefix_caching=False)
    engine = llm.llm_engine
    engine.add_beam_search_request("beams", {"prompt_token_ids": list(range(5, 45))},
                                   BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True))
    shared_seen = False
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.get_stats()
        used = stats.num_blocks - stats.num_free_blocks
        # Four beams over a 40-token prompt: the 10 prompt blocks are stored once.
        if stats.num_logical_blocks >= 4 * 10:
            shared_seen = True
            assert used <= 10 + 4 * 3
    assert shared_seen
    assert engine.get_stats().num_free_blocks == 256


@pytest.mark.slow
def test_smollm2_beams_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    llm = LLM(str(smollm2_dir), num_kv_blocks=256)
    tokenizer = llm.get_tokenizer()
    prompts = ["The capital of France is", "def add(a, b):", "My favourite fruit is"]
    for width in (2, 4):
        params = BeamSearchParams(beam_width=width, max_tokens=12)
        outputs = llm.beam_search(prompts, params)
        for text, output in zip(prompts, outputs):
            prompt = tokenizer.encode(text)
            ours = [seq.tokens[len(prompt):] for seq in output.sequences]
            assert ours == hf_beams(hf, prompt, width, 12, 1.0)
            assert output.sequences[0].text.startswith(text)


def test_extreme_length_penalties_saturate_instead_of_failing(tiny_dir):
    """12 ** 400 overflows a float and 12 ** -400 is 0: scores saturate (to -0.0, -inf), and
    beams of one length keep the order of their log-probabilities, as with any penalty."""
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=4)
    prompt = {"prompt_token_ids": [7, 300, 41, 99]}

    def beams(length_penalty: float) -> list[list[int]]:
        params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True,
                                  length_penalty=length_penalty)
        return [seq.tokens for seq in llm.beam_search(prompt, params)[0].sequences]

    assert beams(400.0) == beams(-400.0) == beams(1.0)
    assert llm.llm_engine.get_stats().num_free_blocks == 256


def test_beam_search_params_are_checked():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=True, max_tokens=4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="length_penalty"):
            BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=bad)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.5)
