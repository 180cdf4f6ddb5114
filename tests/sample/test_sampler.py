"""Sampler and logits processors: exact transforms, greedy, filters, seeding, logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from pagedllm.sample import Sampler, SamplingBatch, seed_for_position
from pagedllm.sample.logits_processors import (
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_token_mask,
    _filter_by_candidates,
    _filter_by_sort,
    apply_top_k_top_p,
    token_counts,
)
from pagedllm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_batch(
    params: list[SamplingParams],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    forbidden: list[list[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        prompt_token_ids=list(prompts) if prompts is not None else [[] for _ in range(n)],
        output_token_ids=list(outputs) if outputs is not None else [[] for _ in range(n)],
        min_tokens_stop_ids=forbidden if forbidden is not None else [[] for _ in range(n)],
    )


def random_logits(num_rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=gen) * 3


# ---- logits processors, against hand-computed tensors --------------------------------------


def test_token_counts() -> None:
    counts = token_counts([[1, 3, 3], [], [0]], vocab_size=4, device=torch.device("cpu"))
    expected = torch.tensor([[0, 1, 0, 2], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.int32)
    assert torch.equal(counts, expected)


def test_apply_penalties_exact() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, -1.0, 0.0, 4.0]])
    # Row 0: prompt has tokens 0, 1; output has 2 twice and 3 once.
    # Row 1: no prompt, output has token 4 once.
    prompt_mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    output_counts = torch.tensor([[0, 0, 2, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.int32)
    apply_penalties(
        logits,
        prompt_mask,
        output_counts,
        presence_penalties=torch.tensor([0.5, -1.0]),
        frequency_penalties=torch.tensor([0.25, 0.0]),
        repetition_penalties=torch.tensor([2.0, 1.0]),
    )
    expected = torch.tensor(
        [
            # tok0: 2/2; tok1: -1*2; tok2: 0.5/2 - 0.25*2 - 0.5; tok3: 3/2 - 0.25 - 0.5; tok4 unseen
            [1.0, -2.0, 0.25 - 0.5 - 0.5, 1.5 - 0.25 - 0.5, -2.0],
            # presence -1 on token 4 only; repetition 1 and frequency 0 are no-ops
            [1.0, 1.0, -1.0, 0.0, 5.0],
        ]
    )
    assert torch.equal(logits, expected)


def test_apply_logit_bias_and_token_mask() -> None:
    logits = torch.zeros(3, 4)
    apply_logit_bias(logits, [{1: 2.5, 3: -1.0}, None, {0: 0.5}])
    apply_token_mask(logits, [[], [2, 3], [0]])
    expected = torch.tensor(
        [[0.0, 2.5, 0.0, -1.0], [0.0, 0.0, NEG_INF, NEG_INF], [NEG_INF, 0.0, 0.0, 0.0]]
    )
    assert torch.equal(logits, expected)


def test_apply_top_k_top_p_exact() -> None:
    probs = torch.tensor([0.05, 0.4, 0.15, 0.25, 0.1, 0.05])
    logits = probs.log().expand(4, -1).clone()
    top_k = [2, 0, 0, 3]
    # Row 1 top_p 0.7: sorted mass before = 0 (tok1), .4 (tok3), .65 (tok2) -> keep {1, 3, 2}.
    # Row 3: top-3 {1, 3, 2} renormalised to [.5, .3125, .1875]; p = 0.45 keeps {1} only.
    top_p = [1.0, 0.7, 1.0, 0.45]
    out = apply_top_k_top_p(logits, top_k, top_p)
    kept = out > NEG_INF
    assert kept[0].nonzero().flatten().tolist() == [1, 3]
    assert kept[1].nonzero().flatten().tolist() == [1, 2, 3]
    assert kept[2].all()
    assert kept[3].nonzero().flatten().tolist() == [1]
    assert torch.equal(out[kept], logits[kept])  # surviving logits are untouched


def test_top_k_ties_break_to_lowest_id() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0, 5.0, 5.0]])
    out = apply_top_k_top_p(logits, [2], None)
    assert (out > NEG_INF).nonzero()[:, 1].tolist() == [1, 3]


def test_top_k_ties_inside_candidates_break_to_lowest_id() -> None:
    # Row 1's top_k = 10 widens the candidate set, so row 0's 4-way tie sits inside it and is
    # resolved by the re-sort rather than by the full-sort fallback.
    logits = torch.zeros(2, 50)
    logits[0, [9, 3, 30, 17]] = 4.0
    out = apply_top_k_top_p(logits, [2, 10], None)
    assert (out[0] > NEG_INF).nonzero().flatten().tolist() == [3, 9]


def test_candidate_path_matches_full_sort() -> None:
    gen = torch.Generator().manual_seed(3)
    num_rows, vocab_size = 96, 3000
    # Scales from flat (top-p mass spread beyond the candidates -> sort fallback) to peaked.
    scales = torch.tensor([0.05, 0.5, 2.0, 8.0]).repeat(num_rows // 4).unsqueeze(1)
    logits = torch.randn(num_rows, vocab_size, generator=gen) * scales
    # Every (scale, top_k, top_p) combination: 4 x 4 x 6 = 96 rows.
    top_k = [[0, 1, 5, 200][(i // 4) % 4] for i in range(num_rows)]
    top_p = [[1.0, 0.5, 0.9, 0.99, 0.3, 0.8][i // 16] for i in range(num_rows)]
    fast = apply_top_k_top_p(logits, top_k, top_p, max_candidates=64)
    k = torch.tensor(top_k)
    p = torch.tensor(top_p)
    reference = _filter_by_sort(logits, k, p, full_lse=logits.logsumexp(dim=-1))
    assert torch.equal(fast, reference)
    _, exact = _filter_by_candidates(logits, k, p, logits.logsumexp(dim=-1), 200)
    assert 0 < int(exact.sum()) < num_rows  # both paths were exercised

    # Top-p alone: 64 candidates, then 512 for flatter rows, then the sort for the flattest.
    fast = apply_top_k_top_p(logits, None, top_p, max_candidates=64)
    no_k = torch.zeros_like(k)
    assert torch.equal(fast, _filter_by_sort(logits, no_k, p, logits.logsumexp(dim=-1)))
    _, exact = _filter_by_candidates(logits, no_k, p, logits.logsumexp(dim=-1), 64)
    assert 0 < int(exact.sum()) < num_rows


def test_apply_min_p_exact() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.14, 0.16], [0.5, 0.2, 0.14, 0.16]])
    apply_min_p(probs, torch.tensor([0.3, 0.0]))  # row 0 threshold 0.15
    assert torch.equal(probs[0], torch.tensor([0.5, 0.2, 0.0, 0.16]))
    assert torch.equal(probs[1], torch.tensor([0.5, 0.2, 0.14, 0.16]))


# ---- Sampler --------------------------------------------------------------------------------


def test_process_logits_applies_bias_penalties_and_min_tokens_in_order() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.0], [1.0, 2.0, -1.0, 0.0]])
    params = [
        SamplingParams(
            logit_bias={2: 3.0},
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        SamplingParams(),
    ]
    batch = make_batch(params, prompts=[[0], [0]], outputs=[[2, 2], [2]], forbidden=[[3], []])
    before = logits.clone()
    out = Sampler(seed=0).process_logits(logits, batch)
    # Row 0: tok0 in prompt 1/2; tok1 untouched; tok2 (-1+3)/2 - 0.5*2 - 0.25; tok3 forbidden.
    assert torch.equal(out[0], torch.tensor([0.5, 2.0, 2.0 / 2 - 1.0 - 0.25, NEG_INF]))
    assert torch.equal(out[1], before[1])  # default params leave the row bit-identical
    assert torch.equal(logits, before)  # the caller's tensor is not mutated


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = random_logits(16, 100)
    logits[3, [7, 40]] = 100.0  # a tie: argmax must pick 7
    params = [SamplingParams(temperature=0.0) for _ in range(16)]
    out = Sampler(seed=0)(logits, make_batch(params))
    assert out.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert out.sampled_token_ids[3] == 7


def test_plain_greedy_batch_matches_the_general_path() -> None:
    """A batch of plain greedy rows (nothing applied, no logprobs) takes the sampler's short
    path; each row's token and None entries are those it gets beside a row that takes the
    general one (a penalised, a logprobs, and a min_tokens row)."""
    logits = random_logits(8, 300, seed=3)
    logits[5, [9, 200]] = 50.0  # a tie: the lowest id on both paths
    plain = [SamplingParams(temperature=0.0) for _ in range(8)]
    alone = Sampler(0)(logits, make_batch(plain))
    assert alone.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert alone.sampled_token_ids[5] == 9
    assert alone.sampled_logprobs == alone.sampled_ranks == alone.top_logprobs == [None] * 8
    others = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    forbidden = [[], [], [4]]
    for other, stop_ids in zip(others, forbidden):
        mixed = Sampler(0)(torch.cat([logits, logits[:1]]),
                           make_batch([*plain, other], outputs=[[]] * 8 + [[1, 2]],
                                      forbidden=[[]] * 8 + [stop_ids]))
        assert mixed.sampled_token_ids[:8] == alone.sampled_token_ids
        assert mixed.sampled_logprobs[:8] == mixed.sampled_ranks[:8] == [None] * 8
        assert mixed.top_logprobs[:8] == [None] * 8


@pytest.mark.parametrize("bias, temperature", [(1e39, 1.0), (1e37, 0.01), (3e38, 0.5)])
def test_a_bias_past_float32_still_picks_its_token(bias: float, temperature: float) -> None:
    """A finite bias can overflow float32 when added or divided by the temperature; the
    token must still win (an inf logit would make the softmax NaN and pick token 0)."""
    logits = random_logits(4, 100, seed=2)
    params = [SamplingParams(temperature=temperature, seed=row, logit_bias={7: bias})
              for row in range(4)]
    out = Sampler(seed=0)(logits, make_batch(params))
    assert out.sampled_token_ids == [7, 7, 7, 7]


@pytest.mark.parametrize("seed", [None, 11])
def test_top_k_1_equals_greedy(seed: int | None) -> None:
    logits = random_logits(64, 500, seed=1)
    greedy = Sampler(0)(logits, make_batch([SamplingParams(temperature=0.0)] * 64))
    top1 = Sampler(0)(logits, make_batch([SamplingParams(top_k=1, seed=seed)] * 64))
    assert top1.sampled_token_ids == greedy.sampled_token_ids


def test_seeded_row_independent_of_batch_and_order() -> None:
    vocab_size = 1000
    target = SamplingParams(seed=1234, temperature=1.0)
    others = [
        SamplingParams(seed=7, top_p=0.5, repetition_penalty=1.3, logit_bias={1: 2.0}),
        SamplingParams(top_k=5, min_p=0.1, presence_penalty=0.5),
        SamplingParams(temperature=0.0),
    ]
    history: list[int] = []
    for step in range(20):
        logits = random_logits(4, vocab_size, seed=100 + step)
        # Alone, with a fresh sampler (as after preemption and recompute).
        alone = Sampler(seed=step)(logits[:1], make_batch([target], outputs=[history]))
        # Last in a batch with other settings, other rows first, another sampler seed.
        mixed = Sampler(seed=99)(
            torch.cat([logits[1:].flip(0), logits[:1]]),
            make_batch(others[::-1] + [target], outputs=[[5] * step] * 3 + [history]),
        )
        assert alone.sampled_token_ids[0] == mixed.sampled_token_ids[3]
        history.append(alone.sampled_token_ids[0])
    assert len(set(history)) > 10  # it really sampled, not a fixed token


def test_different_seeds_and_positions_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    sampler = Sampler(0)

    def draw(seed: int, position: int) -> int:
        batch = make_batch([SamplingParams(seed=seed)], outputs=[[0] * position])
        return sampler(logits, batch).sampled_token_ids[0]

    seq_a = [draw(1, pos) for pos in range(10)]
    seq_b = [draw(2, pos) for pos in range(10)]
    assert seq_a != seq_b
    assert len(set(seq_a)) > 5
    assert seq_a == [draw(1, pos) for pos in range(10)]  # reproducible
    assert len({seed_for_position(s, p) for s in range(20) for p in range(50)}) == 1000


def test_unseeded_sampling_follows_distribution() -> None:
    num_draws = 4000
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = (probs.log() * 2.0).expand(num_draws, -1)  # temperature 2 undoes the * 2
    params = [SamplingParams(temperature=2.0)] * num_draws
    out = Sampler(seed=0)(logits, make_batch(params))
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=4).double()
    expected = probs.double() * num_draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27, (counts.tolist(), chi2)  # p = 0.001 at 3 degrees of freedom


def test_unseeded_rows_use_sampler_generator() -> None:
    logits = torch.zeros(50, 100)
    batch = make_batch([SamplingParams()] * 50)
    assert Sampler(3)(logits, batch) == Sampler(3)(logits, batch)
    assert Sampler(3)(logits, batch) != Sampler(4)(logits, batch)


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {1, 3}),
        (SamplingParams(top_p=0.7), {1, 2, 3}),
        (SamplingParams(min_p=0.3), {1, 2, 3}),  # threshold 0.12
        (SamplingParams(top_k=3, top_p=0.6), {1, 3}),  # top-3 renormalised: .5, .3125, .1875
        (SamplingParams(top_p=0.9, min_p=0.5), {1, 3}),  # threshold 0.2
    ],
)
def test_filters_never_sample_masked_tokens(params: SamplingParams, allowed: set[int]) -> None:
    num_draws = 2000
    logits = torch.tensor([0.05, 0.4, 0.15, 0.25, 0.1, 0.05]).log().expand(num_draws, -1)
    out = Sampler(seed=0)(logits, make_batch([params] * num_draws))
    assert set(out.sampled_token_ids) == allowed


def test_min_tokens_forbids_listed_ids() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).expand(500, -1)
    params = [SamplingParams(temperature=0.0)] + [SamplingParams(temperature=5.0)] * 499
    out = Sampler(0)(logits, make_batch(params, forbidden=[[1, 3]] * 500))
    assert out.sampled_token_ids[0] == 2  # greedy falls back to the next best
    assert set(out.sampled_token_ids) == {0, 2}


def test_logprobs_are_raw_and_exact() -> None:
    logits = random_logits(7, 50, seed=5)
    params = [
        SamplingParams(temperature=5.0, logprobs=3),
        SamplingParams(logprobs=None, repetition_penalty=1.5, best_of=2),  # ranks its samples
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(logit_bias={17: 100.0}, logprobs=5),  # forced, usually not the raw best
        SamplingParams(temperature=3.0, top_k=10, logprobs=1),
        SamplingParams(logprobs=500),  # more than the vocabulary: capped
        SamplingParams(repetition_penalty=1.5),  # needs no logprob: none computed
    ]
    out = Sampler(0)(logits, make_batch(params, prompts=[[1, 2]] * 7, outputs=[[3]] * 7))
    raw = torch.log_softmax(logits, dim=-1)
    assert out.sampled_logprobs[6] is None and out.sampled_ranks[6] is None
    for row, token_id in enumerate(out.sampled_token_ids[:6]):
        if params[row].logprobs is None:
            # Only the chosen logprob (via logsumexp, so not bit-identical); no rank computed.
            assert out.sampled_logprobs[row] == pytest.approx(raw[row, token_id].item(), abs=1e-5)
            assert out.sampled_ranks[row] is None
            continue
        assert out.sampled_logprobs[row] == raw[row, token_id].item()
        assert out.sampled_ranks[row] == 1 + int((raw[row] > raw[row, token_id]).sum())
    assert out.sampled_token_ids[3] == 17
    assert out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    assert out.sampled_ranks[2] == 1
    for row in (0, 3, 4, 5):
        k = min(params[row].logprobs, 50)
        values, ids = raw[row].sort(descending=True)
        top = out.top_logprobs[row]
        assert [t for t, _ in top] == ids[:k].tolist()
        assert [v for _, v in top] == values[:k].tolist()
