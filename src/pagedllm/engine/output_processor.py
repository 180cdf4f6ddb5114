"""Per-request output state: detokenized text, stop strings, log-probabilities, RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pagedllm.core.interface import RequestUpdate
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the output side remembers of one live request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def make_output(self) -> RequestOutput:
        finished = self.finish_reason is not None
        completion = CompletionOutput(
            index=0,
            text=self.detokenizer.output_text(finished),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=dict(self.metrics),
        )


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
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids,
            stop=list(params.stop or ()),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        self.states[request_id] = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=detokenizer,
            logprobs=[] if params.logprobs is not None else None,
            metrics={"arrival": arrival_time},
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        state.finish_reason = "abort"
        state.metrics["finished"] = time.time()
        return state.make_output()

    def process_updates(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Applies one step's updates.

        Returns:
            The outputs of the requests that changed, and the ids of requests that a stop
            string finished (the scheduler must still be told to free them).
        """
        outputs: list[RequestOutput] = []
        stopped_by_string: list[str] = []
        now = time.time()
        for update in updates:
            state = self.states.get(update.request_id)
            if state is None:
                continue
            state.metrics.setdefault("first_token", now)
            for sampled in update.new_tokens:
                state.token_ids.append(sampled.token_id)
                state.cumulative_logprob += sampled.logprob
                if state.logprobs is not None:
                    state.logprobs.append(self._logprob_entry(sampled))
                # NOTE: a stop token's text is left out (as vLLM does) unless asked for.
                if (
                    update.stop_token_id == sampled.token_id
                    and not state.params.include_stop_str_in_output
                ):
                    continue
                stop_str = state.detokenizer.add_token(sampled.token_id)
                if stop_str is not None:
                    state.finish_reason = "stop"
                    state.stop_reason = stop_str
                    if update.finish_reason is None:
                        stopped_by_string.append(update.request_id)
                    break
            if state.finish_reason is None and update.finish_reason is not None:
                state.finish_reason = update.finish_reason
                if update.finish_reason == "stop" and update.stop_token_id is not None:
                    is_eos_stop = update.stop_token_id not in (state.params.stop_token_ids or ())
                    state.stop_reason = None if is_eos_stop else update.stop_token_id
            if state.finish_reason is not None:
                state.metrics["finished"] = now
                del self.states[update.request_id]
            outputs.append(state.make_output())
        return outputs, stopped_by_string

    def _logprob_entry(self, sampled) -> dict[int, Logprob]:
        entry = {
            sampled.token_id: Logprob(
                sampled.logprob, sampled.rank, self.tokenizer.decode([sampled.token_id])
            )
        }
        for rank, (token_id, logprob) in enumerate(sampled.top_logprobs or (), start=1):
            if token_id not in entry:
                entry[token_id] = Logprob(logprob, rank, self.tokenizer.decode([token_id]))
        return entry
