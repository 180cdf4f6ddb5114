"""AsyncLLMEngine and the app around it, on a scripted fake LLMEngine: no model, milliseconds.

The fake produces one token per request per step, can be told to block in `step` (a slow
forward pass) or to raise (a crashed engine), and records every call the engine thread makes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.config import EngineConfig
from pagedllm.engine.input_processor import InputProcessor, ProcessedRequest
from pagedllm.engine.llm_engine import EngineStats
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

PROMPT = {"prompt_token_ids": [1, 2, 3]}


class FakeLLMEngine:
    """Each running request gains token 7 per step and finishes at `max_tokens`."""

    max_model_len = 64
    config = EngineConfig(max_num_seqs=8)

    def __init__(self) -> None:
        self.input_processor = InputProcessor(None, vocab_size=100, max_model_len=64,
                                              kv_capacity_tokens=1024)
        self.requests: dict[str, tuple[list[int], int]] = {}
        self.aborted: list[str] = []
        self.num_steps = 0
        self.step_delay_s = 0.0
        self.fail_on_step = False
        self.calling_threads: set[str] = set()

    def _touch(self) -> None:
        self.calling_threads.add(threading.current_thread().name)

    def add_request(self, request_id, prompt, params, arrival_time=None) -> None:
        self._touch()
        processed = (prompt if isinstance(prompt, ProcessedRequest)
                     else self.input_processor.process(prompt, params))
        self.requests[request_id] = ([], processed.max_tokens)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.num_steps += 1
        time.sleep(self.step_delay_s)
        if self.fail_on_step:
            raise RuntimeError("forward pass exploded")
        outputs = []
        for request_id, (tokens, max_tokens) in list(self.requests.items()):
            tokens.append(7)
            finished = len(tokens) >= max_tokens
            outputs.append(self._output(request_id, tokens, "length" if finished else None))
            if finished:
                del self.requests[request_id]
        return outputs

    def abort_request(self, request_id) -> list[RequestOutput]:
        self._touch()
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outputs = []
        for rid in ids:
            if rid in self.requests:
                tokens, _ = self.requests.pop(rid)
                self.aborted.append(rid)
                outputs.append(self._output(rid, tokens, "abort"))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        # Every count 0 except these, whatever fields EngineStats has grown (those with a
        # default, such as the per-position speculative counts, keep it).
        counts = {f.name: 0 for f in dataclasses.fields(EngineStats)
                  if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING}
        counts.update(num_blocks=10, num_free_blocks=10 - len(self.requests),
                      num_running=len(self.requests))
        return EngineStats(**counts)

    @staticmethod
    def _output(request_id: str, tokens: list[int], finish_reason: str | None) -> RequestOutput:
        completion = CompletionOutput(index=0, text="x" * len(tokens), token_ids=list(tokens),
                                      cumulative_logprob=None, logprobs=None,
                                      finish_reason=finish_reason)
        now = time.time()
        return RequestOutput(request_id, None, [1, 2, 3], [completion],
                             finished=finish_reason is not None,
                             metrics={"arrival": now, "first_token": now})


async def collect(engine: AsyncLLMEngine, request_id: str, max_tokens: int) -> list[str]:
    return [out.outputs[0].text async for out in
            engine.generate(PROMPT, SamplingParams(max_tokens=max_tokens), request_id)]


def test_outputs_stream_in_order_and_the_engine_is_owned_by_one_thread():
    fake = FakeLLMEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        texts = await asyncio.gather(collect(engine, "a", 3), collect(engine, "b", 5))
        await engine.shutdown()
        return texts

    a, b = asyncio.run(main())
    # Cumulative and growing; a slow consumer may skip intermediate states, never the last.
    assert a[-1] == "xxx" and b[-1] == "xxxxx"
    assert all(len(x) < len(y) for x, y in itertools.pairwise(b))
    assert fake.calling_threads == {"pagedllm-engine"}


def test_idle_engine_thread_sleeps_instead_of_spinning():
    fake = FakeLLMEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        await collect(engine, "a", 2)
        steps = fake.num_steps
        await asyncio.sleep(0.3)
        assert fake.num_steps == steps  # no request, no step
        await collect(engine, "b", 2)  # and it wakes up for the next one
        await engine.shutdown()

    asyncio.run(main())


def test_refused_request_raises_and_leaves_others_alone():
    fake = FakeLLMEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        good = asyncio.ensure_future(collect(engine, "good", 4))
        with pytest.raises(ValueError, match="vocabulary"):
            async for _ in engine.generate({"prompt_token_ids": [500]}, SamplingParams(), "bad"):
                pass
        assert (await good)[-1] == "xxxx"
        await engine.shutdown()

    asyncio.run(main())


def test_closing_the_generator_aborts_the_request():
    fake = FakeLLMEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = engine.generate(PROMPT, SamplingParams(max_tokens=50), "r")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if fake.aborted:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()

    asyncio.run(main())
    assert fake.aborted == ["r"] and not fake.requests


def test_engine_death_fails_pending_and_new_requests():
    fake = FakeLLMEngine()
    fake.fail_on_step = True

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        with pytest.raises(EngineDeadError, match="exploded"):
            await asyncio.wait_for(collect(engine, "a", 5), timeout=5)
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, "b", 5)
        await engine.shutdown()

    asyncio.run(main())


def test_shutdown_ends_open_streams_with_abort():
    fake = FakeLLMEngine()
    fake.step_delay_s = 0.01

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = engine.generate(PROMPT, SamplingParams(max_tokens=60), "r")
        await stream.__anext__()
        await engine.shutdown()
        rest = [out async for out in stream]
        assert rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", 2)

    asyncio.run(asyncio.wait_for(main(), timeout=10))


# ---- the app around a fake engine ---------------------------------------------------------------

class _StubTokenizer:
    chat_template = None
    # Set by a test: encode() says it started, then waits for `release` (shared by copies).
    entered: threading.Event | None = None
    release: threading.Event | None = None

    def encode(self, text: str, **_) -> list[int]:
        if self.entered is not None and self.release is not None:
            self.entered.set()
            assert self.release.wait(timeout=30)
        return [ord(c) % 100 for c in text]

    def decode(self, ids: list[int], **_) -> str:
        return "x" * len(ids)

    def __len__(self) -> int:
        return 100

    def apply_chat_template(self, conversation, add_generation_prompt=True, **_) -> str:
        return "".join(m["content"] for m in conversation)


def _get(url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def app_server():
    """Runs the real app on a fake engine with uvicorn in a thread; yields (url, fake)."""
    fake = FakeLLMEngine()
    metrics = ServerMetrics("fake")
    engine = AsyncLLMEngine(fake, metrics.observe)
    app = build_app(engine, _StubTokenizer(), ["fake"], "/nowhere", metrics=metrics)
    fake.server_engine = engine  # for tests that shut it down
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_http_stays_responsive_during_a_slow_step(app_server):
    url, fake = app_server
    fake.step_delay_s = 1.5
    body = {"prompt": [1, 2, 3], "max_tokens": 1}
    worker = threading.Thread(target=_get, args=(url + "/v1/completions", body))
    worker.start()
    while fake.num_steps == 0:
        time.sleep(0.01)
    start = time.monotonic()
    assert _get(url + "/health") == (200, {})
    assert time.monotonic() - start < 1.0  # answered while the step still blocks
    worker.join()


def test_dead_engine_gives_503_and_errors_instead_of_hanging(app_server):
    url, fake = app_server
    fake.fail_on_step = True
    status, body = _get(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4})
    assert status == 503 and "exploded" in body["error"]["message"]
    status, body = _get(url + "/health")
    assert status == 503 and body["error"]["type"]
    status, body = _get(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4})
    assert status == 503


def test_prompt_tokenization_does_not_hold_up_the_event_loop(app_server):
    """A long prompt takes seconds to encode; meanwhile /health and other requests answer."""
    url, _ = app_server
    _StubTokenizer.entered, _StubTokenizer.release = threading.Event(), threading.Event()
    try:
        result: list = []
        worker = threading.Thread(target=lambda: result.append(
            _get(url + "/v1/completions", {"prompt": "slow to encode", "max_tokens": 2})))
        worker.start()
        assert _StubTokenizer.entered.wait(timeout=10)  # the encode has started and waits
        assert _get(url + "/health", timeout=5) == (200, {})
        status, body = _get(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2},
                            timeout=5)
        assert status == 200 and body["choices"][0]["text"] == "xx"
        _StubTokenizer.release.set()
        worker.join(timeout=10)
        assert result and result[0][0] == 200
    finally:
        _StubTokenizer.entered = _StubTokenizer.release = None


def test_shutdown_answers_a_waiting_non_streamed_request_with_503(app_server):
    """A whole answer cut short by shutdown is no answer: a client that never reads
    finish_reason must not take it for a complete one."""
    url, fake = app_server
    fake.step_delay_s = 0.05
    result: list = []
    worker = threading.Thread(target=lambda: result.append(
        _get(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 60})))
    worker.start()
    while fake.num_steps < 2:
        time.sleep(0.01)
    fake.server_engine.begin_shutdown()
    worker.join(timeout=10)
    status, body = result[0]
    assert status == 503 and "shutting down" in body["error"]["message"]


def test_a_chat_request_is_checked_once(app_server, monkeypatch):
    """The handler checks the rendered prompt with the engine's input processor on the event
    loop; the engine queues that ProcessedRequest without checking it again."""
    url, fake = app_server
    monkeypatch.setattr(_StubTokenizer, "chat_template", "{{ stub }}")
    checked, added = [], []
    real_process, real_add = fake.input_processor.process, fake.add_request
    monkeypatch.setattr(fake.input_processor, "process",
                        lambda *a, **k: checked.append(a) or real_process(*a, **k))
    monkeypatch.setattr(fake, "add_request",
                        lambda rid, prompt, *a, **k: added.append(prompt) or real_add(
                            rid, prompt, *a, **k))
    status, body = _get(url + "/v1/chat/completions", {
        "model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "xx"
    assert len(checked) == 1
    assert len(added) == 1 and isinstance(added[0], ProcessedRequest)
    assert added[0].prompt_token_ids == _StubTokenizer().encode("hi")
