"""Reference generation with transformers, to compare pagedllm's tokens against, and the
random prompts the comparisons run on."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def ragged_prompts(num: int, seed: int, max_len: int = 60) -> list[list[int]]:
    """`num` prompts of 1 to `max_len` random token ids in 3-511 (never BOS, EOS or pad)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, max_len))] for _ in range(num)]


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    """Token-id prompts as `LLM.generate` takes them."""
    return [{"prompt_token_ids": p} for p in prompts]


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # NOTE: EOS is disabled so that both sides generate exactly max_new_tokens, the way
    # pagedllm does with ignore_eos=True (min_new_tokens would mask EOS and change logits).
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time (no padding to disturb the numbers)."""
    results = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        results.append(out[0, len(prompt):].tolist())
    return results


@torch.inference_mode()
def hf_greedy_batched(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of all prompts in one left-padded batch (for larger models)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, width:].tolist()


def check_outputs_equal(expected: list[list[int]], actual: list[list[int]]) -> None:
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert e == a, f"request {i}: first difference at token {_first_diff(e, a)}\n{e}\n{a}"


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# The files of the shipped tokenizer that tiny models take (as conftest's tiny Llama does).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def save_tiny_model(model, path: Path, tokenizer_dir: Path, std: float = 0.3,
                    seed: int = 0) -> Path:
    """Draws random weights for a transformers model and saves it (safetensors) with the
    shipped tokenizer into `path`.

    Matrices get N(0, std); norm weights N(1, 0.2) and biases N(0, 0.2), so that the norms'
    affine parts and the biases are exercised too. NOTE: std 0.3 keeps greedy decoding of the
    tiny GPT-2 and OPT configs varied (with 0.15, an OPT repeats one token) and its top-2
    margins far above fp32 rounding.
    """
    import shutil

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.eval().save_pretrained(path)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def greedy_token_ids(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """pagedllm's greedy continuation of all prompts, run as one `generate` call."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@torch.inference_mode()
def check_within_top_n(model, prompts: list[list[int]], outputs: list[list[int]],
                       n: int = 3) -> None:
    """Each generated token is among the reference's `n` most likely at its step, given the
    same prefix (the reference is teacher-forced on the generated tokens)."""
    for i, (prompt, tokens) in enumerate(zip(prompts, outputs)):
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        top = logits.float().topk(n).indices.tolist()
        for step, token in enumerate(tokens):
            assert token in top[step], f"request {i}, step {step}: {token} not in {top[step]}"


def check_family_against_transformers(model_dir: Path, prompts: list[list[int]],
                                      max_tokens: int, expected: list[list[int]] | None,
                                      num_kv_blocks: int, dtype: str = "float32") -> None:
    """A family's greedy run through `LLM` against transformers, every block back after it:
    fp32 token for token against `expected` (transformers' greedy tokens), bf16 within
    transformers' top-3 at every step (`expected` unused). A pool under 200 blocks must
    preempt; a larger one must not."""
    from pagedllm import LLM

    llm = LLM(str(model_dir), dtype=dtype, num_kv_blocks=num_kv_blocks, block_size=8)
    outputs = greedy_token_ids(llm, prompts, max_tokens)
    if dtype == "float32":
        check_outputs_equal(expected, outputs)
    else:
        check_within_top_n(load_hf_model(model_dir, dtype=torch.bfloat16), prompts, outputs, n=3)
    stats = llm.llm_engine.get_stats()
    assert (stats.num_preemptions > 0) == (num_kv_blocks < 200), stats
    assert stats.num_free_blocks == stats.num_blocks
