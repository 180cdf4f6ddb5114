"""One step's tensor work: SchedulerOutput -> flat inputs -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention.metadata import (
    build_attention_metadata,
    build_decode_metadata,
    host_tensor,
)
from pagedllm.core.interface import (
    ModelRunnerOutput,
    PromptLogprobsChunk,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.models.interface import CausalLM
from pagedllm.profiler import StepProfiler
from pagedllm.sample.logprobs import prompt_logprobs
from pagedllm.sample.sampler import Sampler
from pagedllm.spec_decode.rejection import rejection_sample, sampling_probs
from pagedllm.spec_decode.verify import num_accepted, sampling_rows
from pagedllm.structured_output.bitmask import apply_grammar_bitmask

if TYPE_CHECKING:
    from pagedllm.spec_decode.draft_model import DraftModel, DraftProposal


def prepare_inputs(token_ids: list[list[int]], start_positions: list[int],
                   block_tables: list[list[int]], block_size: int, device: torch.device):
    """Flat token ids and positions, attention metadata, and each run's end row, for runs of
    consecutive tokens (run i: token_ids[i] from position start_positions[i] on)."""
    if len(token_ids) <= DECODE_FAST_PATH_MAX_SEQS and all(len(t) == 1 for t in token_ids):
        return _prepare_decode(token_ids, start_positions, block_tables, block_size, device)
    query_lens = [len(t) for t in token_ids]
    starts = np.array(start_positions, dtype=np.int64)
    seq_lens = (starts + np.array(query_lens, dtype=np.int64)).tolist()
    # Positions of the flat batch: each run counts up from its start position.
    # E.g. query_lens [2, 3, 1], starts [0, 7, 4] -> [0, 1, 7, 8, 9, 4]
    query_ends = np.cumsum(query_lens)
    offsets = np.arange(query_ends[-1]) - np.repeat(query_ends - query_lens, query_lens)
    positions = np.repeat(starts, query_lens) + offsets
    input_ids = np.fromiter((t for run in token_ids for t in run), dtype=np.int64,
                            count=int(query_ends[-1]))
    metadata = build_attention_metadata(query_lens, seq_lens, block_tables, block_size, device)
    return (
        torch.from_numpy(input_ids).to(device),
        torch.from_numpy(positions).to(device),
        metadata,
        query_ends,
    )


# Up to this many sequences, a step of one token each builds its inputs from Python lists
# (build_decode_metadata): numpy's fixed cost per call is most of a small step's preparation.
DECODE_FAST_PATH_MAX_SEQS = 16


def _prepare_decode(token_ids: list[list[int]], start_positions: list[int],
                    block_tables: list[list[int]], block_size: int, device: torch.device):
    """prepare_inputs for runs of one token each: the same tensors."""
    num_seqs = len(token_ids)
    metadata = build_decode_metadata([p + 1 for p in start_positions], block_tables,
                                     block_size, device)
    return (
        host_tensor(np.array([t[0] for t in token_ids], dtype=np.int64), device),
        host_tensor(np.array(start_positions, dtype=np.int64), device),
        metadata,
        np.arange(1, num_seqs + 1),
    )


def _take_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows] for increasing row ids: a view when they are consecutive (a decode step's
    rows, all of them), else a gather."""
    if rows[-1] - rows[0] == len(rows) - 1 and hidden.is_contiguous():
        return hidden if len(rows) == hidden.shape[0] else hidden[rows[0] : rows[-1] + 1]
    return hidden[torch.tensor(rows, device=hidden.device)]


