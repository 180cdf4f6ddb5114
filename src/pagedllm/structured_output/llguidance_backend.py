"""The llguidance backend: JSON schemas, regexes, choices and Lark/GBNF grammars as token
masks, computed lazily per step by llguidance's Rust parser (no torch, CPU wheels)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy as llguidance_numpy

from pagedllm.structured_output.backend import StructuredOutputBackend, StructuredOutputGrammar

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class GuidanceGrammar(StructuredOutputGrammar):
    """An `llguidance.LLMatcher`: once stopped (complete, or a token refused) its mask allows
    EOS alone, and accepting more tokens (EOS) changes nothing."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._warned = False

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        if self._matcher.is_stopped():
            return not self._matcher.is_error()
        if self._matcher.consume_tokens(list(tokens)):
            return True
        if not self._warned:
            self._warned = True
            logger.warning("a constrained sequence took a token its grammar refuses; only EOS "
                           "may follow: %s", self._matcher.get_error())
        return False

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        if self._matcher.is_stopped():
            return 0
        return self._matcher.validate_tokens(list(tokens))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        llguidance_numpy.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    def copy(self) -> GuidanceGrammar:
        return GuidanceGrammar(self._matcher.deep_copy(), self._vocab_size)

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None


class GuidanceBackend(StructuredOutputBackend):
    """llguidance over the engine's Hugging Face tokenizer (a fast one).

    Validation parses the constraint without the tokenizer (milliseconds); the token-level
    tables are built on the first compile (about a second, once per engine), on the compile
    thread.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def validate(self, params: StructuredOutputsParams) -> None:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
            # NOTE: a ValueError, as every refusal of a request: the model's tokenizer is at fault.
            raise ValueError(  # noqa: TRY004
                f"structured_outputs needs a fast (Rust) tokenizer; this model's is "
                f"{type(self.tokenizer).__name__}")
        if params.constraint == "choice":
            # NOTE: quoted literals always parse; checking them would cost the caller (the
            # server's event loop) about as long as a compile: 1 s for 100,000 choices.
            return
        name = f"structured_outputs.{params.constraint}"
        try:
            grammar = _grammar_text(params)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{name} is invalid: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
        if error:
            raise ValueError(f"{name} is invalid: {error.strip()}")

    def compile(self, params: StructuredOutputsParams) -> GuidanceGrammar:
        tokenizer = self._get_ll_tokenizer()
        try:
            grammar = _grammar_text(params)
        except (ValueError, TypeError, KeyError):
            grammar = ""  # `validate` refused it already; an empty grammar is an error state
        # NOTE: LLMatcher never raises for a bad grammar; it starts in an error state, whose
        # mask allows EOS alone. It drops the GIL while it builds.
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            logger.error("structured_outputs.%s failed to compile: %s", params.constraint,
                         matcher.get_error())
        return GuidanceGrammar(matcher, tokenizer.vocab_size)

    def _get_ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                # The model's vocabulary may be padded past the tokenizer's: the extra ids
                # are never allowed.
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=max(self.vocab_size, len(self.tokenizer)))
            return self._ll_tokenizer


def _grammar_text(params: StructuredOutputsParams) -> str:
    """The constraint as an llguidance grammar (its JSON form)."""
    constraint = params.constraint
    if constraint in ("json", "json_object"):
        schema = {"type": "object"} if constraint == "json_object" else params.json
        options: dict = {"whitespace_flexible": not params.disable_any_whitespace}
        if params.whitespace_pattern is not None:
            options["whitespace_pattern"] = params.whitespace_pattern
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if constraint == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if constraint == "choice":
        # One terminal of quoted alternatives, "start: CHOICE\nCHOICE: \"yes\" | \"no\"", so
        # the lexer matches them: as alternatives of a rule, the parser refuses more than 2,000.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(choice) for choice in params.choice))
    return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted
