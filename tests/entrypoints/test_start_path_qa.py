"""A live server's three users of the engine's one Rust tokenizer at once (serve's start shares
it: api_server.server_tokenizer, the prompt worker's PromptTokenizer, the engine thread's
detokenizer; FastTokenizer.sharing_backend): mixed traffic that reaches each of them, sent
all at once, answers as the same requests sent one by one, and the log has no error."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server import ServerProcess, request_json

PROMPTS = ["The capital of France is", "Once upon a time, there", "1, 2, 3, 4,",
           "Water boils at", "def fib(n):", "Écris un poème sur la mer 🌊"]
TOKEN_IDS = [504, 3575, 282, 4649, 314, 253, 1345]


def chat_stream(server, model, i):
    """Streamed chat: the prompt worker renders and encodes, the engine thread detokenizes."""
    stream = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=24,
        temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def completion_logprobs(server, model, i):
    """Top logprobs' token strings and prompt logprobs: the event loop's tokenizer."""
    out = server.client().completions.create(
        model=model, prompt=PROMPTS[i], max_tokens=16, temperature=0, logprobs=3,
        extra_body={"prompt_logprobs": 2})
    choice = out.choices[0]
    return (choice.text, choice.logprobs.tokens, choice.logprobs.top_logprobs,
            choice.logprobs.token_logprobs)


def token_id_echo(server, model, i):
    """A token-id prompt's echo: decoded by the event loop's tokenizer."""
    out = server.client().completions.create(
        model=model, prompt=TOKEN_IDS[:2 + i], max_tokens=12, temperature=0, echo=True)
    return out.choices[0].text


def streamed_stop(server, model, i):
    """Stop strings on a stream with logprobs."""
    stream = server.client().completions.create(
        model=model, prompt=PROMPTS[i], max_tokens=30, temperature=0, stop=[" the", "\n\n"],
        stream=True, logprobs=2)
    return "".join(c.choices[0].text for c in stream if c.choices)


def seeded_n(server, model, i):
    out = server.client().completions.create(
        model=model, prompt=PROMPTS[i], max_tokens=20, temperature=0.8, seed=7 + i, n=2,
        stop=["."])
    return [(c.text, c.finish_reason) for c in out.choices]


def tokenize_round_trip(server, model, i):
    """/tokenize with token strings, /detokenize, and a chat prompt's /tokenize."""
    status, tokens = request_json("POST", server.url + "/tokenize", {
        "model": model, "prompt": PROMPTS[i], "return_token_strs": True})
    assert status == 200, tokens
    status, text = request_json("POST", server.url + "/detokenize",
                                {"model": model, "tokens": tokens["tokens"]})
    assert status == 200, text
    status, chat = request_json("POST", server.url + "/tokenize", {
        "model": model, "messages": [{"role": "user", "content": PROMPTS[i]}]})
    assert status == 200, chat
    return tokens["tokens"], tokens["token_strs"], text["prompt"], chat["tokens"]


KINDS = [chat_stream, completion_logprobs, token_id_echo, streamed_stop, seeded_n,
         tokenize_round_trip]


@pytest.mark.slow
def test_mixed_traffic_at_once_answers_as_one_by_one(smollm2_dir, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(smollm2_dir, log).wait_ready(timeout_s=300)
    try:
        model = server.client().models.list().data[0].id
        jobs = [(kind, i) for i in range(len(PROMPTS)) for kind in KINDS]
        alone = [kind(server, model, i) for kind, i in jobs]
        with ThreadPoolExecutor(max_workers=32) as pool:
            for _ in range(2):
                futures = [pool.submit(kind, server, model, i) for kind, i in jobs * 2]
                together = [f.result() for f in futures]
                assert together == alone * 2
    finally:
        server.stop()
    text = log.read_text()
    for error in ("Already borrowed", "Traceback", " 500 "):
        assert error not in text, server.log_tail()
