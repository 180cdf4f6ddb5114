"""Turns one step's logits into one token per row, plus the log-probabilities users asked for
(computed in logprobs.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedllm.sample.logits_processors import (
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_token_mask,
    apply_top_k_top_p,
    token_counts,
)
from pagedllm.sample.logprobs import argmax_logsumexp, sampled_logprobs
from pagedllm.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _is_plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing applied to the logits and no logprob asked for: the row's token is
    the raw argmax and its output entries are all None."""
    return (p.is_greedy and not p.logit_bias and not _has_penalties(p)
            and not p.needs_sampled_logprobs)


@dataclass
class SamplingBatch:
    """The per-row inputs of one sampling call; row i of the logits belongs to entry i of each."""

    # [num_rows] settings of the sequence that owns each row.
    params: list[SamplingParams]
    # [num_rows] prompt token ids (repetition penalty only).
    prompt_token_ids: list[Sequence[int]]
    # [num_rows] tokens generated so far; their count is the position used for seeded noise.
    output_token_ids: list[Sequence[int]]
    # [num_rows] token ids forbidden this step because min_tokens is not reached yet
    # (EOS + stop_token_ids), or [] once it is. Filled by the model runner.
    min_tokens_stop_ids: list[list[int]]
    # [num_rows] index of the row's sequence within its request (parallel sampling); sample i
    # of a seeded request draws from its own noise stream. None = all 0.
    sample_indices: list[int] | None = None

    def __post_init__(self) -> None:
        num_rows = len(self.params)
        assert len(self.prompt_token_ids) == num_rows, "one prompt per row"
        assert len(self.output_token_ids) == num_rows, "one output list per row"
        assert len(self.min_tokens_stop_ids) == num_rows, "one min_tokens list per row"

    @property
    def num_rows(self) -> int:
        return len(self.params)


@dataclass
class SamplerOutput:
    """One sampled token per row, with log-probabilities under the raw model distribution."""

    # [num_rows] chosen token id.
    sampled_token_ids: list[int]
    # [num_rows] log_softmax(raw logits)[chosen token]; penalties/temperature not applied.
    # None for rows whose params do not need it (SamplingParams.needs_sampled_logprobs).
    sampled_logprobs: list[float | None]
    # [num_rows] 1-based rank of the chosen token in the raw distribution (1 = most likely);
    # None for rows that did not ask for logprobs (ranking costs a pass over the vocabulary).
    sampled_ranks: list[int | None]
    # [num_rows] the k = params.logprobs best raw (token_id, logprob), descending;
    # None when params.logprobs is None, [] when it is 0.
    top_logprobs: list[list[tuple[int, float]] | None]


def seed_for_position(seed: int, position: int) -> int:
    """Mixes a request seed and a token position into one 64-bit generator seed.

    Stateless on purpose: the k-th token of a seeded request always sees the same noise, whatever
    batch it is in and even after preemption by recompute. SplitMix64's finaliser is a bijection,
    so different positions of one seed never share a generator seed.
    """

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    return mix(mix(seed & _MASK64) ^ (position & _MASK64))


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of a request: the request's own seed for sample 0."""
    if sample_index == 0:
        return seed
    return seed_for_position(seed, (1 << 63) + sample_index)


class Sampler:
    """Samples one token per row of a [num_rows, vocab_size] logits tensor in one call.

    Order (vLLM's): logit_bias, repetition/frequency/presence penalties, min_tokens mask; then
    greedy rows (temperature < 1e-5) take the argmax, and the other rows are divided by their
    temperature, filtered by top_k, top_p and min_p, and sampled with the exponential race
    argmax(probs / q), q ~ Exp(1), which picks token i with probability probs[i] / sum(probs).
    Rows with a seed draw q from a generator seeded by (seed, number of tokens generated so far);
    the others share this sampler's generator.

    The sampler is stateless apart from that generator and never mutates its inputs.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # One generator per device, created on first use, so the sampler stays device-neutral.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.sample(logits, batch)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Samples a token for each row.

        Args:
            logits: [num_rows, vocab_size] raw model logits (float32, any device).
            batch: the rows' settings and token histories.
        Returns:
            Python lists, one entry per row (the only place results leave the device).
        """
        assert logits.dim() == 2 and logits.shape[0] == batch.num_rows, (
            f"logits {tuple(logits.shape)} do not match {batch.num_rows} rows"
        )
        logits = logits.float()
        if (all(_is_plain_greedy(p) for p in batch.params)
                and not any(batch.min_tokens_stop_ids)):
            # NOTE: the path below ends the same way for such rows (the native argmax without
            # the logsumexp, no logprobs); this one skips its per-row bookkeeping.
            num_rows = batch.num_rows
            return SamplerOutput(
                sampled_token_ids=argmax_logsumexp(logits, with_logsumexp=False)[0].tolist(),
                sampled_logprobs=[None] * num_rows,
                sampled_ranks=[None] * num_rows,
                top_logprobs=[None] * num_rows,
            )
        processed = self.process_logits(logits, batch)  # [R, V]
        greedy_ids = None
        if processed is logits:  # all greedy, nothing applied: the native argmax, without the
            # logsumexp (greedy rows need no chosen logprob beyond what `logprobs` computes)
            greedy_ids = argmax_logsumexp(logits, with_logsumexp=False)[0]
        token_ids = self._pick_tokens(processed, batch, greedy_ids)  # [R]
        chosen, ranks, top_logprobs = sampled_logprobs(logits, token_ids, batch.params)
        return SamplerOutput(
            sampled_token_ids=token_ids.tolist(),
            sampled_logprobs=chosen,
            sampled_ranks=ranks,
            top_logprobs=top_logprobs,
        )

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Returns float32 logits with bias, penalties and min_tokens applied.

        The input is never modified: it is copied first unless nothing applies and every row is
        greedy (then the input itself is returned, since greedy picking does not write to it).
        """
        params = batch.params
        if not any(
            p.logit_bias or _has_penalties(p) or not p.is_greedy for p in params
        ) and not any(batch.min_tokens_stop_ids):
            return logits.float()
        logits = logits.to(torch.float32, copy=True)
        apply_logit_bias(logits, [p.logit_bias for p in params])

        rows = [i for i, p in enumerate(params) if _has_penalties(p)]
        if rows:
            device, vocab_size = logits.device, logits.shape[1]
            index = torch.tensor(rows, device=device)
            sub = logits[index]
            prompts = [batch.prompt_token_ids[i] for i in rows]
            outputs = [batch.output_token_ids[i] for i in rows]
            apply_penalties(
                sub,
                prompt_mask=token_counts(prompts, vocab_size, device) > 0,
                output_counts=token_counts(outputs, vocab_size, device),
                presence_penalties=self._row_tensor(params, rows, "presence_penalty", device),
                frequency_penalties=self._row_tensor(params, rows, "frequency_penalty", device),
                repetition_penalties=self._row_tensor(params, rows, "repetition_penalty", device),
            )
            logits[index] = sub

        apply_token_mask(logits, batch.min_tokens_stop_ids)
        return logits

    @staticmethod
    def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each (non-greedy) row samples from: `logits` (process_logits'
        float32 output, one row per item of `params`) over the temperature, top-k/top-p
        filtered, softmax, then min-p. Returns [R, V] float32.

        Modifies `logits` in place (pass a copy you own).
        """
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device)
        logits.div_(temps.unsqueeze(1))
        if any(p.logit_bias for p in params):
            # NOTE: a large bias overflows float32 (when added, or divided by a low
            # temperature); +inf would turn the softmax into NaN, the largest float does not.
            logits.clamp_(max=torch.finfo(logits.dtype).max)

        top_k = [p.top_k for p in params] if any(p.top_k > 0 for p in params) else None
        top_p = [p.top_p for p in params] if any(p.top_p < 1.0 for p in params) else None
        probs = apply_top_k_top_p(logits, top_k, top_p).softmax(dim=-1)  # [R, V]
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(probs, torch.tensor([p.min_p for p in params], device=device))
        return probs

    # ---- internals ----------------------------------------------------------------------------

    @staticmethod
    def _row_tensor(
        params: list[SamplingParams], rows: list[int], name: str, device: torch.device
    ) -> torch.Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], device=device)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _pick_tokens(
        self, logits: torch.Tensor, batch: SamplingBatch, greedy_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy rows take the argmax (`greedy_ids` when already known); the rest are
        filtered and sampled. Returns [R] int64.

        May modify `logits` (the sampler's own copy) in place.
        """
        params = batch.params
        device = logits.device
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if greedy_ids is not None:
            token_ids = greedy_ids
        elif len(rows) < len(params):
            token_ids = logits.argmax(dim=-1)  # [R]; final for greedy rows
        else:
            token_ids = torch.empty(len(params), dtype=torch.long, device=device)
        if not rows:
            return token_ids

        sampled = [params[i] for i in rows]
        all_sampled = len(rows) == len(params)
        index = torch.tensor(rows, device=device)
        probs = self.sampling_probs(logits if all_sampled else logits[index], sampled)  # [S, V]
        indices = batch.sample_indices
        q = self._exponential_noise(
            probs,
            [batch.output_token_ids[i] for i in rows],
            sampled,
            [indices[i] for i in rows] if indices is not None else None,
        )
        chosen = probs.div_(q).argmax(dim=-1)  # [S]
        if all_sampled:
            return chosen
        token_ids[index] = chosen
        return token_ids

    def _exponential_noise(
        self,
        probs: torch.Tensor,
        output_token_ids: list[Sequence[int]],
        params: list[SamplingParams],
        sample_indices: list[int] | None = None,
    ) -> torch.Tensor:
        """Returns Exp(1) noise shaped like probs; seeded rows get (seed, position) noise.

        NOTE: drawn as -log(U), U ~ Uniform[0, 1): the same distribution as `exponential_`, which
        is ~4x slower on CPU. U = 0 gives q = inf and ratio 0; U < 1 keeps q > 0, so probs / q is
        never NaN.
        """
        u = torch.empty_like(probs)
        if any(p.seed is None for p in params):
            # NOTE: filling all rows (seeded ones are overwritten below) keeps this one call.
            u.uniform_(generator=self._generator(probs.device))
        indices = sample_indices or [0] * len(params)
        for row, (p, out, index) in enumerate(zip(params, output_token_ids, indices)):
            if p.seed is not None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(seed_for_position(sample_seed(p.seed, index), len(out)))
                u[row].uniform_(generator=gen)
        return u.log_().neg_()
