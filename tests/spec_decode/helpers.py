"""What the speculative decoding tests share: prompts whose n-grams recur, the output to
compare, and the check that sampling with speculation keeps the distribution (a chi-square test
per output position, on a model whose logits are sharp enough that proposals are accepted often
and rejected often)."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams


def repetitive_prompts(n: int, seed: int = 0, vocab: int = 512) -> list[dict]:
    """Prompts that repeat a phrase with small edits, so that n-grams recur (and models echo)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 7))]
        tokens = []
        for _ in range(rng.randint(2, 6)):
            tokens += phrase + [rng.randrange(3, vocab)]
        prompts.append({"prompt_token_ids": tokens + phrase[:2]})  # ends inside the phrase
    return prompts


def completions(outputs) -> list[list]:
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason, c.text)
             for c in o.outputs] for o in outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert not llm.llm_engine.has_unfinished_requests()


def sharp_copy(model_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    """Copies a tiny model to `path` with its LM head six times as sharp as the random one's
    (at temperature 1, as with a trained model, the next token is often but not always clear);
    returns the weights written."""
    shutil.copytree(model_dir, path)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] *= 6
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return weights


def position_counts(llm: LLM, prompts: list[dict], params: SamplingParams,
                    num_samples: int) -> list[Counter]:
    """Samples `num_samples` completions (the prompts in turn): per output position, a Counter
    of (prompt index, token). Every block comes back."""
    batch = [prompts[i % len(prompts)] for i in range(num_samples)]
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return [Counter((i % len(prompts), o.outputs[0].token_ids[pos])
                    for i, o in enumerate(outputs))
            for pos in range(params.max_tokens)]


def assert_same_distribution(counts_a: list[Counter], counts_b: list[Counter]) -> None:
    """Samples are independent across sequences (not across the positions of one), so each
    position is tested alone, Bonferroni-corrected over the positions."""
    p_values = [chi_square_p_value(a, b) for a, b in zip(counts_a, counts_b, strict=True)]
    assert min(p_values) > 0.001 / len(p_values), p_values


def chi_square_p_value(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of equal token frequencies (bins under 5 expected merged)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    bins, rest = [], [0, 0]
    for token in set(a) | set(b):
        counts = [a[token], b[token]]
        if sum(counts) >= 10:
            bins.append(counts)
        else:
            rest = [rest[0] + counts[0], rest[1] + counts[1]]
    if sum(rest):
        bins.append(rest)
    n = total_a + total_b
    stat = 0.0
    for counts in bins:
        for observed, total in zip(counts, (total_a, total_b)):
            expected = sum(counts) * total / n
            stat += (observed - expected) ** 2 / expected
    df = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))
