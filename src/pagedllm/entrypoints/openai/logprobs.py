"""Log-probabilities as endpoints report them: token text, JSON-safe logprob, top-N by rank."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.outputs import CompletionOutput, Logprob

# JSON has no -inf; masked tokens report this instead (as vLLM does).
MIN_LOGPROB = -9999.0

# Per token: (its text, its logprob or None, [(top token text, logprob)] by rank).
LogprobRow = tuple[str, float | None, list[tuple[str, float]]]


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: Logprob | None
               ) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def iter_logprobs(tokenizer: PreTrainedTokenizerBase, output: CompletionOutput, start: int,
                  num_top: int) -> list[LogprobRow]:
    """One row per token of `output.token_ids[start:]`, with its `num_top` best alternatives."""
    rows = []
    entries = output.logprobs or []
    for pos in range(start, len(output.token_ids)):
        token_id = output.token_ids[pos]
        entry: dict[int, Logprob] = entries[pos] if pos < len(entries) else {}
        chosen = entry.get(token_id)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or math.inf)
        top = [(token_text(tokenizer, tid, lp), _clamp(lp.logprob)) for tid, lp in ranked
               if lp.rank is not None and lp.rank <= num_top]
        rows.append((token_text(tokenizer, token_id, chosen),
                     None if chosen is None else _clamp(chosen.logprob), top))
    return rows


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB) if not math.isnan(logprob) else MIN_LOGPROB
