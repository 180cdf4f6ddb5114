"""prompt_logprobs through LLM against transformers' log-softmax over the prompt (fp32).

The prompts are prefilled in chunks (a small token budget) and sent twice with prefix caching
on: a request asking for prompt logprobs must still compute, and report, every position.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.hf_reference import load_hf_model, ragged_prompts, token_prompts

TOP = 3


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_kv_heads=2, seed=3)


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row t - 1 is the distribution that predicts prompt[t]."""
    logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_prompt_logprobs(output, prompt: list[int], ref: torch.Tensor) -> None:
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    for t in range(1, len(prompt)):
        entry, row = entries[t], ref[t - 1]
        token = prompt[t]
        assert token in entry
        torch.testing.assert_close(entry[token].logprob, row[token].item(), atol=1e-4, rtol=0)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top_values, top_ids = row.topk(TOP)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist()):
            assert token_id in entry
            torch.testing.assert_close(entry[token_id].logprob, value, atol=1e-4, rtol=0)
        assert len(entry) in (TOP, TOP + 1)  # the top-k, plus the prompt token if not among them


def test_prompt_logprobs_equal_transformers(tiny_dir) -> None:
    prompts = ragged_prompts(6, seed=11, max_len=40) + [[5], [7, 9]]
    llm = LLM(str(tiny_dir), dtype="float32", block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=16, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=TOP)
    model = load_hf_model(tiny_dir)
    refs = [hf_prompt_logprobs(model, p) if len(p) > 1 else None for p in prompts]
    for _ in range(2):  # the second round finds every full block in the prefix cache
        outputs = llm.generate(token_prompts(prompts), params)
        for output, prompt, ref in zip(outputs, prompts, refs):
            if ref is None:
                assert output.prompt_logprobs == [None]
            else:
                check_prompt_logprobs(output, prompt, ref)
    plain = llm.generate(token_prompts(prompts[:1]), SamplingParams(max_tokens=1))
    assert plain[0].prompt_logprobs is None


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_prompt_logprobs_refused(bad) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be an int >= 0 or None"):
        SamplingParams(prompt_logprobs=bad)
