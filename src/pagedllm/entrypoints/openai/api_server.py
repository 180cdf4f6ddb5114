"""The OpenAI-compatible HTTP server: a thin FastAPI router over the OpenAIServing* handlers.

Routes only parse, authenticate and turn a handler's result into a response; the handlers do
the work. `run_server` loads the engine, binds the socket and runs uvicorn until SIGINT/SIGTERM,
which first ends every open stream (their requests are aborted) so shutdown never hangs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedllm
from pagedllm import gc_freeze, startup_profile
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.entrypoints.openai import web_page
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    make_error,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolParser, get_tool_parser
from pagedllm.models import hf_fast
from pagedllm.startup_profile import mark
from pagedllm.tokenizer import FastTokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the routes reach through `app.state.server`."""

    engine: AsyncLLMEngine
    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization
    metrics: ServerMetrics | None
    api_key: str | None
    history: web_page.StatsHistory | None = None


class _Unauthorized(Exception):
    pass


def _state(request: Request) -> ServerState:
    return request.app.state.server


def api_key_ok(expected: str | None, authorization: str) -> bool:
    """Whether an Authorization header's value (as Starlette decodes it: latin-1) passes."""
    return expected is None or secrets.compare_digest(authorization.encode(),
                                                      f"Bearer {expected}".encode())


async def require_api_key(request: Request) -> None:
    if not api_key_ok(_state(request).api_key, request.headers.get("authorization", "")):
        raise _Unauthorized()


def _unauthorized() -> Response:
    return to_response(make_error(
        "missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
        code="invalid_api_key"))


class _ErrorJSONResponse(JSONResponse):
    """Error bodies in ASCII JSON: a message that quotes the request (a model name, say) can
    hold text that UTF-8 cannot encode, and the error must still go out."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def to_response(result: Any) -> Response:
    if isinstance(result, ErrorResponse):
        return _ErrorJSONResponse(result.model_dump(), status_code=result.status_code)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    if isinstance(result, Response):
        return result
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    raise TypeError(f"unexpected handler result {type(result).__name__}")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def with_cancellation(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Any]:
    """Cancels the handler when the client disconnects before it answers.

    A non-streaming request would otherwise run to the end for nobody; cancelling it closes
    its output generator, which aborts the request and frees its blocks. (Once a stream has
    started, Starlette itself cancels the body iterator on disconnect.)
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Response | None:
        handler_task = asyncio.ensure_future(handler(*args, **kwargs))
        disconnect_task = asyncio.ensure_future(_wait_for_disconnect(kwargs["raw_request"]))
        try:
            done, _ = await asyncio.wait({handler_task, disconnect_task},
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect_task.cancel()
        if handler_task in done:
            return handler_task.result()
        handler_task.cancel()
        return None  # nobody is listening

    return wrapper


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
# The web page loads without a key; the API calls it makes need one, as /v1's do.
kv_cache = APIRouter(prefix="/kv_cache", dependencies=[Depends(require_api_key)])


@router.get("/health")
async def health(raw_request: Request) -> Response:
    engine = _state(raw_request).engine
    if engine.is_running:
        return JSONResponse({})
    reason = engine.dead_error
    message = f"the engine is not running: {reason!r}" if reason else "the engine is not running"
    return to_response(make_error(message, 503))


@router.get("/version")
async def version() -> Response:
    return JSONResponse({"version": pagedllm.__version__})


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    server_metrics = _state(raw_request).metrics
    body = server_metrics.render() if server_metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> Response:
    return to_response(await _state(raw_request).tokenization.tokenize(request))


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> Response:
    return to_response(_state(raw_request).tokenization.detokenize(request))


@router.get("/", include_in_schema=False)
async def web_page_index() -> Response:
    return web_page.static_file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def web_page_file(name: str) -> Response:
    return web_page.static_file(name)


# NOTE: build_app puts KVMapPolls in front of these two: it answers their GETs without
# FastAPI's machinery. They stay for the schema, the other methods' 405, and an app without it.
@kv_cache.get("/blocks")
async def kv_cache_blocks(raw_request: Request, layout: str = "compact") -> Response:
    return _json_bytes(await web_page.kv_cache_blocks(_state(raw_request).engine, layout))


@kv_cache.get("/history")
async def kv_cache_history(raw_request: Request) -> Response:
    return _json_bytes(web_page.kv_cache_history(_state(raw_request).history))


def _json_bytes(result: bytes | ErrorResponse) -> Response:
    if isinstance(result, bytes):
        return Response(result, media_type="application/json")
    return to_response(result)


class KVMapPolls:
    """Raw ASGI in front of the app: GET /kv_cache/blocks and /kv_cache/history.

    An open page polls the map 4 times a second (the issue bounds a 10 Hz poller at 1% of the
    engine's throughput); through FastAPI every poll paid its routing, dependency and response
    machinery, several times the JSON's own cost. This answers them directly: the same API key
    check, `layout` query, bytes and headers as the FastAPI routes above, which still answer
    every other method. Inside Starlette's ServerErrorMiddleware, so an exception still gets
    the JSON 500 of `_install_error_handlers`.
    """

    PATHS = frozenset(("/kv_cache/blocks", "/kv_cache/history"))
    _JSON = (b"content-type", b"application/json")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        state: ServerState = scope["app"].state.server
        authorization = next((value.decode("latin-1") for name, value in scope["headers"]
                              if name == b"authorization"), "")
        if not api_key_ok(state.api_key, authorization):
            await _unauthorized()(scope, receive, send)
            return
        if scope["path"] == "/kv_cache/history":
            result: bytes | ErrorResponse = web_page.kv_cache_history(state.history)
        else:
            query = scope["query_string"]
            # As FastAPI reads a str parameter: the last of repeated ones; blank kept.
            layouts = [v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                       if k == "layout"] if query else []
            result = await web_page.kv_cache_blocks(state.engine, *layouts[-1:])
        if not isinstance(result, bytes):
            await to_response(result)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(result)), self._JSON]})
        await send({"type": "http.response.body", "body": result})


