"""`StructuredOutputsParams`: the constraint a request puts on its text (vLLM's names), checked
for shape here and compiled by the structured-output manager when the request is queued."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import Future


# The constraints of StructuredOutputsParams, in the order messages name them.
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's names): set exactly one of `json`, `regex`,
    `choice`, `grammar` and `json_object`.

    The text is generated under a grammar: at each step only the tokens that keep it a prefix
    of something the constraint accepts may be sampled, and EOS only where it is complete.
    Whether a schema, regex or grammar is valid is checked when the request is queued (a
    ValueError naming the field), because only the engine's grammar backend can tell.
    """

    json: str | dict[str, Any] | None = None
    """A JSON schema (a dict, or its JSON text): the output is a JSON value it validates."""

    regex: str | None = None
    """A regular expression the whole output matches."""

    choice: list[str] | None = None
    """Non-empty strings: the output is exactly one of them."""

    grammar: str | None = None
    """A context-free grammar in Lark syntax (llguidance's dialect) or GBNF: the output is a
    sentence of it."""

    json_object: bool | None = None
    """True: the output is a JSON object (any keys), as OpenAI's `{"type": "json_object"}`."""

    disable_any_whitespace: bool = False
    """JSON only: no whitespace between tokens (compact JSON). By default any run of spaces,
    tabs and newlines may sit between them."""

    whitespace_pattern: str | None = None
    """JSON only: a regex for the whitespace allowed between tokens, instead of any run."""

    # NOTE: set by the engine's input processor on its own copy (`with_compiled`): the grammar
    # being compiled for the request. Neither compared, printed nor pickled (ranks only read
    # the bitmask each step).
    _compiled: Future | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(_CONSTRAINTS)}; got "
                f"{' and '.join(given) if given else 'none'}: keep one constraint per request")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got "
                             f"{type(self.json).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"structured_outputs.regex must be a string, got {self.regex!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str)
                                         or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty string, got "
                             f"{self.grammar!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got "
                                 f"{self.choice!r}")
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must hold at least one string, "
                                 f"each non-empty; got {self.choice!r}")
            self.choice = list(self.choice)
        if not (self.json_object is None or isinstance(self.json_object, bool)):
            raise ValueError(f"structured_outputs.json_object must be a bool or None, got "
                             f"{self.json_object!r}")
        self.json_object = self.json_object or None
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be a bool, got "
                             f"{self.disable_any_whitespace!r}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError(f"structured_outputs.whitespace_pattern must be a string, got "
                             f"{self.whitespace_pattern!r}")

    @property
    def constraint(self) -> str:
        """The name of the constraint set: "json", "regex", "choice", "grammar" or
        "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def compiled(self) -> Future | None:
        """The engine's compile of this constraint, on the copy the input processor made."""
        return self._compiled

    def with_compiled(self, compiled: Future) -> StructuredOutputsParams:
        """A copy carrying `compiled` (a Future of the backend's grammar object)."""
        # NOTE: a shallow copy: the constructor would check every field again (36 ms for
        # 100,000 choices, on the server's event loop).
        copy = object.__new__(StructuredOutputsParams)
        copy.__dict__.update(self.__dict__, _compiled=compiled)
        return copy

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _compiled=None)


_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
           "whitespace_pattern")
