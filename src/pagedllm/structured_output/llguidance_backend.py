"""The llguidance backend: JSON schemas, regexes, choices and Lark/GBNF grammars as token
masks, computed lazily per step by llguidance's Rust parser (no torch, CPU wheels)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
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

    @classmethod
    def fill_bitmasks(cls, grammars: Sequence[tuple[int, GuidanceGrammar]],
                      bitmask: np.ndarray) -> None:
        # NOTE: one call for the step's rows, without the GIL from the first row to the last
        # (row by row, the Python between rows takes the GIL back 64 times in a step that
        # overlaps the forward pass); one Rust thread, as the forward has the cores.
        llguidance_numpy.fill_next_token_bitmask_par(
            _mask_executor(), [(grammar._matcher, row) for row, grammar in grammars], bitmask)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    def copy(self) -> GuidanceGrammar:
        return GuidanceGrammar(self._matcher.deep_copy(), self._vocab_size)

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None


class GuidanceBackend(StructuredOutputBackend):
    """llguidance over the engine's Hugging Face tokenizer (a fast one).

    Validation parses the constraint without the tokenizer (milliseconds). The token-level
    tables (0.6-1.6 s here, with the GIL held) are built by `prepare`, on a thread at engine
    start, or else on the first compile, on the compile thread; a process shares them between
    engines whose tokenizer files are the same (`token_tables`).
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
                # The model's vocabulary may be padded past the tokenizer's: the extra ids
                # are never allowed.
                self._ll_tokenizer = token_tables(
                    self.tokenizer, max(self.vocab_size, len(self.tokenizer)))
            return self._ll_tokenizer


# The files a Hugging Face tokenizer is loaded from (and llguidance's tables with it).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")
# Tables by what they are built from (`_tables_key`), the most recently used last; a few
# tokenizers at most (tens of MB each).
_tables: OrderedDict[tuple, llguidance.LLTokenizer] = OrderedDict()
_tables_lock = threading.Lock()
_MAX_TABLES = 4


def token_tables(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> llguidance.LLTokenizer:
    """llguidance's tables of a fast tokenizer over `n_vocab` ids, shared by every engine in the
    process whose tokenizer was loaded from the same files (a test session starts hundreds of
    engines on one tokenizer); built once, holding the GIL (to_str 0.5 s, tables 0.6-1 s)."""
    import llguidance.hf

    key = _tables_key(tokenizer, n_vocab)
    with _tables_lock:
        if key is not None and key in _tables:
            _tables.move_to_end(key)
            return _tables[key]
        tables = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
        if key is not None:
            _tables[key] = tables
            while len(_tables) > _MAX_TABLES:
                _tables.popitem(last=False)
        return tables


def _tables_key(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> tuple | None:
    """A hash of the tokenizer's files with what the tables take from the object itself (its
    length, which counts tokens added in memory, and EOS), or None where it has no files."""
    directory = Path(tokenizer.name_or_path)
    if not (directory / "tokenizer.json").is_file():
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name in _TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest(), n_vocab, len(tokenizer), tokenizer.eos_token_id


@functools.cache
def _mask_executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor(num_threads=1)


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
