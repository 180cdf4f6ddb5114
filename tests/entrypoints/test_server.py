"""`pagedllm serve` as clients see it: real servers in subprocesses on 127.0.0.1, driven by the
official `openai` client and by raw HTTP where the exact status and body matter.

Most tests share one server on a tiny random Llama (fast, SmolLM2's tokenizer) whose KV pool is
small enough that 64 concurrent requests force preemption; SmolLM2 itself answers the one chat
test whose answer must make sense.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

TINY_NAME = "tiny"
API_KEY = "sk-test-key"
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}"
# 40 blocks x 16 tokens = 640 slots: any single request fits (max_model_len is 512), 64
# concurrent ones do not.
NUM_KV_BLOCKS = "40"

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- helpers ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m pagedllm serve MODEL --port P ...` with its output in a log file."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm", "serve", str(model_dir), "--port", str(self.port),
             *args],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k != "PAGEDLLM_API_KEY"},
                 "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if request_json("GET", self.url + "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Sample name -> value summed over labels, plus `name{label=value}` per label."""
        _, text = request_json("GET", self.url + "/metrics")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                keys = [sample.name] + [f"{sample.name}{{{k}={v}}}"
                                        for k, v in sample.labels.items() if k != "model_name"]
                for key in keys:
                    values[key] = values.get(key, 0.0) + sample.value
        return values

    def wait_idle(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Polls /metrics until no request runs or waits and no KV block is in use."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = (m["pagedllm:num_requests_running"] == 0
                    and m["pagedllm:num_requests_waiting"] == 0
                    and m["pagedllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def request_json(method: str, url: str, body: dict | str | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 60):
    """(status, parsed JSON or text) of one HTTP request; error statuses are returned too."""
    data = body if isinstance(body, (str, type(None))) else json.dumps(body)
    request = urllib.request.Request(
        url, data=None if data is None else data.encode(), method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def assert_openai_error(status: int, body, expected_status: int, *fragments: str) -> dict:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def open_stream(server: ServerProcess, body: dict, headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, object]:
    """Starts a streaming request on a raw connection; returns it and the response."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def read_events(response, limit: int | None = None) -> list:
    """SSE `data:` payloads (parsed JSON, or the string "[DONE]") until EOF or `limit`."""
    events: list = []
    while limit is None or len(events) < limit:
        line = response.readline()
        if not line:
            break
        line = line.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory) -> Path:
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)


@pytest.fixture(scope="module")
def servers(tiny_dir, smollm2_dir, tmp_path_factory):
    """Launches every server of this module at once, so their start-ups overlap."""
    logs = tmp_path_factory.mktemp("servers")
    tiny_args = ("--num-kv-blocks", NUM_KV_BLOCKS, "--served-model-name", TINY_NAME)
    (logs / "template.jinja").write_text(CHAT_TEMPLATE)
    procs = {
        "main": ServerProcess(tiny_dir, logs / "main.log", *tiny_args,
                              "--log-stats-interval", "1"),
        # Also the one with a --chat-template, and with auto tool choice.
        "keyed": ServerProcess(tiny_dir, logs / "keyed.log", *tiny_args, "--api-key", API_KEY,
                               "--chat-template", str(logs / "template.jinja"),
                               "--enable-auto-tool-choice", "--tool-call-parser", "hermes"),
        # The key from the environment this time.
        "doomed": ServerProcess(tiny_dir, logs / "doomed.log", *tiny_args,
                                env={"PAGEDLLM_API_KEY": API_KEY}),
        "smol": ServerProcess(smollm2_dir, logs / "smol.log", "--num-kv-blocks", "64",
                              "--served-model-name", "smol"),
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def keyed_server(servers) -> ServerProcess:
    return servers["keyed"].wait_ready()


@pytest.fixture(scope="module")
def smol_server(servers) -> ServerProcess:
    return servers["smol"].wait_ready()


def greedy(**kwargs) -> dict:
    return {"model": TINY_NAME, "temperature": 0, **kwargs}


# ---- basic endpoints --------------------------------------------------------------------------

def test_health_version_models(server, client):
    assert request_json("GET", server.url + "/health") == (200, {})
    status, body = request_json("GET", server.url + "/version")
    assert status == 200 and body["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [TINY_NAME]
    assert models[0].max_model_len == 512


def test_metrics_names(server):
    names = set(server.metrics())
    expected = {
        "pagedllm:num_requests_running", "pagedllm:num_requests_waiting",
        "pagedllm:num_requests_swapped", "pagedllm:kv_cache_usage_perc",
        "pagedllm:num_preemptions_total", "pagedllm:prompt_tokens_total",
        "pagedllm:generation_tokens_total", "pagedllm:prefix_cache_queries_total",
        "pagedllm:prefix_cache_hits_total",
        "pagedllm:time_to_first_token_seconds_count",
        "pagedllm:time_per_output_token_seconds_count",
        "pagedllm:e2e_request_latency_seconds_count",
    }
    assert expected <= names


def test_tokenize_and_detokenize(server, client):
    status, body = request_json("POST", server.url + "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == 512
    status, back = request_json("POST", server.url + "/detokenize", {"tokens": body["tokens"]})
    assert (status, back) == (200, {"prompt": "Hello world"})
    messages = [{"role": "user", "content": "Hi there"}]
    _, chat_tokens = request_json("POST", server.url + "/tokenize", {"messages": messages})
    reply = client.chat.completions.create(messages=messages, max_tokens=2, **greedy())
    assert reply.usage.prompt_tokens == chat_tokens["count"]


# ---- completions ------------------------------------------------------------------------------

def test_completion_text_usage_and_length(server, client):
    reply = client.completions.create(prompt="The capital of France is", max_tokens=12,
                                      extra_body={"ignore_eos": True}, **greedy())
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == TINY_NAME
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    _, tokens = request_json("POST", server.url + "/tokenize",
                             {"prompt": "The capital of France is"})
    assert reply.usage.prompt_tokens == tokens["count"]
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == tokens["count"] + 12


def test_all_prompt_forms_agree(server, client):
    text = "Once upon a time"
    _, tokens = request_json("POST", server.url + "/tokenize", {"prompt": text})
    ids = tokens["tokens"]
    single = client.completions.create(prompt=text, max_tokens=6, **greedy()).choices[0].text
    by_ids = client.completions.create(prompt=ids, max_tokens=6, **greedy()).choices[0].text
    assert by_ids == single
    batch = client.completions.create(prompt=[text, "Hello"], max_tokens=6, **greedy())
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == single
    id_batch = client.completions.create(prompt=[ids, [42, 43, 44]], max_tokens=6, **greedy())
    assert len(id_batch.choices) == 2 and id_batch.choices[0].text == single
    echoed = client.completions.create(prompt=text, max_tokens=6, echo=True, **greedy())
    assert echoed.choices[0].text == text + single


def test_streamed_completion_joins_to_the_non_streamed_text(client):
    kwargs = greedy(prompt="In a distant galaxy", max_tokens=20)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1  # token by token, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_logprobs(client):
    reply = client.completions.create(prompt="Numbers:", max_tokens=5, logprobs=3, **greedy())
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely
    streamed = client.completions.create(prompt="Numbers:", max_tokens=5, logprobs=3,
                                         stream=True, **greedy())
    tokens = [t for c in streamed for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens


def test_stop_strings_cut_the_text(client):
    kwargs = greedy(prompt="Tell me a story", max_tokens=24, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    words = text.split()
    stop = words[len(words) // 2]
    expected = text[:text.index(stop)]
    reply = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert (reply.text, reply.finish_reason) == (expected, "stop")
    assert reply.model_extra["stop_reason"] == stop
    streamed = client.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == expected
    kept = client.completions.create(
        prompt="Tell me a story", max_tokens=24, stop=[stop], temperature=0, model=TINY_NAME,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    ).choices[0]
    assert kept.text == expected + stop


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=TINY_NAME, prompt="Random words:", max_tokens=16, temperature=1.0,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    again = client.completions.create(seed=1234, **kwargs).choices[0].text
    other = client.completions.create(seed=4321, **kwargs).choices[0].text
    assert first == again
    assert other != first


def test_n_completions(client):
    kwargs = dict(prompt="Pick a word:", max_tokens=8, n=2, temperature=1.0, seed=7,
                  model=TINY_NAME, extra_body={"ignore_eos": True})
    reply = client.completions.create(**kwargs)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 2 * 8
    streamed = client.completions.create(stream=True, **kwargs)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in reply.choices}
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=4, temperature=1.0, seed=7, model=TINY_NAME)
    assert sorted(c.index for c in chat.choices) == [0, 1]


# ---- chat -------------------------------------------------------------------------------------

def test_chat_streamed_equals_non_streamed_and_content_parts(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say something."},
                {"role": "assistant", "content": "Something."},
                {"role": "user", "content": [{"type": "text", "text": "Again,"},
                                             {"type": "text", "text": "please."}]}]
    full = client.chat.completions.create(messages=messages, max_completion_tokens=16, **greedy())
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(
        messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True},
        **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_logprobs(client):
    reply = client.chat.completions.create(messages=[{"role": "user", "content": "Count"}],
                                           max_tokens=4, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True}, **greedy())
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.top_logprobs[0].token == token.token
        assert bytes(token.bytes).decode() == token.token


def test_chat_answer_from_smollm2(smol_server):
    client = smol_server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                           temperature=0)
    assert "Paris" in reply.choices[0].message.content
    streamed = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                              temperature=0, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == reply.choices[0].message.content


# ---- structured outputs -----------------------------------------------------------------------

# Every string bounded, no free-form number, no extra property: even the random tiny model
# completes it within max_tokens.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["engineer", "artist", "doctor"]},
        "skills": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,8}$"},
                   "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"], "additionalProperties": False},
        "nickname": {"type": "string", "maxLength": 10},
    },
    "required": ["name", "age", "role", "skills", "address"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


def compact_json(schema: dict) -> dict:
    """vLLM's structured_outputs body field: JSON without free whitespace (the random tiny model
    would otherwise fill every gap the grammar allows with it)."""
    return {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}


def test_structured_outputs_with_the_openai_client(client):
    reply = client.completions.create(prompt="Date:", max_tokens=32, n=2, temperature=1.0,
                                      model=TINY_NAME,
                                      extra_body={"structured_outputs": {"regex": DATE}})
    for choice in reply.choices:
        assert re.fullmatch(DATE, choice.text) and choice.finish_reason == "stop", choice
    body = dict(prompt="Pick:", max_tokens=16, extra_body={"structured_outputs": {
        "choice": ["left", "right", "straight on"]}}, **greedy())
    text = client.completions.create(**body).choices[0].text
    assert text in ("left", "right", "straight on")
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **body)
                   ) == text
    colors = {"type": "json_schema", "json_schema": {
        "name": "color", "schema": {"enum": ["red", "green", "blue"]}, "strict": True}}
    for format_ in (colors, {"type": "text"}):
        chat = client.chat.completions.create(
            messages=[{"role": "user", "content": "A color?"}], max_tokens=8,
            response_format=format_, **greedy())
        if format_["type"] == "json_schema":
            assert json.loads(chat.choices[0].message.content) in ("red", "green", "blue")
    grammar = 'start: "(" NUMBER ("+" NUMBER)* ")"\nNUMBER: /[1-9][0-9]?/'
    streamed = client.chat.completions.create(
        messages=[{"role": "user", "content": "Sum?"}], max_tokens=24, stream=True,
        extra_body={"structured_outputs": {"grammar": grammar}}, **greedy())
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", content) or (
        re.fullmatch(r"\([0-9+]*", content)), content  # complete, or cut by max_tokens


def test_16_concurrent_json_schema_requests_validate(server):
    client = server.client()

    def ask(i: int) -> tuple[str, str]:
        if i % 2:
            reply = client.completions.create(
                prompt=f"Person {i} as JSON:", max_tokens=160, temperature=1.0,
                model=TINY_NAME, extra_body=compact_json(PERSON_SCHEMA))
            return reply.choices[0].text, reply.choices[0].finish_reason
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": f"Person {i} as JSON"}], max_tokens=160,
            temperature=1.0, model=TINY_NAME, extra_body=compact_json(PERSON_SCHEMA))
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for text, finish_reason in answers:
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    server.wait_idle()


def test_response_format_from_smollm2(smol_server):
    client = smol_server.client()
    messages = [{"role": "user", "content": "Describe a software engineer named Ada as JSON."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person",
                                                            "schema": PERSON_SCHEMA}}
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=200,
                                           temperature=0, response_format=schema_format)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)
    streamed = client.chat.completions.create(model="smol", messages=messages, max_tokens=200,
                                              temperature=0, response_format=schema_format,
                                              stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == reply.choices[0].message.content
    reply = client.completions.create(model="smol", prompt="A JSON object about cats:",
                                      max_tokens=200, temperature=0,
                                      extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.choices[0].text), dict)


# ---- tools --------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL,
                                                                           TIME_TOOL)}


def streamed_calls(chunks) -> tuple[list[tuple[str, str, str]], str | None, str]:
    """(id, name, joined arguments) per streamed call, the last finish_reason, the content."""
    calls: dict[int, list[str]] = {}
    finish_reason, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, ["", "", ""])
                entry[0] += call.id or ""
                entry[1] += (call.function.name or "") if call.function else ""
                entry[2] += (call.function.arguments or "") if call.function else ""
    return [tuple(calls[i]) for i in sorted(calls)], finish_reason, content


def test_tool_choice_required_and_named_function(client):
    body = dict(messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=64, parallel_tool_calls=False,
                **greedy())
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply = client.chat.completions.create(tool_choice=tool_choice, **body)
        choice = reply.choices[0]
        assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if tool_choice != "required":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])
        calls, finish_reason, content = streamed_calls(client.chat.completions.create(
            tool_choice=tool_choice, stream=True, **body))
        assert [(name, args) for _, name, args in calls] == [
            (call.function.name, call.function.arguments)]
        assert calls[0][0].startswith("call_") and finish_reason == choice.finish_reason
        assert content == ""
    reply = client.chat.completions.create(tool_choice="none", **body)
    assert not reply.choices[0].message.tool_calls
    assert isinstance(reply.choices[0].message.content, str)


def test_auto_tool_choice_parses_the_models_calls(keyed_server):
    client = keyed_server.client(api_key=API_KEY)
    # The tiny model is made to write a Hermes call (as a model trained for it would).
    text = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"unit": "c"}}</tool_call>')
    body = dict(messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=64,
                extra_body={"structured_outputs": {"choice": [text]}}, **greedy())
    reply = client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_weather", {"city": "Oslo", "unit": "c"})]
    calls, finish_reason, content = streamed_calls(client.chat.completions.create(stream=True,
                                                                                  **body))
    assert content.strip() == "Checking." and finish_reason == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"})]
    # Without a call in the text, the answer is plain content.
    plain = client.chat.completions.create(**{**body, "extra_body": {
        "structured_outputs": {"choice": ["Sunny."]}}})
    assert plain.choices[0].message.content == "Sunny."
    assert not plain.choices[0].message.tool_calls and plain.choices[0].finish_reason == "stop"


# ---- load, preemption, disconnects --------------------------------------------------------------

def test_64_concurrent_streams_with_preemption(server):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 40000, int(rng.integers(6, 14))).tolist() for _ in range(64)]
    base = dict(model=TINY_NAME, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    preemptions_before = server.metrics()["pagedllm:num_preemptions_total"]

    async def run() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)
        limit = asyncio.Semaphore(8)

        async def reference(prompt: list[int]) -> str:
            async with limit:
                reply = await client.completions.create(prompt=prompt, **base)
                return reply.choices[0].text

        async def streamed(prompt: list[int]) -> str:
            parts, reasons = [], []
            async for chunk in await client.completions.create(prompt=prompt, stream=True,
                                                               **base):
                parts.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)
            assert reasons[-1] == "length"
            return "".join(parts)

        expected = await asyncio.gather(*(reference(p) for p in prompts))
        actual = await asyncio.gather(*(streamed(p) for p in prompts))
        await client.close()
        return expected, actual

    expected, actual = asyncio.run(run())
    assert actual == expected
    assert len(set(actual)) == 64
    metrics = server.wait_idle()
    assert metrics["pagedllm:num_preemptions_total"] > preemptions_before
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:num_requests_waiting"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics["pagedllm:generation_tokens_total"] >= 2 * 64 * 24
    assert metrics["pagedllm:time_to_first_token_seconds_count"] >= 128
    assert metrics["pagedllm:e2e_request_latency_seconds_count"] >= 128
    assert metrics["pagedllm:time_per_output_token_seconds_count"] >= 128
    assert metrics["pagedllm:prompt_tokens_total"] >= 2 * sum(len(p) for p in prompts)
    assert "Avg generation throughput" in server.log_path.read_text()  # the periodic log line


ABORTS = "pagedllm:request_success_total{finished_reason=abort}"


def test_client_disconnect_mid_stream_frees_the_request(server):
    num_aborts = server.metrics().get(ABORTS, 0)
    conn, response = open_stream(server, greedy(prompt="Go on and on", max_tokens=450,
                                                ignore_eos=True))
    assert len(read_events(response, limit=3)) == 3
    busy = server.metrics()
    assert busy["pagedllm:num_requests_running"] == 1
    assert busy["pagedllm:kv_cache_usage_perc"] > 0
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # The abort counter tells an aborted request from one that ran to its end.
    metrics = server.wait_idle(timeout_s=5)
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics[ABORTS] == num_aborts + 1


def test_client_gone_before_a_non_streamed_answer_frees_the_request(server):
    num_aborts = server.metrics().get(ABORTS, 0)
    # NOTE: 450 tokens take 0.3 s or more here; the client leaves well before.
    impatient = server.client(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(prompt="Go on and on", max_tokens=450, model=TINY_NAME,
                                     extra_body={"ignore_eos": True})
    metrics = server.wait_idle(timeout_s=5)
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics[ABORTS] == num_aborts + 1


# ---- errors -----------------------------------------------------------------------------------

ERROR_CASES = [
    # (route, body, status, param, message fragments)
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", ["nope"]),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
     404, "model", ["nope"]),
    ("/v1/completions", greedy(prompt="hi", temperature=-1), 400, "temperature", ["temperature"]),
    ("/v1/completions", greedy(prompt="hi", top_p=0), 400, "top_p", ["top_p"]),
    ("/v1/completions", greedy(prompt="hi", max_tokens=0), 400, "max_tokens", ["max_tokens"]),
    ("/v1/completions", greedy(prompt="hi", logprobs=50), 400, "logprobs", ["logprobs"]),
    ("/v1/completions", greedy(prompt="hi", max_tokens=600), 400, "max_tokens",
     ["512", "601", "600"]),
    ("/v1/completions", greedy(prompt="word " * 600), 400, "prompt", ["512"]),
    ("/v1/completions", greedy(prompt=""), 400, "prompt", ["empty"]),
    ("/v1/completions", greedy(prompt=[]), 400, "prompt", ["empty"]),
    ("/v1/completions", greedy(prompt=[[1, 2], []]), 400, "prompt", ["empty"]),
    ("/v1/completions", greedy(prompt=[10**6]), 400, "prompt", ["vocabulary"]),
    ("/v1/completions", greedy(prompt="hi", stop_token_ids=[10**6]), 400, "stop_token_ids",
     ["vocabulary"]),
    ("/v1/completions", greedy(prompt="hi", logit_bias={"x": 1}), 400, "logit_bias", ["x"]),
    ("/v1/completions", greedy(prompt="hi", max_tokens="lots"), 400, "max_tokens",
     ["max_tokens"]),
    ("/v1/completions", greedy(), 400, "prompt", ["prompt", "required"]),
    ("/v1/completions", "{not json", 400, None, ["JSON"]),
    ("/v1/chat/completions", greedy(messages=[]), 400, "messages", ["messages"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages", ["role"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages",
     ["image_url"]),
    # Structured outputs: a bad constraint, or two, is refused naming the field.
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "x", "schema": {"type": "strnig"}}}), 400,
     "response_format", ["response_format is invalid", "strnig"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x"}}), 400,
     "response_format", ["json_schema.schema"]),
    ("/v1/completions", greedy(prompt="hi", response_format={"type": "xml"}), 400,
     "response_format", ["xml"]),
    ("/v1/completions", greedy(prompt="hi", structured_outputs={"regex": "([a-z"}), 400,
     "structured_outputs", ["structured_outputs.regex is invalid"]),
    ("/v1/completions", greedy(prompt="hi", structured_outputs={
        "json": {"type": "object", "dependentSchemas": {"a": {}}}}), 400,
     "structured_outputs", ["dependentSchemas"]),
    ("/v1/completions", greedy(prompt="hi", structured_outputs={"grammar": "start: nope"}), 400,
     "structured_outputs", ["structured_outputs.grammar is invalid", "nope"]),
    ("/v1/completions", greedy(prompt="hi", structured_outputs={"regex": "a", "choice": ["b"]}),
     400, "structured_outputs", ["exactly one", "regex and choice"]),
    ("/v1/completions", greedy(prompt="hi", structured_outputs={"regexp": "a"}), 400,
     "structured_outputs", ["regexp"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_object"},
                                    structured_outputs={"regex": "a"}), 400,
     "structured_outputs", ["response_format and structured_outputs"]),
    ("/v1/completions", greedy(prompt="hi", use_beam_search=True, n=2,
                               response_format={"type": "json_object"}), 400,
     "response_format", ["use_beam_search"]),
    # Tools: "auto" needs the server's flags; a missing function; two constraints.
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    tools=[WEATHER_TOOL]), 400, "tool_choice",
     ["--enable-auto-tool-choice"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    tools=[WEATHER_TOOL], tool_choice={
                                        "type": "function", "function": {"name": "nope"}}),
     400, "tool_choice", ["nope"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    tools=[WEATHER_TOOL], tool_choice="required",
                                    response_format={"type": "json_object"}), 400,
     "tool_choice", ["both constrain"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}], tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}],
                                    tool_choice="required"), 400, "tools", ["strnig"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    max_completion_tokens=10**4), 400, "max_tokens", ["512"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    logprobs=True, top_logprobs=-1), 400, "top_logprobs",
     ["logprobs"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}],
                                    logprobs=True, top_logprobs=21), 400, "top_logprobs",
     ["top_logprobs", "20"]),
    # JSON can carry a lone surrogate ("\ud800"), which no tokenizer or UTF-8 encoder takes.
    ("/v1/completions", greedy(prompt="hi \ud800"), 400, "prompt", ["prompt", "surrogate"]),
    ("/v1/completions", greedy(prompt=["ok", "\udfff"]), 400, "prompt", ["prompt[1]"]),
    ("/v1/completions", {"model": "x\udfff", "prompt": "hi"}, 400, "model", ["surrogate"]),
    ("/v1/chat/completions", greedy(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\ud83d"}]}]), 400, "messages",
     ["messages[0].content[0].text", "surrogate"]),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt", ["surrogate"]),
    ("/v1/completions", greedy(prompt=[True, False]), 400, "prompt", ["integer"]),
    ("/v1/completions", greedy(prompt="hi", stream_options={"include_usage": True}), 400,
     "stream_options", ["stream"]),
    ("/v1/completions", greedy(prompt="hi", n=1000, temperature=1), 400, "n",
     ["max_num_seqs"]),
]


def test_errors_are_openai_shaped_and_disturb_nothing(server, client):
    # A long stream runs while the bad requests come in; it must finish untouched.
    conn, response = open_stream(server, greedy(prompt="Keep going", max_tokens=120,
                                                ignore_eos=True))
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_events(response)))
    reader.start()
    for route, body, status, param, fragments in ERROR_CASES:
        got_status, got = request_json("POST", server.url + route, body)
        error = assert_openai_error(got_status, got, status, *fragments)
        assert error["param"] == param, (route, body, error)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(prompt="hi", temperature=-1, model=TINY_NAME)
    assert info.value.status_code == 400 and "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(prompt="hi", model="nope")
    reader.join(timeout=60)
    conn.close()
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == client.completions.create(
        prompt="Keep going", max_tokens=120, extra_body={"ignore_eos": True},
        **greedy()).choices[0].text
    assert request_json("GET", server.url + "/health") == (200, {})
    server.wait_idle()


def test_api_key_guards_every_v1_route(keyed_server):
    url = keyed_server.url
    routes = [("GET", "/v1/models", None),
              ("POST", "/v1/completions", greedy(prompt="hi", max_tokens=2)),
              ("POST", "/v1/chat/completions",
               greedy(messages=[{"role": "user", "content": "hi"}], max_tokens=2))]
    for method, route, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            status, got = request_json(method, url + route, body, headers)
            assert_openai_error(status, got, 401, "API key")
        status, _ = request_json(method, url + route, body,
                                 {"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, route
    assert request_json("GET", url + "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()
    reply = keyed_server.client(api_key=API_KEY).completions.create(
        prompt="hi", max_tokens=2, model=TINY_NAME)
    assert reply.choices[0].text


def test_chat_template_flag(keyed_server):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    _, tokens = request_json("POST", keyed_server.url + "/tokenize", {"messages": messages})
    _, text = request_json("POST", keyed_server.url + "/detokenize", {"tokens": tokens["tokens"]})
    assert text["prompt"] == "[user: Hi][assistant: Yo]"


# ---- shutdown ---------------------------------------------------------------------------------

def test_serve_on_a_busy_port_fails_in_one_line(server, tiny_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm", "serve", str(tiny_dir), "--port", str(server.port)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("pagedllm: error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{server.port}" in errors[0]


def test_sigterm_ends_open_streams_and_exits_cleanly(servers):
    proc = servers["doomed"].wait_ready()
    conn, response = open_stream(proc, greedy(prompt="Go on", max_tokens=450, ignore_eos=True),
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    assert len(read_events(response, limit=2)) == 2
    start = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    rest = read_events(response)
    conn.close()
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "abort"
    assert proc.proc.wait(timeout=10) == 0
    assert time.monotonic() - start < 10
