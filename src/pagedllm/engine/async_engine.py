"""AsyncLLMEngine: an LLMEngine stepped by its own thread, streaming outputs to asyncio callers.

The LLMEngine is not thread-safe, so one thread owns it. The event loop never touches it: it
puts additions and aborts into an inbox that the engine thread drains between steps, and the
engine thread hands each step's outputs back to the loop with one `call_soon_threadsafe`, which
routes them into per-request asyncio queues. When nothing is queued or running, the thread
sleeps on a condition variable; it never spins.

    HTTP handler --generate()--> inbox --(engine thread)--> LLMEngine.step()
         ^                                                        |
         +---- RequestStream (asyncio.Queue) <-- call_soon_threadsafe(outputs)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.engine.input_processor import ProcessedRequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.core.kv_cache_snapshot import KVCacheSnapshot
    from pagedllm.engine.input_processor import PromptType
    from pagedllm.engine.llm_engine import EngineStats, LLMEngine

logger = logging.getLogger(__name__)

# Called by the engine thread after every loop iteration, with that iteration's outputs
# (including the final outputs of aborted requests) and a fresh stats snapshot.
StepListener = Callable[[list[RequestOutput], "EngineStats"], None]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (crashed or shut down); no request can complete."""


@dataclass
class _Add:
    request_id: str
    # A ProcessedRequest (then params is None), or a prompt to check with params;
    # BeamSearchParams make it a beam search.
    prompt: PromptType | ProcessedRequest
    params: SamplingParams | BeamSearchParams | None
    arrival_time: float
    # Resolved on the loop once the engine accepted (None) or refused (the exception) it.
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Snapshot:
    # Resolved on the loop with (KVCacheSnapshot, EngineStats), taken between two steps.
    done: asyncio.Future


