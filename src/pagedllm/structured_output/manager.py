"""StructuredOutputManager: checks constraints where requests are checked, and compiles each
distinct one once, on its own threads (a cache keyed by the constraint)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from pagedllm import gc_freeze
from pagedllm.structured_output.backend import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    make_backend,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# What makes two constraints compile to the same grammar: (constraint, its text or its
# choices, whitespace options).
GrammarKey = tuple[str, str | tuple[str, ...], bool, str | None]


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    constraint = params.constraint
    value = getattr(params, constraint)
    if constraint == "json_object":
        text = ""
    elif isinstance(value, str):
        text = value
    elif constraint == "choice":
        # NOTE: a tuple of the strings, not their JSON: 60 ms less on the server's event loop
        # for 100,000 choices.
        text = tuple(value)
    else:
        # NOTE: keys keep their order: a schema's property order is the order they are generated in.
        text = json.dumps(value)
    return constraint, text, params.disable_any_whitespace, params.whitespace_pattern


class StructuredOutputManager:
    """The engine's grammar compiler.

    `compile` validates a constraint on the caller's thread (a ValueError naming the field) and
    returns a Future of its compiled grammar, shared by every request with the same constraint.
    The grammar the Future holds is a template in its initial state: each sequence takes a
    `copy()` and advances that. Compiling runs on `num_threads` threads of its own, so a slow
    grammar stalls neither the engine loop nor the server's event loop; the request waits in
    the scheduler until its Future is done, and the others keep running.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 backend: str = "guidance", num_threads: int = 2, max_cached: int = 256) -> None:
        self.backend: StructuredOutputBackend = make_backend(backend, tokenizer, vocab_size)
        self.max_cached = max_cached
        self._num_threads = num_threads
        self._executor: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[GrammarKey, Future[StructuredOutputGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0
        self._settled = False

    def compile(self, params: StructuredOutputsParams) -> Future[StructuredOutputGrammar]:
        """The compile of `params`' constraint: from the cache, or validated and submitted."""
        key = grammar_key(params)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
        self.backend.validate(params)
        with self._lock:
            future = self._cache.get(key)  # another thread may have added it meanwhile
            if future is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._num_threads,
                                                        thread_name_prefix="pagedllm-grammar")
                future = self._executor.submit(self._compile, params)
                self.num_compiles += 1
                self._cache[key] = future
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
            return future

    def _compile(self, params: StructuredOutputsParams) -> StructuredOutputGrammar:
        try:
            grammar = self.backend.compile(params)
            # NOTE: the first mask of a large grammar builds lexer states (100 ms for 20,000
            # choices); the copies the sequences take share them, so they are built here
            # rather than in the engine loop's first step with this grammar.
            grammar.fill_bitmask(np.full((1, (grammar.vocab_size + 31) // 32), -1, np.int32), 0)
            if not self._settled:
                # The first compile built the backend's tables (and the tokenizer under them):
                # a server keeps them out of later full collections (pagedllm/gc_freeze.py).
                self._settled = True
                gc_freeze.settle()
            return grammar
        except Exception:
            # NOTE: the backend failed where it should not (its tokenizer tables, say): the
            # request then ends at once instead of the engine loop raising for it.
            logger.exception("structured_outputs.%s failed to compile", params.constraint)
            eos = self.backend.tokenizer.eos_token_id
            return EosOnlyGrammar(self.backend.vocab_size, eos if eos is not None else 0)

    def shutdown(self) -> None:
        """Stops the compile threads once their work is done (pending compiles are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


OVERLAP_ENV = "PAGEDLLM_GRAMMAR_MASK_OVERLAP"


def grammar_mask_overlap() -> bool:
    """Whether a step's bitmask may be filled beside the forward pass: only where a core is
    left over by the forward's threads (on 2 cores with 2 threads the fill's thread took a
    core from the forward: 0.883x of unconstrained throughput against 0.921x filled in place).
    `PAGEDLLM_GRAMMAR_MASK_OVERLAP` (auto, 1, 0) overrides it."""
    setting = os.environ.get(OVERLAP_ENV, "auto").strip().lower()
    if setting not in ("auto", "1", "0"):
        raise ValueError(f"{OVERLAP_ENV} must be auto, 1 or 0, not {setting!r}")
    if setting != "auto":
        return setting == "1"
    import torch

    return len(os.sched_getaffinity(0)) > torch.get_num_threads()


class EosOnlyGrammar(StructuredOutputGrammar):
    """A grammar that failed to compile: it allows EOS alone, so its request ends at once."""

    def __init__(self, vocab_size: int, eos_token_id: int) -> None:
        self._vocab_size = vocab_size
        self._eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def accept_tokens(self, tokens) -> bool:
        return all(token == self._eos_token_id for token in tokens)

    def validate_tokens(self, tokens) -> int:
        return 0

    def rollback(self, num_tokens: int) -> None:
        pass

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        bitmask[row] = 0
        word, bit = divmod(self._eos_token_id, 32)
        bitmask[row, word] = (1 << bit) - (1 << 32 if bit == 31 else 0)  # int32: bit 31 < 0

    def is_terminated(self) -> bool:
        return True

    def copy(self) -> EosOnlyGrammar:
        return self

    @property
    def error(self) -> str | None:
        return "the grammar failed to compile"
