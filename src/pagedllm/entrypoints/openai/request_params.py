"""Request fields -> what the engine takes: checked SamplingParams (or beam search) and prompts.

Both checks run on the event loop, so a bad request is answered with a 400 and never reaches
the engine thread.
"""

from __future__ import annotations

import math
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.engine.input_processor import ProcessedRequest
    from pagedllm.entrypoints.openai.protocol import SamplingExtras

# Most top log-probabilities a request may ask for per token (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# OpenAI's range for a logit_bias value; vLLM clamps into it too.
MAX_LOGIT_BIAS = 100.0
# The keys `structured_outputs` takes (StructuredOutputsParams' public fields).
_STRUCTURED_FIELDS = tuple(f.name for f in dataclass_fields(StructuredOutputsParams)
                           if not f.name.startswith("_"))


def check_stream_options(stream: bool, stream_options: object | None) -> None:
    if stream_options is not None and not stream:
        raise RequestFieldError("stream_options can only be given with stream=true",
                                param="stream_options")


def build_sampling_params(
    request: SamplingExtras,
    *,
    max_num_seqs: int,
    n: int,
    max_tokens: int | None,
    logprobs: int | None,
    best_of: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[str, float] | None = None,
    tool_constraint: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """Raises ValueError (400) naming the offending field.

    `tool_constraint` is the grammar of chat's tool_choice ("required" or a named function),
    which takes the place of response_format / structured_outputs.

    With `use_beam_search` the result only carries the length: the beams come from
    `process_prompt`, and `n` is the beam width (at most the engine's `max_num_seqs`), not a
    number of samples.
    """
    structured = structured_outputs_of(request)
    if tool_constraint is not None:
        if structured is not None:
            raise RequestFieldError(f"tool_choice and {structured_param_of(request)} both "
                                    f"constrain the output: give one of them",
                                    param="tool_choice")
        structured = tool_constraint
    if request.use_beam_search:
        if structured is not None:
            param = "tool_choice" if tool_constraint is not None else structured_param_of(request)
            raise RequestFieldError(f"{param} is not supported with use_beam_search: beams are "
                                    f"ranked by raw log-probabilities; drop one of them",
                                    param=param)
        _check_beam_search(request, n, best_of, temperature, top_p, logprobs, max_num_seqs)
        n, best_of, temperature = 1, None, 0.0
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise RequestFieldError(f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}",
                                param="logprobs")
    kwargs: dict[str, Any] = {
        "n": n,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "repetition_penalty": (1.0 if request.repetition_penalty is None
                               else request.repetition_penalty),
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if request.top_k is None else request.top_k,
        "min_p": 0.0 if request.min_p is None else request.min_p,
        "seed": seed,
        "stop": stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "logprobs": logprobs,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "skip_special_tokens": request.skip_special_tokens,
        "spaces_between_special_tokens": request.spaces_between_special_tokens,
        "logit_bias": _parse_logit_bias(logit_bias),
        "structured_outputs": structured,
    }
    if best_of is not None:
        kwargs["best_of"] = best_of
    params = SamplingParams(**kwargs)
    if request.use_beam_search:
        _check_no_sampling_fields(params)
    return params


def process_prompt(engine: AsyncLLMEngine, request: SamplingExtras, params: SamplingParams,
                   n: int, token_ids: list[int], text: str | None, where: str, param: str,
                   structured_param: str | None = None) -> ProcessedRequest:
    """The one check of a prompt with its settings, made by the engine's input processor
    here, on the event loop, so a bad request is answered 400 before it reaches the engine
    thread (which queues the result without checking again).

    With `use_beam_search` the request becomes the beam search `params` stand for.
    `where` names the prompt in messages ("prompt", "messages"); `param` is the field
    blamed for problems with the prompt itself, `structured_param` (by default the one the
    request's constraint came from) for a bad constraint.
    """
    engine_params: SamplingParams | BeamSearchParams = params
    if request.use_beam_search:
        max_tokens = params.max_tokens
        if max_tokens is None:  # as the engine picks it
            max_tokens = engine.default_max_tokens(len(token_ids), n)
        engine_params = BeamSearchParams(beam_width=n, max_tokens=max_tokens,
                                         ignore_eos=request.ignore_eos,
                                         length_penalty=request.length_penalty)
    return engine.process_inputs(token_ids, engine_params, text,
                                 refuse_past_context=True, where=where, param=param,
                                 structured_param=structured_param or structured_param_of(request))


