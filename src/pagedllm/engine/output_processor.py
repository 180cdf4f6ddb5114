"""Per-request output state: detokenized text, stop strings, log-probabilities, RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.core.beam_search import Hypothesis
from pagedllm.core.interface import PromptLogprobsChunk, RequestUpdate, SampledToken
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class SequenceState:
    """The output side of one sequence (one sample) of a request."""

    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = 0.0  # None where the params do not need it
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def make_output(self, index: int) -> CompletionOutput:
        return CompletionOutput(
            index=index,
            text=self.detokenizer.output_text(self.finish_reason is not None),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    """What the output side remembers of one live request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceState]
    metrics: dict[str, float] = field(default_factory=dict)
    # Beam search only: the finished beams, best first.
    beam_outputs: list[CompletionOutput] | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token computed so far.
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        if self.beam_outputs is not None:
            return True
        return all(s.finish_reason is not None for s in self.seqs)

    def make_output(self) -> RequestOutput:
        """While running: every sequence. Finished: the best `n` by cumulative logprob."""
        finished = self.finished
        if self.beam_outputs is not None:
            return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                                 self.beam_outputs, True, dict(self.metrics),
                                 self._prompt_logprobs())
        seqs = list(enumerate(self.seqs))
        n = self.params.n
        if finished and len(seqs) > n:
            seqs = sorted(seqs, key=lambda item: item[1].cumulative_logprob, reverse=True)[:n]
            seqs.sort(key=lambda item: item[0])
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.make_output(i) for i, (_, s) in enumerate(seqs)],
            finished=finished,
            metrics=dict(self.metrics),
            prompt_logprobs=self._prompt_logprobs(),
        )

    def _prompt_logprobs(self) -> PromptLogprobs | None:
        return None if self.prompt_logprobs is None else list(self.prompt_logprobs)


class OutputProcessor:
    """Owns every live request's output state; the only place that loops over step updates."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        seqs = [
            SequenceState(
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    stop=list(params.stop or ()),
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                ),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.needs_sampled_logprobs else None,
            )
            for _ in range(params.best_of or params.n)
        ]
        self.states[request_id] = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            seqs=seqs,
            metrics={"arrival": arrival_time},
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        state.metrics["finished"] = time.time()
        return state.make_output()

    def process_updates(
        self, updates: list[RequestUpdate], finished_only: bool = False
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Applies one step's updates.

        Returns:
            The outputs of the requests that changed (with `finished_only`, of those that
            finished: a caller that only collects final outputs skips building the others),
            and the (request id, sequence index) of sequences that a stop string finished (the
            scheduler must still free them).
        """
        changed: dict[str, RequestState] = {}
        stopped_by_string: list[tuple[str, int]] = []
        now = time.time()
        for update in updates:
            state = self.states.get(update.request_id)
            if state is None:
                continue
            if update.new_tokens or update.beams is not None:
                state.metrics.setdefault("first_token", now)
            changed[update.request_id] = state
            if update.prompt_logprobs is not None and state.prompt_logprobs is not None:
                self._add_prompt_logprobs(state.prompt_logprobs, update.prompt_logprobs)
            if update.beams is not None:
                state.beam_outputs = [self._beam_output(i, h, state.params)
                                      for i, h in enumerate(update.beams)]
                continue
            seq = state.seqs[update.seq_index]
            for sampled in update.new_tokens:
                if self._append_token(state.params, seq, sampled, update.stop_token_id):
                    if update.finish_reason is None:
                        stopped_by_string.append((update.request_id, update.seq_index))
                    break
            if seq.finish_reason is None and update.finish_reason is not None:
                seq.finish_reason = update.finish_reason
                if update.finish_reason == "stop" and update.stop_token_id is not None:
                    is_eos_stop = update.stop_token_id not in (state.params.stop_token_ids or ())
                    seq.stop_reason = None if is_eos_stop else update.stop_token_id
        outputs = []
        for request_id, state in changed.items():
            if state.finished:
                state.metrics["finished"] = now
                del self.states[request_id]
            elif finished_only:
                continue
            outputs.append(state.make_output())
        return outputs, stopped_by_string

    def _append_token(self, params: SamplingParams, seq: SequenceState, sampled: SampledToken,
                      stop_token_id: int | None) -> bool:
        """Adds one token to a sequence; True when it completed a stop string."""
        seq.token_ids.append(sampled.token_id)
        if seq.cumulative_logprob is not None:
            seq.cumulative_logprob += sampled.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(sampled))
        # NOTE: a stop token's text is left out (as vLLM does) unless asked for.
        if stop_token_id == sampled.token_id and not params.include_stop_str_in_output:
            return False
        # NOTE: stop strings count only past min_tokens, as vLLM has it (EOS and stop token ids
        # are masked until then by the sampler).
        stop_str = seq.detokenizer.add_token(sampled.token_id,
                                             check_stop=len(seq.token_ids) > params.min_tokens)
        if stop_str is None:
            return False
        seq.finish_reason = "stop"
        seq.stop_reason = stop_str
        return True

    def _beam_output(self, index: int, beam: Hypothesis, params: SamplingParams
                     ) -> CompletionOutput:
        return CompletionOutput(
            index=index,
            text=self.tokenizer.decode(beam.token_ids, skip_special_tokens=True),
            token_ids=list(beam.token_ids),
            cumulative_logprob=beam.cumulative_logprob,
            logprobs=None,
            finish_reason=beam.finish_reason,
        )

    def _add_prompt_logprobs(self, entries: PromptLogprobs, chunk: PromptLogprobsChunk) -> None:
        """Appends a chunk's entries; positions already there (a prompt recomputed after a
        preemption) keep their first entries."""
        for i, token in enumerate(chunk.tokens):
            if chunk.first_index + i == len(entries):
                entries.append(self._logprob_entry(token))

    def _logprob_entry(self, sampled: SampledToken) -> dict[int, Logprob]:
        entry = {
            sampled.token_id: Logprob(
                sampled.logprob, sampled.rank, self.tokenizer.decode([sampled.token_id])
            )
        }
        for rank, (token_id, logprob) in enumerate(sampled.top_logprobs or (), start=1):
            if token_id not in entry:
                entry[token_id] = Logprob(logprob, rank, self.tokenizer.decode([token_id]))
        return entry
