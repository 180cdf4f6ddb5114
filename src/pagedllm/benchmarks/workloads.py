"""Seeded request workloads shared by the benchmarks: random prompt token ids, fixed output
lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    """Prompt token ids drawn uniformly, away from the vocabulary's first and last 100 (special
    and control tokens sit there)."""
    return rng.integers(100, vocab_size - 100, length).tolist()


def fixed_workload(num_requests: int = 64, input_len: int = 128, output_len: int = 128,
                   vocab_size: int = 49152, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    return [
        BenchRequest(random_prompt(rng, input_len, vocab_size), output_len)
        for _ in range(num_requests)
    ]


def sharegpt_like_workload(num_requests: int = 128, mean_input: float = 160,
                           mean_output: float = 200, max_total: int = 1024,
                           vocab_size: int = 49152, seed: int = 0) -> list[BenchRequest]:
    """Lognormal lengths shaped like ShareGPT conversations (sigma 1), capped at max_total."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    requests = []
    while len(requests) < num_requests:
        n_in = int(rng.lognormal(np.log(mean_input) - sigma**2 / 2, sigma))
        n_out = int(rng.lognormal(np.log(mean_output) - sigma**2 / 2, sigma))
        if n_in < 4 or n_out < 4 or n_in + n_out > max_total:
            continue
        requests.append(BenchRequest(random_prompt(rng, n_in, vocab_size), n_out))
    return requests


def with_fresh_prompts(requests: list[BenchRequest], vocab_size: int = 49152,
                       seed: int | tuple[int, ...] = 1) -> list[BenchRequest]:
    """The same lengths with newly drawn prompt ids: a server's prefix cache cannot serve one
    run's prompts from an earlier run's blocks."""
    rng = np.random.default_rng(seed)
    return [BenchRequest(random_prompt(rng, len(r.prompt_token_ids), vocab_size), r.output_len)
            for r in requests]


def single_workload(seed: int = 1) -> list[BenchRequest]:
    """One request alone (128 in / 128 out): memory-bound decode, per-step overhead shows.

    Seeded apart from `fixed` (seed 0), whose first prompt it would otherwise repeat: an engine
    that ran `fixed` first would serve this prompt from its prefix cache."""
    return fixed_workload(num_requests=1, seed=seed)


WORKLOADS = {
    "fixed": fixed_workload,
    "sharegpt-like": sharegpt_like_workload,
    "single": single_workload,
}


def make_requests(workload: str, num_requests: int | None = None) -> list[BenchRequest]:
    """A workload's requests; `num_requests` overrides the count (not of `single`)."""
    if num_requests and workload != "single":
        return WORKLOADS[workload](num_requests=num_requests)
    return WORKLOADS[workload]()


def round_requests(workload: str, num_requests: int | None, round_index: int) -> list[BenchRequest]:
    """A workload's requests for one round of a repeated benchmark: round 0 the seeded prompts,
    later rounds the same lengths with fresh prompt ids, so that a prefix cache cannot serve a
    round from an earlier round's blocks (pagedllm's second pass of `fixed` skipped its prefill
    and read 401 tok/s against 276)."""
    requests = make_requests(workload, num_requests)
    if not round_index:
        return requests
    # Seeded by workload too: with the round alone, every workload of a round drew its prompts
    # from the same stream, so `single` repeated `fixed`'s first prompt of that round.
    return with_fresh_prompts(requests, seed=(round_index, list(WORKLOADS).index(workload)))
