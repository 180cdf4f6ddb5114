"""How a refused or failed request becomes an OpenAI error body (400, 500 or 503)."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields

from pagedllm.engine.async_engine import EngineDeadError
from pagedllm.entrypoints.openai.protocol import ErrorResponse, make_error
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclass_fields(SamplingParams)}


def error_from_exception(exc: BaseException, param_names: dict[str, str] | None = None
                         ) -> ErrorResponse:
    """Maps a refusal to an OpenAI error: ValueError -> 400 (naming the field), dead -> 503.

    The field is the exception's `param` where it has one (`RequestFieldError`), else the
    SamplingParams field its message starts with, renamed through `param_names`.
    """
    if isinstance(exc, EngineDeadError):
        return make_error(str(exc), 503)
    if not isinstance(exc, ValueError):
        return make_error(f"internal error: {exc!r}", 500)
    message = str(exc)
    param = getattr(exc, "param", None)
    if param is None:
        # NOTE: SamplingParams' messages start with the field name ("temperature must be ...").
        first = message.split(" ", 1)[0]
        if first in _SAMPLING_FIELDS:
            param = (param_names or {}).get(first, first)
    return make_error(message, 400, param=param)


def aborted_error(outputs: list[RequestOutput]) -> ErrorResponse | None:
    """A 503 when a whole (non-streamed) answer holds a choice the server aborted: a client
    that never reads finish_reason must not take a cut-off answer for a complete one. Only the
    server aborts a request whose client still waits: at shutdown."""
    if any(c.finish_reason == "abort" for output in outputs for c in output.outputs):
        return make_error("the request was aborted before it finished: the server is "
                          "shutting down", 503)
    return None
