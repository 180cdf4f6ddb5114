"""The grammar backend seam: what the engine asks of a constrained-decoding library.

A backend turns a request's constraint (StructuredOutputsParams) into a grammar object. The
engine keeps one grammar object per sequence, advances it with each accepted token, and asks
it each step for the sequence's bitmask over the vocabulary; only the backend knows the
library. Backends are registered by name and imported lazily (`make_backend`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from pagedllm.sampling_params import StructuredOutputsParams


class StructuredOutputGrammar(ABC):
    """One sequence's position in a compiled grammar.

    Invariant: the tokens accepted so far are a prefix of some text the constraint accepts.
    Once the grammar cannot extend that text any further it is terminated, and its bitmask
    allows EOS alone (also when a token was refused: the grammar is then in an error state).
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Tokens the bitmask covers: ceil(vocab_size / 32) int32 words per row."""

    @abstractmethod
    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        """Advances over `tokens`; False if one was refused (the grammar then allows only EOS)."""

    @abstractmethod
    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the grammar would accept, without advancing."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Forgets the last `num_tokens` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]` ([rows, words] int32; bit j of
        word w allows token 32 * w + j)."""

    @classmethod
    def fill_bitmasks(cls, grammars: Sequence[tuple[int, StructuredOutputGrammar]],
                      bitmask: np.ndarray) -> None:
        """Fills `bitmask[row]` for each (row, grammar) of this class: the step's rows at once,
        which a library may fill in one call (the default fills them one by one)."""
        for row, grammar in grammars:
            grammar.fill_bitmask(bitmask, row)

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the text is complete and nothing but EOS may follow."""

    @abstractmethod
    def copy(self) -> StructuredOutputGrammar:
        """An independent grammar in the same state (a forked sample; a compiled template)."""

    @property
    def error(self) -> str | None:
        """Why the grammar stopped accepting tokens, if it did."""
        return None


class StructuredOutputBackend(ABC):
    """A grammar library bound to one tokenizer.

    `validate` is cheap and runs where the request is checked; `compile` may be slow and runs
    on the manager's compile thread. Both take the same StructuredOutputsParams.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @abstractmethod
    def validate(self, params: StructuredOutputsParams) -> None:
        """Raises ValueError, starting with the field's name ("structured_outputs.regex ..."),
        when the backend cannot compile the constraint."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> StructuredOutputGrammar:
        """A grammar in its initial state. Never raises for a constraint `validate` passed; a
        later failure leaves a grammar that allows EOS alone."""


# Backend name -> "module:class", imported on first use so a missing library costs nothing
# until it is chosen.
_BACKENDS = {
    "guidance": "pagedllm.structured_output.llguidance_backend:GuidanceBackend",
}
BACKEND_NAMES = tuple(_BACKENDS)


def make_backend(name: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int
                 ) -> StructuredOutputBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown structured output backend {name!r}: choose one of "
                         f"{', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(tokenizer, vocab_size)
