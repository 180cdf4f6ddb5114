"""One step's tensor work: SchedulerOutput -> flat inputs -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.attention.metadata import build_attention_metadata
from pagedllm.core.interface import (
    ModelRunnerOutput,
    PromptLogprobsChunk,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.models.interface import CausalLM
from pagedllm.profiler import StepProfiler
from pagedllm.sample.sampler import Sampler, prompt_logprobs
from pagedllm.spec_decode.verify import num_accepted, sampling_rows
from pagedllm.structured_output.bitmask import apply_grammar_bitmask


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
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed=seed)
        self.profiler = profiler or StepProfiler()
        self.profiler.time_modules(model, model.profiled_modules)
        if self.profiler.enabled:
            model.attach_profiler(self.profiler)

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]):
        """Flat token ids and positions, attention metadata, and each request's end row."""
        query_lens = [s.num_tokens for s in scheduled]
        start_positions = np.array([s.start_position for s in scheduled], dtype=np.int64)
        seq_lens = (start_positions + np.array(query_lens, dtype=np.int64)).tolist()
        # Positions of the flat batch: each request counts up from its start position.
        # E.g. query_lens [2, 3, 1], starts [0, 7, 4] -> [0, 1, 7, 8, 9, 4]
        query_ends = np.cumsum(query_lens)
        offsets = np.arange(query_ends[-1]) - np.repeat(query_ends - query_lens, query_lens)
        positions = np.repeat(start_positions, query_lens) + offsets
        input_ids = np.fromiter(
            (t for s in scheduled for t in s.token_ids), dtype=np.int64, count=int(query_ends[-1])
        )
        metadata = build_attention_metadata(
            query_lens, seq_lens, [s.block_table for s in scheduled], self.block_size, self.device
        )
        return (
            torch.from_numpy(input_ids).to(self.device),
            torch.from_numpy(positions).to(self.device),
            metadata,
            query_ends,
        )

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        profiler = self.profiler
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return ModelRunnerOutput(sampled={})
        with profiler.section("prepare inputs"):
            input_ids, positions, metadata, query_ends = self._prepare_inputs(scheduled)
        with profiler.section("forward"):
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
            # hidden: [num_tokens, hidden_size]

        with profiler.section("prompt logprobs"):
            prompt_chunks = self._prompt_logprobs(scheduled, hidden, query_ends)
        sampled_items = [(i, s) for i, s in enumerate(scheduled) if s.sample]
        if not sampled_items:
            return ModelRunnerOutput(sampled={}, prompt_logprobs=prompt_chunks)
        # The LM head sees the last token of each sampled request, and the rows of its
        # speculative proposals (spec_decode/verify.py) before it.
        batch, row_counts = sampling_rows([s for _, s in sampled_items])
        rows = torch.tensor([int(query_ends[i]) - n + r
                             for (i, _), n in zip(sampled_items, row_counts) for r in range(n)],
                            device=self.device)
        with profiler.section("lm head"):
            logits = self.model.compute_logits(hidden[rows])  # [num_rows, vocab] float32
        if logits is None:  # a tensor-parallel rank past 0: rank 0 samples
            return ModelRunnerOutput(sampled={})
        if scheduler_output.grammar_bitmask is not None:  # structured outputs: forbidden -> -inf
            # NOTE: constrained rows never speculate; a proposal row repeats its item's mask.
            apply_grammar_bitmask(logits, np.repeat(scheduler_output.grammar_bitmask,
                                                    row_counts, axis=0))
        with profiler.section("sampling"):
            result = self.sampler(logits, batch)
        tokens = [
            SampledToken(token_id=result.sampled_token_ids[j], logprob=result.sampled_logprobs[j],
                         rank=result.sampled_ranks[j], top_logprobs=result.top_logprobs[j])
            for j in range(sum(row_counts))
        ]
        sampled, accepted = {}, {}
        first = 0
        for (_, s), n in zip(sampled_items, row_counts):
            sampled[s.seq_id] = tokens[first]
            if n > 1:
                m = num_accepted(s.spec_token_ids, result.sampled_token_ids[first : first + n])
                if m:
                    accepted[s.seq_id] = tokens[first + 1 : first + 1 + m]
            first += n
        return ModelRunnerOutput(sampled=sampled, spec_accepted=accepted,
                                 prompt_logprobs=prompt_chunks)

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor,
                         query_ends: np.ndarray) -> dict[str, PromptLogprobsChunk]:
        """The prompt logprobs of this step's chunks, for requests that ask for them.

        The row at position p predicts prompt token p + 1: a chunk over positions
        [start, end) yields tokens start + 1 .. min(end, prompt_len - 1).
        """
        chunks: dict[str, PromptLogprobsChunk] = {}
        for i, s in enumerate(scheduled):
            k = s.sampling_params.prompt_logprobs
            num_prompt = len(s.prompt_token_ids)
            end = min(s.start_position + s.num_tokens, num_prompt - 1)
            if k is None or s.seq_index != 0 or s.start_position >= end:
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
