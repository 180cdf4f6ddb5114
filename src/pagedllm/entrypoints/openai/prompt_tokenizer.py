"""Prompt tokenization and chat templates off the event loop, for every endpoint of a server."""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.tokenizer import FastTokenizer, wait_loaded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


class PromptTokenizer:
    """Encodes prompts and renders chat templates off the event loop: one call at a time, on
    one worker thread, with a tokenizer of its own.

    A long prompt takes seconds to encode (6 MB of text about 4 s here); on the loop, every
    stream and /health would stall meanwhile. The fast tokenizer releases the GIL while it
    encodes, so the loop runs on. Its own copy, because a fast tokenizer used from two threads
    at once can fail with "Already borrowed", and the loop keeps decoding with the original.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = (tokenizer.sharing_backend() if isinstance(tokenizer, FastTokenizer)
                          else copy.deepcopy(tokenizer))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-tokenize")
        # NOTE: a FastTokenizer's copy builds its Rust tokenizer on first use: on the worker
        # thread now, not in the first request.
        self._executor.submit(wait_loaded, self.tokenizer)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(tokenizer, *args) on the worker thread."""
        call = functools.partial(fn, self.tokenizer, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str],
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text; a text the tokenizer cannot take is the request's error."""
    try:
        return [tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer refuses, the user sent
        raise RequestFieldError(f"the prompt could not be tokenized: {exc}",
                                param="prompt") from None