class ModelRunner:
    """Runs the model over a flattened batch and samples the rows that end a request's chunk."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        seed: int,
        profiler: StepProfiler | None = None,
        draft: DraftModel | None = None,
    ) -> None:
        self.model = model
        # speculative_config method "draft_model": the model that proposes (spec_decode/).
        self.draft = draft
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed=seed)
        self.profiler = profiler or StepProfiler()
        self.profiler.time_modules(model, model.profiled_modules)
        if self.profiler.enabled:
            model.attach_profiler(self.profiler)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        section = self.profiler.section
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return ModelRunnerOutput(sampled={})
        proposals: dict[str, DraftProposal] = {}
        if self.draft is not None and any(s.spec_token_ids for s in scheduled):
            with section("draft"):
                scheduled, proposals = self.draft.propose(scheduled, self.sampler,
                                                          prepare_inputs)
        with section("prepare inputs"):
            input_ids, positions, metadata, query_ends = prepare_inputs(
                [s.token_ids for s in scheduled], [s.start_position for s in scheduled],
                [s.block_table for s in scheduled], self.block_size, self.device)
        with section("forward"):
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
            # hidden: [num_tokens, hidden_size]
        if self.draft is not None:
            self.draft.note_writes(metadata.slot_mapping, proposals)

        with section("prompt logprobs"):
            prompt_chunks = self._prompt_logprobs(scheduled, hidden, query_ends)
        sampled_items = [(i, s) for i, s in enumerate(scheduled) if s.sample]
        if not sampled_items:
            return ModelRunnerOutput(sampled={}, prompt_logprobs=prompt_chunks)
        # The LM head sees the last token of each sampled request, and the rows of its
        # speculative proposals (spec_decode/verify.py) before it.
        items = [s for _, s in sampled_items]
        batch, row_counts = sampling_rows(items)
        ends = query_ends.tolist()
        rows = [ends[i] - n + r for (i, _), n in zip(sampled_items, row_counts) for r in range(n)]
        with section("lm head"):
            logits = self.model.compute_logits(_take_rows(hidden, rows))  # [rows, vocab] fp32
        if logits is None:  # a tensor-parallel rank past 0: rank 0 samples
            return ModelRunnerOutput(sampled={})
        with section("grammar mask"):  # structured outputs: forbidden -> -inf
            # NOTE: the scheduler's fill ran beside the forward pass; it is waited for here.
            bitmask = scheduler_output.grammar_bitmask
            if bitmask is not None:
                if len(row_counts) < len(rows):
                    # NOTE: constrained rows never speculate; a proposal row repeats its
                    # item's mask.
                    bitmask = np.repeat(bitmask, row_counts, axis=0)
                apply_grammar_bitmask(logits, bitmask)
        # Items whose draft drew its proposals from a distribution q (not its argmax) are
        # verified by rejection sampling (spec_decode/rejection.py); the sampler takes the rest.
        drawn = [n for n, s in enumerate(items)
                 if s.seq_id in proposals and proposals[s.seq_id].probs is not None]
        tokens_of: list[list[SampledToken]] = [[] for _ in items]
        with section("sampling"):
            if drawn:
                firsts = list(itertools.accumulate(row_counts, initial=0))
                taken = set(drawn)
                rest = [n for n in range(len(items)) if n not in taken]
                for n in drawn:
                    tokens_of[n] = self._rejection_sample(
                        items[n], proposals[items[n].seq_id], logits[firsts[n]:firsts[n + 1]])
                if rest:
                    batch, _ = sampling_rows([items[n] for n in rest])
                    rows = torch.tensor([firsts[n] + r for n in rest
                                         for r in range(row_counts[n])], device=logits.device)
                    logits = logits[rows]
                    row_counts = [row_counts[n] for n in rest]
            else:
                rest = list(range(len(items)))
            if rest:
                result = self.sampler(logits, batch)
                first = 0
                for n, count in zip(rest, row_counts):
                    samples = result.sampled_token_ids[first : first + count]
                    m = num_accepted(items[n].spec_token_ids, samples) if count > 1 else 0
                    tokens_of[n] = [
                        SampledToken(token_id=samples[j],
                                     logprob=result.sampled_logprobs[first + j],
                                     rank=result.sampled_ranks[first + j],
                                     top_logprobs=result.top_logprobs[first + j])
                        for j in range(m + 1)]
                    first += count
        sampled = {s.seq_id: tokens[0] for s, tokens in zip(items, tokens_of)}
        accepted = {s.seq_id: tokens[1:] for s, tokens in zip(items, tokens_of) if len(tokens) > 1}
        return ModelRunnerOutput(sampled=sampled, spec_accepted=accepted,
                                 prompt_logprobs=prompt_chunks)

    def _rejection_sample(self, s: ScheduledRequest, proposal: DraftProposal,
                          logits: torch.Tensor) -> list[SampledToken]:
        """The tokens of an item whose proposals the draft drew from q: accepted proposals,
        then the correction or bonus token, with their logprobs under the target's raw
        logits ([k + 1, vocab], the item's rows)."""
        batch, _ = sampling_rows([s])
        p = sampling_probs(self.sampler, logits, batch)
        token_ids = rejection_sample(p, proposal.probs, proposal.token_ids, s.sampling_params,
                                     s.seq_index, len(s.output_token_ids), self.draft.generator)
        params = s.sampling_params
        rows = logits[: len(token_ids)]
        if not params.needs_sampled_logprobs:
            return [SampledToken(t, None, None, None) for t in token_ids]
        entries = prompt_logprobs(rows, torch.tensor(token_ids, device=logits.device),
                                  params.logprobs or 0)
        if params.logprobs is None:  # best_of's cumulative logprob: no rank or top-k
            return [SampledToken(e.token_id, e.logprob, None, None) for e in entries]
        return entries

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor,
                         query_ends: np.ndarray) -> dict[str, PromptLogprobsChunk]:
        """The prompt logprobs of this step's chunks, for requests that ask for them.

        The row at position p predicts prompt token p + 1: a chunk over positions
        [start, end) yields tokens start + 1 .. min(end, prompt_len - 1).
        """
        chunks: dict[str, PromptLogprobsChunk] = {}
        for i, s in enumerate(scheduled):
            k = s.sampling_params.prompt_logprobs
            if k is None or s.seq_index != 0:
                continue
            end = min(s.start_position + s.num_tokens, len(s.prompt_token_ids) - 1)
            if s.start_position >= end:
                continue
            first_row = int(query_ends[i]) - s.num_tokens
            rows = torch.arange(first_row, first_row + end - s.start_position,
                                device=hidden.device)
            targets = torch.tensor(s.prompt_token_ids[s.start_position + 1 : end + 1],
                                   device=hidden.device)
            logits = self.model.compute_logits(hidden[rows])
            if logits is None:  # a tensor-parallel rank past 0: rank 0 answers
                continue
            chunks[s.request_id] = PromptLogprobsChunk(
                first_index=s.start_position + 1, tokens=prompt_logprobs(logits, targets, k))
        return chunks
