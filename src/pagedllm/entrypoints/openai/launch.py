"""`pagedllm serve`'s start: the settings checked and the socket bound, then the engine loaded
while the HTTP server's modules import on a thread, then served (api_server.serve_engine).

The server's modules (fastapi, starlette, pydantic, uvicorn, prometheus_client and the
routes' models: ~0.3 s of a start, a third of torch's import) need nothing from the engine.
The engine's load holds no GIL for part of its time (the weights' file read, the KV pool's
pages committed, the tokenizer's Rust half), and on two cores the import runs then; the
server answers /health only once the engine is loaded, as before. This module imports
nothing of the server's, so the import below is the first.
"""

from __future__ import annotations

import importlib
import socket
import threading
from types import ModuleType
from typing import Any

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser

SERVER_MODULE = "pagedllm.entrypoints.openai.api_server"


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


class BackgroundImport:
    """Imports a module on a thread; `module()` waits for it. Where the thread's import
    failed, `module()` imports it again on the caller's thread, so an error is raised there
    as a plain import's would be."""

    def __init__(self, name: str) -> None:
        self.name = name
        # NOTE: not a daemon: a start that fails meanwhile waits for the import to end
        # rather than have the interpreter's shutdown stop it inside an extension's init.
        self._thread = threading.Thread(target=self._run, name="pagedllm-server-imports")
        self._thread.start()

    def _run(self) -> None:
        try:
            importlib.import_module(self.name)
        except BaseException:  # noqa: BLE001, S110 - raised again by module(), on the caller's thread
            pass

    def join(self) -> None:
        self._thread.join()

    def module(self) -> ModuleType:
        self.join()
        return importlib.import_module(self.name)


def run_server(
    engine_kwargs: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    enable_auto_tool_choice: bool = False,
    tool_call_parser: str | None = None,
    **server_kwargs: Any,
) -> None:
    """Loads the engine and serves until SIGINT/SIGTERM; `server_kwargs` go to
    api_server.serve_engine. Bad settings raise ValueError/OSError before the model loads."""
    tool_parser = None
    if enable_auto_tool_choice:
        if tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of "
                             f"{', '.join(TOOL_PARSERS)})")
        tool_parser = get_tool_parser(tool_call_parser)
    sock = bind_socket(host, port)
    server_imports = BackgroundImport(SERVER_MODULE)
    llm_engine = None
    try:
        llm_engine = LLMEngine(**engine_kwargs)
        server_imports.module().serve_engine(llm_engine, sock, host, port,
                                             tool_parser=tool_parser, **server_kwargs)
    finally:
        server_imports.join()  # a failed load: the import ends before the process does
        sock.close()
        if llm_engine is not None:
            # Its worker processes or Ray actors (and a Ray it started): `pagedllm serve`
            # leaves with os._exit, which runs no finalizer.
            llm_engine.shutdown()
