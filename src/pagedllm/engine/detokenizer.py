"""Incremental detokenization and stop-string matching, exact across token boundaries."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pagedllm.tokenizer import FastTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens of context decoded before the new ones, so that a token whose text depends on its
# left neighbour (a leading space in SentencePiece, a multi-byte character split over two
# byte-level tokens) renders as it does in a full decode.
_PREFIX_WINDOW = 5


# Where transformers defines the generic decode of a fast tokenizer (5.x, then 4.x names).
_GENERIC_DECODE_MODULES = (
    "transformers.tokenization_utils_base",
    "transformers.tokenization_utils_tokenizers",
    "transformers.tokenization_utils_fast",
)


def _backend_decode(tokenizer: PreTrainedTokenizerBase) -> Callable[..., str] | None:
    """The fast tokenizer's own decode, where tokenizer.decode would only call it: no cleanup
    (off here) and no spaces_between_special_tokens (a slow-tokenizer option). Skipping the
    wrapper's argument handling saves most of its ~6-8 us per call, two calls per generated
    token. None for slow tokenizers and for classes that override decode (Whisper, CodeGen,
    remote code), which keep tokenizer.decode.
    """
    if isinstance(tokenizer, FastTokenizer):
        if not tokenizer.delegates:  # its decode is the Rust tokenizer's
            return tokenizer.backend_tokenizer.decode
        tokenizer = tokenizer.hf_tokenizer
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, name).__module__ not in _GENERIC_DECODE_MODULES
           for name in ("decode", "_decode")):
        return None
    return tokenizer.backend_tokenizer.decode


class IncrementalDetokenizer:
    """Turns a growing token list into text, one step's tokens at a time.

    Text is emitted only when the newest tokens decode to complete characters (no U+FFFD
    replacement at the end). With stop strings, the last `len(longest stop) - 1` characters are
    held back until the request finishes, so a stop string split over two steps is never
    partly shown.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._backend_decode = _backend_decode(tokenizer)
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self._token_ids = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        # Full decoded output text (not held back, not truncated at stops).
        self.text = ""
        # Characters of `text` already handed out.
        self._num_emitted = 0

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends a token; returns the stop string it completed, if any.

        After a stop, `text` ends before the stop string (or after it, with
        include_stop_str_in_output). Without `check_stop` (min_tokens not reached yet) the text
        grows but no stop string ends it; later checks look only at text added from then on.
        """
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        old_len = len(self.text)
        self.text += delta
        return self._find_stop(old_len) if check_stop else None

    def _find_stop(self, old_len: int) -> str | None:
        """Cuts the text at the earliest stop string that ends inside the new characters."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, max(old_len - len(stop) + 1, 0))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop) if self.include_stop_str_in_output else index]
        return stop

    def output_text(self, finished: bool) -> str:
        """The text a client may see now: all of it once finished, else minus the hold-back."""
        if finished or not self.hold_back:
            return self.text
        return self.text[: max(len(self.text) - self.hold_back, self._num_emitted)]

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out (for streaming)."""
        visible = self.output_text(finished)
        delta = visible[self._num_emitted :]
        self._num_emitted = len(visible)
        return delta
