"""A Hugging Face fast tokenizer served by the `tokenizers` library alone, transformers' own
object built only when something beyond the everyday calls is asked of it.

Importing transformers costs a start about 0.4 s and its tokenizer object another ~0.1 s of
Python around the Rust tokenizer it wraps. The engine's hot calls need none of it: `encode` and
`decode` are the Rust tokenizer's own, `convert_ids_to_tokens` its id_to_token, and the special
tokens, chat template string and lengths are plain values. So `FastTokenizer` answers those
from the Rust tokenizer as transformers had configured it (`state_of` records its JSON and the
values; `models/hf_fast.py` keeps the record, checked against transformers' answers when it is
made), and every other attribute (`apply_chat_template`, `add_tokens`, `__call__`, ...)
builds transformers' tokenizer (`load_hf`), after which every call goes to that object, so
the answers stay transformers' own even once it has changed (tokens added, a template set).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

# The values a record holds (read through to transformers' tokenizer, they would be the same).
STATE_ATTRIBUTES = (
    "name_or_path", "chat_template", "model_max_length", "padding_side", "truncation_side",
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
    "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "sep_token_id",
    "cls_token_id", "mask_token_id", "all_special_tokens", "all_special_ids",
    "split_special_tokens",
)
# Where transformers defines the generic methods the fast path stands in for (5.x, then 4.x).
_GENERIC_MODULES = ("transformers.tokenization_utils_base",
                    "transformers.tokenization_utils_tokenizers",
                    "transformers.tokenization_utils_fast")
_STOOD_IN_FOR = ("encode", "_encode_plus", "decode", "_decode", "convert_ids_to_tokens",
                 "get_vocab", "__len__", "clean_up_tokenization")
_TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"


def state_of(hf_tokenizer: Any) -> tuple[dict, str] | None:
    """(values, Rust tokenizer JSON) that a FastTokenizer answers as hf_tokenizer does; None for
    a tokenizer the fast path cannot stand in for (a slow one, or a class with its own encode
    or decode)."""
    cls = type(hf_tokenizer)
    if not getattr(hf_tokenizer, "is_fast", False) or not hasattr(hf_tokenizer,
                                                                   "backend_tokenizer"):
        return None
    for name in _STOOD_IN_FOR:
        method = getattr(cls, name, None)
        if method is None or method.__module__ not in _GENERIC_MODULES:
            return None
    state = {name: getattr(hf_tokenizer, name) for name in STATE_ATTRIBUTES}
    if not (state["chat_template"] is None or isinstance(state["chat_template"], str)):
        return None
    state["name_or_path"] = str(state["name_or_path"])
    state["all_special_tokens"] = list(state["all_special_tokens"])
    state["all_special_ids"] = list(state["all_special_ids"])
    # transformers skips the clean-up on BPE models unless told to corrupt their output.
    clean_up = bool(hf_tokenizer.clean_up_tokenization_spaces) and not (
        type(hf_tokenizer.backend_tokenizer.model).__name__ == "BPE"
        and not getattr(hf_tokenizer,
                        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                        False))
    state["clean_up"] = clean_up
    backend = copy.copy(hf_tokenizer.backend_tokenizer)
    # What encode sets before every call: no padding, no truncation, split_special_tokens.
    backend.no_padding()
    backend.no_truncation()
    return state, backend.to_str()


class FastTokenizer:
    """A fast tokenizer's encode, decode, id and special-token answers from its Rust tokenizer,
    as transformers gives them (see the module docstring); anything else is transformers'.

    Like transformers' fast tokenizer, one object must not be used from two threads at once
    (the Rust tokenizer refuses with "Already borrowed"): `copy.deepcopy` gives another.
    """

    is_fast = True

    def __init__(self, state: dict, backend_json: str, load_hf: Callable[[], Any],
                 backend: Any = None) -> None:
        d = self.__dict__
        d["_state"] = state
        d["_backend_json"] = backend_json
        d["_load_hf"] = load_hf
        d["_backend"] = backend
        d["_hf"] = None
        d["_lock"] = threading.Lock()
        d["_warned_too_long"] = False

    @classmethod
    def from_state(cls, state: dict, backend_json: str, load_hf: Callable[[], Any],
                   background: bool = False) -> FastTokenizer:
        """With `background`, the Rust tokenizer is built on a thread (0.1-0.2 s that hold
        no GIL, so a model can load meanwhile); its first use waits for it."""
        if not background:
            return cls(state, backend_json, load_hf, _backend_from(backend_json, state))
        tokenizer = cls(state, backend_json, load_hf)
        pending: Future = Future()

        def build() -> None:
            try:
                pending.set_result(_backend_from(backend_json, state))
            except BaseException as exc:  # noqa: BLE001 - handed to the first use
                pending.set_exception(exc)

        tokenizer.__dict__["_pending"] = pending
        # NOTE: not a daemon: a process that ends meanwhile (a start that failed) waits the
        # fraction of a second for it, rather than have the interpreter's shutdown stop the
        # thread inside the Rust call when it takes the GIL back.
        threading.Thread(target=build, name="pagedllm-tokenizer-load").start()
        return tokenizer

    # ---- transformers' object, on demand --------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        """Transformers' tokenizer of the same files (built on first use); from then on every
        call of this object goes to it."""
        hf = self.__dict__["_hf"]
        if hf is None:
            with self._lock:
                hf = self.__dict__["_hf"]
                if hf is None:
                    hf = self._load_hf()
                    self.__dict__["_hf"] = hf
        return hf

    @property
    def delegates(self) -> bool:
        """Whether transformers' tokenizer has been built (and now answers everything)."""
        return self.__dict__["_hf"] is not None

    def __getattr__(self, name: str) -> Any:
        # Only names this object lacks reach here: transformers' tokenizer has the rest.
        if name.startswith("__") or "_hf" not in self.__dict__:  # (a copy being made)
            raise AttributeError(name)
        return getattr(self.hf_tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # A method of this class (a test's counting wrapper) is replaced on this object; any
        # other change (a template, a pad token) is made on transformers' object, which
        # answers from then on.
        own = getattr(type(self), name, None)
        if name.startswith("_") or (callable(own) and not isinstance(own, property)):
            self.__dict__[name] = value
        else:
            setattr(self.hf_tokenizer, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__:
            del self.__dict__[name]
        else:
            delattr(self.hf_tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf_tokenizer(*args, **kwargs)

    # ---- the fast path ----------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Any:
        if self.delegates:
            return self._hf.backend_tokenizer
        backend = self.__dict__["_backend"]
        if backend is None:
            pending = self.__dict__.get("_pending")
            if pending is not None:
                try:
                    backend = pending.result()
                except Exception as exc:  # noqa: BLE001 - transformers' tokenizer answers
                    logger.warning("the tokenizer of %s did not load (%s): using "
                                   "transformers'", self._state["name_or_path"], exc)
                    return self.hf_tokenizer.backend_tokenizer
            else:  # a copy builds its own on first use, on the thread that uses it
                backend = _backend_from(self._backend_json, self._state)
            self.__dict__["_backend"] = backend
        return backend

    @property
    def vocab_size(self) -> int:
        if self.delegates:
            return self._hf.vocab_size
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        if self.delegates:
            return len(self._hf)
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        if self.delegates:
            return self._hf.get_vocab()
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: Any, *args: Any, add_special_tokens: bool = True,
               **kwargs: Any) -> list[int]:
        if self.delegates or args or kwargs or not isinstance(text, str):
            return self.hf_tokenizer.encode(text, *args, add_special_tokens=add_special_tokens,
                                            **kwargs)
        ids = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        limit = self._state["model_max_length"]
        if len(ids) > limit and limit != 0 and not self._warned_too_long:
            self.__dict__["_warned_too_long"] = True
            logger.warning("Token indices sequence length is longer than the specified maximum "
                           "sequence length for this model (%d > %d). Running this sequence "
                           "through the model will result in indexing errors", len(ids), limit)
        return ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # NOTE: an explicit clean-up request is transformers' to judge (it refuses it for BPE
        # models, with a warning); other forms (tensors, batches, options) are its too.
        if (self.delegates or kwargs or clean_up_tokenization_spaces
                or not isinstance(token_ids, list)
                or not all(type(i) is int for i in token_ids)):
            return self.hf_tokenizer.decode(
                token_ids, skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        text = self.backend_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None and self._state["clean_up"]:
            text = _clean_up(text)
        return text

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        if self.delegates:
            return self._hf.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        backend = self.backend_tokenizer
        if isinstance(ids, int):
            return backend.id_to_token(ids)
        skip = set(self._state["all_special_ids"]) if skip_special_tokens else set()
        return [backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ---- copies -------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> FastTokenizer:
        """Another tokenizer for another thread: the same values, its own Rust tokenizer (built
        on first use), or a deep copy of transformers' object once that answers."""
        other = FastTokenizer(self._state, self._backend_json, self._load_hf)
        if self.delegates:
            other.__dict__["_hf"] = copy.deepcopy(self._hf, memo)
        return other

    def sharing_backend(self) -> FastTokenizer:
        """Another object for another thread over this one's Rust tokenizer (built now if it
        is not yet): every call this class makes of it takes it shared (encode, decode,
        id_to_token, the vocabulary), so two threads may use it at once; only its setters
        would be refused ("Already borrowed"), and they are called once, at its build. Saves
        the ~0.1 s build a deepcopy pays on first use, all of it with the GIL held
        (tokenizers' from_str). Transformers' tokenizer, where this one delegates, is copied."""
        if self.delegates:
            return copy.deepcopy(self)
        return FastTokenizer(self._state, self._backend_json, self._load_hf,
                             self.backend_tokenizer)

    def __reduce__(self) -> tuple:
        hf = self.__dict__["_hf"]
        return _rebuild, (self._state, self._backend_json, self._load_hf, hf)

    def __repr__(self) -> str:
        return f"FastTokenizer(name_or_path={self._state['name_or_path']!r})"


def _state_property(name: str) -> property:
    def get(self: FastTokenizer) -> Any:
        hf = self.__dict__["_hf"]
        return self._state[name] if hf is None else getattr(hf, name)

    return property(get, doc=f"transformers' tokenizer's {name}")


for _name in STATE_ATTRIBUTES:
    setattr(FastTokenizer, _name, _state_property(_name))


def _rebuild(state: dict, backend_json: str, load_hf: Callable[[], Any], hf: Any
             ) -> FastTokenizer:
    tokenizer = FastTokenizer(state, backend_json, load_hf)
    tokenizer.__dict__["_hf"] = hf
    return tokenizer


def _backend_from(backend_json: str, state: dict) -> Any:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend_json)
    backend.encode_special_tokens = bool(state["split_special_tokens"])
    return backend


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (for WordPiece-era models)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m")
            .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))


def wait_loaded(tokenizer: Any) -> None:
    """Returns once a FastTokenizer's Rust tokenizer has loaded (or failed to): one loading
    in the background, or a copy's, built here."""
    if isinstance(tokenizer, FastTokenizer) and not tokenizer.delegates:
        tokenizer.backend_tokenizer  # noqa: B018 - the wait


def hf_tokenizer(tokenizer: Any) -> Any:
    """Transformers' tokenizer behind `tokenizer` (itself where it is one): for code that must
    have one, such as llguidance's tables."""
    return tokenizer.hf_tokenizer if isinstance(tokenizer, FastTokenizer) else tokenizer
