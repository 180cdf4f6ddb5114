"""The shipped SmolLM2-135M-Instruct: greedy tokens equal transformers' (fp32), as one batch."""

from __future__ import annotations

import pytest
from hf_reference import check_outputs_equal, hf_greedy_batched, load_hf_model

from pagedllm import LLM, SamplingParams

# Eleven token lengths, one per prompt (the batch tests assert they differ).
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "List three colors:",
    "Water boils at a temperature of about",
    "Translate to French: I like apples.",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    ("In machine learning, a transformer is a model architecture that relies on attention. "
     "Its main components are the encoder, the decoder, and"),
    "1, 2, 3, 4, 5, 6,",
    "Question: What is the largest planet in our solar system?\nAnswer:",
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), num_kv_blocks=256, dtype="float32")


def check_greedy_batch(llm, smollm2_dir, prompts: list[str], max_tokens: int) -> None:
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    assert len({len(p) for p in prompt_ids}) == len(prompts)  # lengths differ
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = hf_greedy_batched(load_hf_model(smollm2_dir), prompt_ids, max_tokens)
    check_outputs_equal(expected, [o.outputs[0].token_ids for o in outputs])
    for output, ids in zip(outputs, prompt_ids):
        assert output.prompt_token_ids == ids
        # Streaming-safe incremental text equals a full decode of the tokens.
        assert output.outputs[0].text == tokenizer.decode(
            output.outputs[0].token_ids, skip_special_tokens=True
        )


def test_greedy_batch_matches_transformers(llm, smollm2_dir):
    # Four prompts of different lengths, 24 tokens: transformers' fp32 generate is the cost.
    check_greedy_batch(llm, smollm2_dir, [PROMPTS[i] for i in (0, 3, 8, 10)], 24)


@pytest.mark.slow
def test_greedy_batch_of_11_prompts_matches_transformers_over_64_tokens(llm, smollm2_dir):
    check_greedy_batch(llm, smollm2_dir, PROMPTS, 64)


def test_chat_uses_the_chat_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected_prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out.prompt_token_ids == list(expected_prompt)
    assert out.prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the instruct model ends its turn
    assert out.outputs[0].token_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("bad", [
    [{"role": "user"}],  # no content
    [{"content": "no role"}],
    [[("role", "user")]],  # not a mapping
])
def test_chat_refuses_a_conversation_the_template_cannot_render(llm, bad):
    ok = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="conversation 1: the chat template failed"):
        llm.chat([ok, bad], SamplingParams(max_tokens=2), use_tqdm=False)
