"""Beam search over the OpenAI-compatible server (`use_beam_search`, `length_penalty`), checked
against the offline `LLM.beam_search` on the same model.

The model is the tiny random Llama with its EOS row of the LM head scaled up, so that some beams
end at EOS before max_tokens: only then does `length_penalty` change which beams win, and the
tests assert that it does.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file
from test_server import ServerProcess, assert_openai_error, request_json

from pagedllm import LLM, SamplingParams
from pagedllm.core.beam_search import BeamSearchParams

NAME = "tiny-eos"
EOS_TOKEN_ID = 2  # SmolLM2's tokenizer, which the tiny model uses
# Token-id prompts whose best beams change with length_penalty on this model.
PROMPTS = [[1000 + 37 * i + j for j in range(5)] for i in (0, 2)]
ABORTS = "pagedllm:request_success_total{finished_reason=abort}"


@pytest.fixture(scope="module")
def model_dir(tiny_llama_factory, tmp_path_factory) -> Path:
    source = tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)
    path = tmp_path_factory.mktemp("tiny-eos")
    shutil.copytree(source, path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][EOS_TOKEN_ID] *= 3.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("beam-server")
    proc = ServerProcess(model_dir, logs / "server.log", "--num-kv-blocks", "64",
                         "--served-model-name", NAME)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def llm(model_dir, server) -> LLM:
    """The offline reference on the same model (built after the server has started)."""
    return LLM(model=str(model_dir), num_kv_blocks=64)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def offline_beams(llm: LLM, prompt_ids: list[int], params: BeamSearchParams
                  ) -> list[tuple[str, str | None, int]]:
    """(text, finish reason, number of generated tokens) of each beam, best first."""
    tokenizer = llm.get_tokenizer()
    [output] = llm.beam_search({"prompt_token_ids": prompt_ids}, params)
    beams = []
    for seq in output.sequences:
        generated = seq.tokens[len(prompt_ids):]
        beams.append((tokenizer.decode(generated, skip_special_tokens=True),
                      seq.finish_reason, len(generated)))
    return beams


def beam_body(**kwargs) -> dict:
    return {"model": NAME, "use_beam_search": True, **kwargs}


# ---- results ----------------------------------------------------------------------------------

def test_completion_beams_equal_offline_beam_search(client, llm):
    results = {}
    for length_penalty in (0.0, 1.0, 3.0):
        params = BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=length_penalty)
        expected = [offline_beams(llm, ids, params) for ids in PROMPTS]
        reply = client.completions.create(
            model=NAME, prompt=PROMPTS, n=3, max_tokens=8,
            extra_body={"use_beam_search": True, "length_penalty": length_penalty})
        # Prompt-major: choice 3 * i + k is beam k of prompt i.
        assert [c.index for c in reply.choices] == list(range(6))
        got = [[(c.text, c.finish_reason) for c in reply.choices[3 * i:3 * i + 3]]
               for i in range(len(PROMPTS))]
        assert got == [[(text, reason) for text, reason, _ in beams] for beams in expected]
        assert reply.usage.completion_tokens == sum(n for b in expected for _, _, n in b)
        results[length_penalty] = got
    # The check is not vacuous: some beams stop at EOS, and the penalty reorders the beams.
    assert any(reason == "stop" for beams in results[1.0] for _, reason in beams)
    assert results[0.0] != results[1.0] != results[3.0]


def test_chat_beams_equal_offline_beam_search_and_stream_whole(server, client, llm):
    messages = [{"role": "user", "content": "Name three colours."}]
    _, tokens = request_json("POST", server.url + "/tokenize", {"messages": messages})
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=0.5)
    expected = offline_beams(llm, tokens["tokens"], params)
    kwargs = dict(model=NAME, messages=messages, n=4, max_tokens=10, temperature=0,
                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    reply = client.chat.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [(c.message.content, c.finish_reason) for c in reply.choices] == [
        (text, reason) for text, reason, _ in expected]
    assert reply.usage.prompt_tokens == tokens["count"]
    # Streamed, each beam comes whole in one chunk once the search is over (as vLLM does).
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert [c.choices[0].delta.role for c in chunks[:4]] == ["assistant"] * 4
    beams = [(c.choices[0].index, c.choices[0].delta.content, c.choices[0].finish_reason)
             for c in chunks[4:]]
    assert beams == [(k, text, reason) for k, (text, reason, _) in enumerate(expected)]


def test_chat_beams_without_max_tokens_run_as_far_as_the_cache_takes_them(server, client, llm):
    # 4 beams to the end of the 512-token context could need 4 x 30 blocks; the cache has 64,
    # so the default max_tokens is what the search's worst case fits: 4 beams recomputed on
    # their own after a preemption, 4 x (34 + 222) / 16 = 64 blocks.
    messages = [{"role": "user", "content": "Name three colours."}]
    _, tokens = request_json("POST", server.url + "/tokenize", {"messages": messages})
    assert tokens["count"] == 34
    expected = offline_beams(llm, tokens["tokens"], BeamSearchParams(
        beam_width=4, max_tokens=222, ignore_eos=True))
    reply = client.chat.completions.create(model=NAME, messages=messages, n=4, temperature=0,
                                           extra_body={"use_beam_search": True,
                                                       "ignore_eos": True})
    assert [(c.message.content, c.finish_reason) for c in reply.choices] == [
        (text, reason) for text, reason, _ in expected]
    assert reply.usage.completion_tokens == 4 * 222


def test_streamed_completion_beams_come_whole(client, llm):
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    expected = offline_beams(llm, PROMPTS[0], params)
    chunks = list(client.completions.create(
        model=NAME, prompt=PROMPTS[0], n=2, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"use_beam_search": True}))
    beams = [(c.choices[0].index, c.choices[0].text, c.choices[0].finish_reason)
             for c in chunks if c.choices]
    assert beams == [(k, text, reason) for k, (text, reason, _) in enumerate(expected)]
    assert chunks[-1].usage.completion_tokens == sum(n for _, _, n in expected)


# ---- concurrency and aborts --------------------------------------------------------------------

def test_normal_request_is_served_while_a_beam_search_runs(server, llm):
    # NOTE: long enough (about 0.3 s here on a quiet machine) that "alongside" means something.
    beam_params = BeamSearchParams(beam_width=4, max_tokens=160, ignore_eos=True)
    expected_beams = offline_beams(llm, PROMPTS[1], beam_params)
    normal_prompt = [4000, 4100, 4200, 4300]
    [expected_normal] = llm.generate({"prompt_token_ids": normal_prompt},
                                     SamplingParams(temperature=0, max_tokens=24,
                                                    ignore_eos=True), use_tqdm=False)

    async def run() -> tuple[list[str], str, float, float]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)

        async def beam_search() -> tuple[list[str], float]:
            reply = await client.completions.create(
                model=NAME, prompt=PROMPTS[1], n=4, max_tokens=160,
                extra_body={"use_beam_search": True, "ignore_eos": True})
            return [c.text for c in reply.choices], time.monotonic()

        async def normal() -> tuple[str, float]:
            await asyncio.sleep(0.05)  # the beam search is in the engine first
            parts, first_chunk_at = [], math.inf
            async for chunk in await client.completions.create(
                    model=NAME, prompt=normal_prompt, max_tokens=24, temperature=0,
                    stream=True, extra_body={"ignore_eos": True}):
                first_chunk_at = min(first_chunk_at, time.monotonic())
                parts.append(chunk.choices[0].text)
            return "".join(parts), first_chunk_at

        (beams, beam_done_at), (text, first_chunk_at) = await asyncio.gather(
            beam_search(), normal())
        await client.close()
        return beams, text, beam_done_at, first_chunk_at

    beams, text, beam_done_at, first_chunk_at = asyncio.run(run())
    assert beams == [text for text, _, _ in expected_beams]
    assert text == expected_normal.outputs[0].text
    assert first_chunk_at < beam_done_at  # served alongside, not after, the beam search
    metrics = server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0  # every beam's blocks came back


def test_client_gone_before_the_beams_frees_the_search(server):
    num_aborts = server.metrics().get(ABORTS, 0)
    # NOTE: the search takes about 0.35 s on a quiet machine; the client leaves well before.
    impatient = server.client(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt=PROMPTS[0], n=4, max_tokens=200,
                                     extra_body={"use_beam_search": True, "ignore_eos": True})
    metrics = server.wait_idle(timeout_s=5)
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics[ABORTS] == num_aborts + 1


# ---- errors -----------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "x"}]
ERROR_CASES = [
    # (route, body, param, message fragments)
    ("/v1/completions", beam_body(prompt="hi", temperature=0.7), "temperature",
     ["temperature", "use_beam_search", "0.7"]),
    ("/v1/chat/completions", beam_body(messages=CHAT, temperature=1), "temperature",
     ["temperature", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", n=2, best_of=3), "best_of",
     ["best_of", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", logprobs=1), "logprobs",
     ["logprobs", "use_beam_search"]),
    ("/v1/chat/completions", beam_body(messages=CHAT, logprobs=True), "logprobs",
     ["logprobs", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", stream=True, logprobs=2), "logprobs",
     ["logprobs", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", n=0), "n", ["beam width", "got 0"]),
    ("/v1/chat/completions", beam_body(messages=CHAT, n=-1), "n", ["beam width", "got -1"]),
    ("/v1/completions", beam_body(prompt="hi", n=1000), "n", ["max_num_seqs", "got 1000"]),
    ("/v1/completions", beam_body(prompt="hi", top_p=0.5), "top_p",
     ["top_p", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", top_k=5), "top_k", ["top_k", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", stop=["x"]), "stop", ["stop", "use_beam_search"]),
    ("/v1/chat/completions", beam_body(messages=CHAT, presence_penalty=1.0),
     "presence_penalty", ["presence_penalty", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", logit_bias={"5": 1}), "logit_bias",
     ["logit_bias", "use_beam_search"]),
    ("/v1/completions", beam_body(prompt="hi", length_penalty=math.inf), "length_penalty",
     ["length_penalty", "finite"]),
    # 4 beams of 300 tokens may need 1 + 4 x 20 blocks; the cache has 64.
    ("/v1/completions", beam_body(prompt="hi", n=4, max_tokens=300), "max_tokens",
     ["n=4", "max_tokens=300", "1296", "1024"]),
    # The usual checks still apply.
    ("/v1/completions", beam_body(prompt="hi", max_tokens=600), "max_tokens", ["512"]),
]


def test_beam_search_errors_are_openai_shaped(server, client):
    for route, body, param, fragments in ERROR_CASES:
        status, got = request_json("POST", server.url + route, body)
        error = assert_openai_error(status, got, 400, *fragments)
        assert error["param"] == param, (route, body, error)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="hi", n=2, temperature=0.5,
                                  extra_body={"use_beam_search": True})
    assert info.value.status_code == 400 and "temperature" in info.value.message
    assert server.wait_idle()["pagedllm:num_requests_running"] == 0
