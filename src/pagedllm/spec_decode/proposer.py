"""The scheduler's side of speculation: when a sequence proposes, what, and the counts.

One interface for both methods: `propose` gives the tokens to verify after a decode. An n-gram
proposal is known here; a draft model's is decoded by the worker (spec_decode/draft_model.py)
in the step itself, so here it is `k` placeholder tokens (DRAFT_PLACEHOLDER) that reserve the
slots and the budget, and the runner puts the draft's tokens in their place."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.request import Sequence
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import propose_ngram

# Weight of the latest step in a sequence's moving acceptance rate.
_RATE_WEIGHT = 0.25
# A proposal slot whose token the worker's draft model fills in (never a real token id).
DRAFT_PLACEHOLDER = -1


@dataclass
class SpecDecodeStats:
    """Counts since start (vLLM's spec_decode metrics)."""

    # Sequence-steps that verified at least one proposal ("drafts").
    num_drafts: int = 0
    # Proposed tokens, and those accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # [k] accepted tokens by their position in the proposal (0 = first proposed).
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


class Speculator:
    """Proposes for decoding sequences (n-gram continuations, or slots for the draft model's
    tokens) and keeps acceptance counts.

    A sequence whose moving acceptance rate falls below `min_acceptance_rate` stops proposing
    for `cooldown_steps` of its steps, then starts again from a fresh rate.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.stats = SpecDecodeStats(
            num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)
        self._rates: dict[str, float] = {}  # seq_id -> moving acceptance rate
        self._cooldowns: dict[str, int] = {}  # seq_id -> steps left without proposals

    def step_enabled(self, num_running_seqs: int) -> bool:
        """Whether a step with this many running sequences speculates at all."""
        return num_running_seqs <= self.config.disable_by_batch_size

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) proposals after the sequence's last token ([] for none)."""
        cooldown = self._cooldowns.get(seq.seq_id)
        if cooldown is not None:
            if cooldown > 1:
                self._cooldowns[seq.seq_id] = cooldown - 1
                return []
            del self._cooldowns[seq.seq_id]
            self._rates.pop(seq.seq_id, None)
        config = self.config
        k = min(config.num_speculative_tokens, max_tokens)
        if config.method == "draft_model":
            return [DRAFT_PLACEHOLDER] * k
        return propose_ngram(seq.all_token_ids, k, config.prompt_lookup_min,
                             config.prompt_lookup_max)

    def record(self, seq_id: str, num_proposed: int, num_accepted: int) -> None:
        """Counts one verification of `num_proposed` tokens, `num_accepted` of them taken."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_proposed
        stats.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            stats.num_accepted_tokens_per_pos[pos] += 1
        rate = self._rates.get(seq_id, 1.0)
        rate += _RATE_WEIGHT * (num_accepted / num_proposed - rate)
        self._rates[seq_id] = rate
        if rate < self.config.min_acceptance_rate:
            self._cooldowns[seq_id] = self.config.cooldown_steps

    def forget(self, seq_id: str) -> None:
        """Drops a finished sequence's state."""
        self._rates.pop(seq_id, None)
        self._cooldowns.pop(seq_id, None)
