"""What every endpoint handler shares: served model names, request checks, sampling (or beam
search) params, log-probability formatting and SSE framing.

All validation happens here, on the event loop, before a request reaches the engine thread, so a
bad request is answered with a 400 and never touches the engine.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.outputs import CompletionOutput, Logprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer

# JSON has no -inf; masked tokens report this instead (as vLLM does).
MIN_LOGPROB = -9999.0


class OpenAIServing:
    """Base of the endpoint handlers."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        tokenizer: PreTrainedTokenizerBase,
        prompt_tokenizer: PromptTokenizer,
    ) -> None:
        self.engine = engine
        self.models = models
        # NOTE: the frontend has its own tokenizer: the engine thread detokenizes with the
        # engine's, and a fast tokenizer used from two threads can fail with "Already borrowed".
        self.tokenizer = tokenizer
        self.prompt_tokenizer = prompt_tokenizer
        self.max_model_len = models.max_model_len

    # ---- log-probabilities ---------------------------------------------------------------

    def token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def iter_logprobs(
        self, output: CompletionOutput, start: int, num_top: int
    ) -> list[tuple[str, float | None, list[tuple[str, float]]]]:
        """(token text, its logprob, [(top token text, logprob)] by rank) for tokens[start:]."""
        rows = []
        entries = output.logprobs or []
        for pos in range(start, len(output.token_ids)):
            token_id = output.token_ids[pos]
            entry: dict[int, Logprob] = entries[pos] if pos < len(entries) else {}
            chosen = entry.get(token_id)
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or math.inf)
            top = [(self.token_text(tid, lp), _clamp(lp.logprob)) for tid, lp in ranked
                   if lp.rank is not None and lp.rank <= num_top]
            rows.append((self.token_text(token_id, chosen),
                         None if chosen is None else _clamp(chosen.logprob), top))
        return rows


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB) if not math.isnan(logprob) else MIN_LOGPROB
