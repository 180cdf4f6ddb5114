"""`pagedllm serve`'s start (entrypoints/openai/launch.py): the engine loads while the server's
modules import on a thread, so launch.py itself must import none of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedllm.entrypoints.openai.launch import BackgroundImport, bind_socket

SERVER_STACK = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client",
                "pagedllm.entrypoints.openai.api_server")


def test_launch_imports_nothing_of_the_server():
    probe = ("import sys; import pagedllm.entrypoints.openai.launch; "
             f"print([m for m in {SERVER_STACK!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_background_import_gives_the_module():
    import json

    assert BackgroundImport("json").module() is json


def test_background_import_raises_its_error_on_the_callers_thread():
    pending = BackgroundImport("pagedllm.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="pagedllm.no_such_module"):
        pending.module()


def test_a_port_in_use_is_refused_with_its_address():
    sock = bind_socket("127.0.0.1", 0)
    try:
        sock.listen()
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            bind_socket("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