class RequestStream:
    """The loop-side end of one request: the engine thread's outputs arrive here, in order.

    Outputs are cumulative, so a consumer that fell behind only needs the newest one: `get`
    returns the latest queued output and drops the older ones.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class AsyncLLMEngine:
    """Runs an LLMEngine in a background thread and streams each request's outputs.

    Call `start()` from the event loop that will consume the outputs, `generate()` per request,
    and `shutdown()` at the end. If the engine thread dies, every pending and future request
    fails with EngineDeadError and `is_running` turns False.
    """

    def __init__(self, engine: LLMEngine, step_listener: StepListener | None = None) -> None:
        self.engine = engine
        self._step_listener = step_listener
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort | _Snapshot] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop-thread state: live streams by request id.
        self._streams: dict[str, RequestStream] = {}
        self._dead: BaseException | None = None
        # The snapshot asked for and not yet taken; concurrent readers share it.
        self._pending_snapshot: asyncio.Future | None = None

    # ---- lifecycle (loop thread) ---------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None, "start() called twice"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def begin_shutdown(self) -> None:
        """Refuses new requests and aborts the running ones; their streams end with "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Aborts everything, then waits for the engine thread to finish its step and exit."""
        self.begin_shutdown()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout_s)
        self._fail_all(EngineDeadError("the server is shutting down"))

    # ---- what the frontend may read (any thread) ------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    def process_inputs(self, prompt_token_ids: list[int],
                       params: SamplingParams | BeamSearchParams,
                       prompt: str | None = None, **options: Any) -> ProcessedRequest:
        """Checks a tokenized request on the caller's thread (a ValueError, a
        RequestFieldError naming the field, says why); `generate` takes the result as it is,
        so the engine thread does not check it again. Token ids only: the engine's tokenizer
        belongs to the engine thread (see InputProcessor.process for `options`)."""
        return self.engine.input_processor.process(
            {"prompt_token_ids": prompt_token_ids, "prompt": prompt}, params, **options)

    def default_max_tokens(self, num_prompt_tokens: int, width: int) -> int:
        """The max_tokens the engine picks for a request that gives none."""
        return self.engine.input_processor.default_max_tokens(num_prompt_tokens, width)

    # ---- requests (loop thread) ----------------------------------------------------------

    async def generate(
        self, prompt: PromptType | ProcessedRequest,
        params: SamplingParams | BeamSearchParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Submits a request and yields its cumulative outputs until it finishes.

        `prompt` is a ProcessedRequest from `process_inputs` (with params None), or a prompt
        the engine thread checks with `params`. A beam search (BeamSearchParams) yields one
        output, when the search ends, whose `outputs` are the beams, best first (or one
        "abort" output).

        The first `__anext__` raises the engine's ValueError if it refuses the request, or
        EngineDeadError. Closing or cancelling the generator early aborts the request, which
        frees its KV blocks at the engine's next iteration.
        """
        stream = self._submit(prompt, params, request_id)
        try:
            while True:
                output = await stream.get()
                yield output
                if output.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    async def get_kv_cache_snapshot(self) -> tuple[KVCacheSnapshot, EngineStats]:
        """The KV cache block by block and the engine's stats, both taken by the engine thread
        between two steps (a busy engine answers when its current step ends). Raises
        EngineDeadError when the engine is not running."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        assert self._loop is not None, "call start() first"
        if self._pending_snapshot is None or self._pending_snapshot.done():
            self._pending_snapshot = self._loop.create_future()
            self._post(_Snapshot(self._pending_snapshot))
        return await asyncio.shield(self._pending_snapshot)

    def _submit(self, prompt: PromptType | ProcessedRequest,
                params: SamplingParams | BeamSearchParams | None, request_id: str
                ) -> RequestStream:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        assert self._loop is not None, "call start() first"
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        accepted.add_done_callback(lambda f: self._on_accepted(stream, f))
        self._post(_Add(request_id, prompt, params, time.time(), accepted))
        return stream

    def _on_accepted(self, stream: RequestStream, accepted: asyncio.Future) -> None:
        if not accepted.cancelled() and accepted.exception() is not None:
            stream.put(accepted.exception())

    def _post(self, item: _Add | _Abort | _Snapshot) -> None:
        with self._cond:
            if self._stopping and isinstance(item, (_Add, _Snapshot)):
                future = item.accepted if isinstance(item, _Add) else item.done
                future.set_exception(EngineDeadError("the server is shutting down"))
                return
            self._inbox.append(item)
            self._cond.notify()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)

    def _fail_all(self, exc: BaseException) -> None:
        if self._dead is None:
            self._dead = exc
        for stream in list(self._streams.values()):
            stream.put(exc)
        if self._pending_snapshot is not None and not self._pending_snapshot.done():
            self._pending_snapshot.set_exception(exc)

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        live: set[str] = set()  # ids the LLMEngine holds
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or live):
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, []
                    stopping = self._stopping
                outputs = self._apply(inbox, live)
                if stopping:
                    outputs += self.engine.abort_request(sorted(live))
                    live.clear()
                elif live:
                    outputs += self.engine.step()
                for output in outputs:
                    if output.finished:
                        live.discard(output.request_id)
                if outputs:
                    self._call_loop(self._deliver, outputs)
                if self._step_listener is not None:
                    self._step_listener(outputs, self.engine.get_stats())
                if stopping:
                    return
        except BaseException as exc:  # any death must reach the clients
            logger.exception("engine thread died")
            self._call_loop(self._fail_all, EngineDeadError(f"the engine thread died: {exc!r}"))
            self._dead = self._dead or exc

    def _apply(self, inbox: list[_Add | _Abort | _Snapshot], live: set[str]
               ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for item in inbox:
            if isinstance(item, _Snapshot):
                self._call_loop(_set_result, item.done, self.engine.get_kv_cache_snapshot())
                continue
            if isinstance(item, _Abort):
                if item.request_id in live:
                    live.discard(item.request_id)
                    outputs += self.engine.abort_request(item.request_id)
                continue
            error: BaseException | None = None
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params,
                                        arrival_time=item.arrival_time)
                live.add(item.request_id)
            except ValueError as exc:
                error = exc
            self._call_loop(_resolve, item.accepted, error)
        return outputs

    def _call_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