def structured_outputs_of(request: SamplingExtras) -> StructuredOutputsParams | None:
    """The request's constraint on its output, from `response_format` or `structured_outputs`
    (at most one); a bad one is a RequestFieldError naming the field."""
    from_format = _from_response_format(request.response_format)
    given = request.structured_outputs
    if given is None:
        return from_format
    if from_format is not None:
        raise RequestFieldError("response_format and structured_outputs both constrain the "
                                "output: give one of them", param="structured_outputs")
    unknown = sorted(set(given) - set(_STRUCTURED_FIELDS))
    if unknown:
        raise RequestFieldError(f"structured_outputs has unknown keys {unknown}; it takes "
                                f"{', '.join(_STRUCTURED_FIELDS)}", param="structured_outputs")
    try:
        return StructuredOutputsParams(**given)
    except ValueError as exc:
        raise RequestFieldError(str(exc), param="structured_outputs") from None


def structured_param_of(request: SamplingExtras) -> str:
    """The field a bad constraint is blamed on."""
    return "structured_outputs" if request.structured_outputs is not None else "response_format"


def _from_response_format(response_format: dict[str, Any] | None
                          ) -> StructuredOutputsParams | None:
    """OpenAI's response_format: "text" (no constraint), "json_object" (any JSON object) or
    "json_schema" (`{"json_schema": {"name": ..., "schema": {...}, "strict": ...}}`)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestFieldError(
                'response_format of type "json_schema" needs json_schema.schema, a JSON schema '
                '(an object): {"type": "json_schema", "json_schema": {"name": ..., "schema": '
                '{...}}}', param="response_format")
        return StructuredOutputsParams(json=schema)
    raise RequestFieldError(f"response_format.type must be one of text, json_object, "
                            f"json_schema; got {kind!r}", param="response_format")


def _check_beam_search(request: SamplingExtras, n: int, best_of: int | None,
                       temperature: float | None, top_p: float | None, logprobs: int | None,
                       max_num_seqs: int) -> None:
    """Refuses beam-search requests that make no sense: beams are ranked by the model's raw
    log-probabilities, and the beams carry no per-token log-probabilities."""
    if not 1 <= n <= max_num_seqs:
        # NOTE: every beam is a sequence; a search wider than max_num_seqs would wait forever
        # at the head of the queue, and every request behind it would wait with it.
        raise RequestFieldError(
            f"n is the beam width with use_beam_search and must be in [1, {max_num_seqs}] "
            f"(the server's max_num_seqs), got {n}", param="n")
    if temperature not in (None, 0):
        raise RequestFieldError(
            f"temperature must be 0 or omitted with use_beam_search (beams are ranked by raw "
            f"log-probabilities), got {temperature}", param="temperature")
    if best_of is not None:
        raise RequestFieldError(
            "best_of is not supported with use_beam_search: n is the beam width and all n "
            "beams are returned, best first", param="best_of")
    if logprobs is not None:
        raise RequestFieldError("logprobs are not supported with use_beam_search",
                                param="logprobs")
    if not math.isfinite(request.length_penalty):
        raise RequestFieldError(f"length_penalty must be finite, got {request.length_penalty}",
                                param="length_penalty")
    # NOTE: checked here, as sent: greedy SamplingParams reset the filters to off.
    filters = {"top_p": (top_p, (None, 1)), "top_k": (request.top_k, (None, 0, -1)),
               "min_p": (request.min_p, (None, 0))}
    for name, (value, neutral) in filters.items():
        if value not in neutral:
            raise _not_with_beam_search(name)


# The other SamplingParams fields that would change which beams win or where they end, with
# their neutral values (the only ones beam search accepts).
_BEAM_NEUTRAL = {
    "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (1.0,),
    "logit_bias": (None, {}), "stop": (None, []), "stop_token_ids": (None, []),
    "min_tokens": (0,),
}


def _check_no_sampling_fields(params: SamplingParams) -> None:
    for name, neutral in _BEAM_NEUTRAL.items():
        if getattr(params, name) not in neutral:
            raise _not_with_beam_search(name)


def _not_with_beam_search(name: str) -> RequestFieldError:
    return RequestFieldError(
        f"{name} is not supported with use_beam_search: beams are ranked by raw "
        f"log-probabilities and end only at EOS or max_tokens; drop {name}", param=name)


def _parse_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    parsed = {}
    for key, value in logit_bias.items():
        try:
            parsed[int(key)] = (min(max(value, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS)
                                if math.isfinite(value) else value)
        except ValueError:
            raise RequestFieldError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                param="logit_bias",
            ) from None
    return parsed