@v1.get("/models")
async def list_models(raw_request: Request) -> Response:
    return to_response(_state(raw_request).models.list_models())


@v1.post("/completions")
@with_cancellation
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return to_response(await _state(raw_request).completion.create_completion(request))


@v1.post("/chat/completions")
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return to_response(await _state(raw_request).chat.create_chat_completion(request))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {error.get('ctx', {}).get('error')}", None
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (loc[0] if loc else error.get("ctx", {}).get("param"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return to_response(make_error(message, 400, param=param))

    @app.exception_handler(_Unauthorized)
    async def on_unauthorized(_: Request, __: _Unauthorized) -> Response:
        return _unauthorized()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return to_response(make_error(str(exc.detail), exc.status_code))

    @app.exception_handler(Exception)
    async def on_error(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return to_response(make_error(f"internal error: {exc!r}", 500))


def build_app(
    engine: AsyncLLMEngine,
    tokenizer: Any,
    served_model_names: list[str],
    model_root: str,
    api_key: str | None = None,
    chat_template: str | None = None,
    metrics: ServerMetrics | None = None,
    tool_parser: ToolParser | None = None,
    history: web_page.StatsHistory | None = None,
) -> FastAPI:
    """The app for one engine; its lifespan starts and stops the engine thread. `tool_parser`
    parses the model's own tool calls (tool_choice "auto"); None refuses "auto". `history`
    (fed by the engine's step listener) serves the web page's charts."""

    prompt_tokenizer = PromptTokenizer(tokenizer)  # one worker thread for every endpoint

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        mark("server started")  # uvicorn listens next
        startup_profile.report()  # where `bench startup` launched it
        try:
            yield
        finally:
            prompt_tokenizer.shutdown()
            await engine.shutdown()

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    models = OpenAIServingModels(served_model_names, model_root, engine.max_model_len)
    app.state.server = ServerState(
        engine=engine,
        models=models,
        completion=OpenAIServingCompletion(engine, models, tokenizer, prompt_tokenizer),
        chat=OpenAIServingChat(engine, models, tokenizer, chat_template, prompt_tokenizer,
                               tool_parser),
        tokenization=OpenAIServingTokenization(models, tokenizer, chat_template,
                                               prompt_tokenizer),
        metrics=metrics,
        api_key=api_key,
        history=history,
    )
    app.include_router(router)
    app.include_router(v1)
    app.include_router(kv_cache)
    app.add_middleware(KVMapPolls)
    _install_error_handlers(app)
    return app


class _Server(uvicorn.Server):
    """uvicorn, plus: a signal first ends the engine's streams, and the process exits 0."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # NOTE: unlike uvicorn, the signal is not re-raised after shutdown: a served SIGTERM
        # is a clean exit. A second SIGINT forces the exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_exit)


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds before the model loads, so a busy port fails at once; OSError says why.

    NOTE: the protocol is named (IPPROTO_TCP, not 0) because asyncio turns Nagle's algorithm
    off (TCP_NODELAY) only on connections of such a socket. Without it a response written in
    two parts (headers, then body; or an SSE stream's chunks) waits for the client's delayed
    ACK: 40 ms per poll of the KV cache map over a keep-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def server_tokenizer(engine_tokenizer: Any, model_dir: Path) -> Any:
    """The event loop's own tokenizer (the engine's is the engine thread's): for logprobs'
    token text, a token-id prompt's echo and /tokenize's token strings. Over the engine's
    FastTokenizer's Rust tokenizer (FastTokenizer.sharing_backend): a build of its own held
    the GIL for ~0.1 s (tokenizers' from_str), on a thread or not. A transformers tokenizer is
    loaded again, as before.
    """
    if isinstance(engine_tokenizer, FastTokenizer) and not engine_tokenizer.delegates:
        return engine_tokenizer.sharing_backend()
    return hf_fast.load_tokenizer(model_dir, background=True)


def run_server(
    engine_kwargs: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    uvicorn_log_level: str = "info",
    log_stats_interval_s: float = 5.0,
    enable_auto_tool_choice: bool = False,
    tool_call_parser: str | None = None,
) -> None:
    """Loads the engine and serves until SIGINT/SIGTERM. Bad settings raise ValueError/OSError.
    Marks the start's phases (pagedllm/startup_profile.py): "server modules" (the process's
    start to here), the engine's own, "server app", "gc at ready", "server started"."""
    mark("server modules")
    # The engine's modules (torch first) import with collection paused and are frozen after it,
    # as pagedllm.LLM's are: the collection at ready (gc_freeze.start) then traverses only what
    # the start made since, not the ~300,000 objects of the imports (0.2-0.3 s with the GIL).
    with gc_freeze.importing():
        from pagedllm.engine.llm_engine import LLMEngine

    tool_parser = None
    if enable_auto_tool_choice:
        if tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of "
                             f"{', '.join(TOOL_PARSERS)})")
        tool_parser = get_tool_parser(tool_call_parser)

    sock = bind_socket(host, port)
    llm_engine = None
    try:
        llm_engine = LLMEngine(**engine_kwargs)
        model = engine_kwargs.get("model")
        names = served_model_names or [model or "SmolLM2-135M-Instruct"]
        tokenizer = server_tokenizer(llm_engine.tokenizer, llm_engine.model_dir)
        server_metrics = ServerMetrics(names[0], log_interval_s=log_stats_interval_s)
        history = web_page.StatsHistory()

        def on_step(outputs: list, stats: Any) -> None:
            server_metrics.observe(outputs, stats)
            history.observe(outputs, stats)

        engine = AsyncLLMEngine(llm_engine, on_step)
        app = build_app(engine, tokenizer, names, str(llm_engine.model_dir), api_key=api_key,
                        chat_template=chat_template, metrics=server_metrics,
                        tool_parser=tool_parser, history=history)
        # NOTE: ws="none": no route is a websocket, and "auto" imported a websocket
        # library (wsproto here, ~40 ms) at every start.
        config = uvicorn.Config(app, log_level=uvicorn_log_level, timeout_graceful_shutdown=5,
                                timeout_keep_alive=5, ws="none")
        logging.getLogger("uvicorn.access").addFilter(web_page.QuietMapPolls())
        mark("server app")
        server = _Server(config, on_exit=engine.begin_shutdown)
        logger.info("serving %s on http://%s:%d (API key %s; web page at /)", names[0], host,
                    port, "required" if api_key else "not required")
        # What the start made lives as long as the server: kept out of the full collections
        # that would otherwise stall running streams (pagedllm/gc_freeze.py).
        gc_freeze.start()
        mark("gc at ready")
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        if llm_engine is not None:
            # Its worker processes or Ray actors (and a Ray it started): `pagedllm serve`
            # leaves with os._exit, which runs no finalizer.
            llm_engine.shutdown()
