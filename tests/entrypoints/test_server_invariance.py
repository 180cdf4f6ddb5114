"""Issue 29's reproductions against a live server: SmolLM2 in bf16 on a 160-block cache,
as the issue ran it. A prefix-cache hit and other traffic each changed a greedy answer before
the kernels were made batch invariant; now each request gives one answer.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server import ServerProcess

POEM = "Écris un poème sur la mer 🌊 et le vent:"
PRESS = "The history of the printing press began"
WORDS = ["sea", "wind", "history", "paper", "ink", "press", "type", "metal", "book", "city",
         "river", "light", "music", "science", "war", "peace", "king", "letter", "school"]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("invariance") / "server.log"
    server = ServerProcess(smollm2_dir, log, "--dtype", "bfloat16", "--num-kv-blocks", "160",
                           "--block-size", "16").wait_ready(timeout_s=300)
    yield server
    server.stop()


def answer(client, prompt: str, **kwargs) -> tuple:
    """The completion's texts, tokens' logprobs and finish reasons (everything that must not
    change)."""
    body = {"temperature": 0, "max_tokens": 64, "logprobs": 1}
    body.update(kwargs)
    body["extra_body"] = {"ignore_eos": True, **kwargs.get("extra_body", {})}
    out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, **body)
    return tuple((c.text, tuple(c.logprobs.token_logprobs) if c.logprobs else None,
                  c.finish_reason) for c in out.choices)


def test_a_prefix_cache_hit_keeps_the_answer(server):
    client = server.client()
    answers = [answer(client, POEM) for _ in range(3)]
    assert answers[1] == answers[0] and answers[2] == answers[0]
    assert server.metrics()["pagedllm:prefix_cache_hits_total"] > 0


def test_other_traffic_keeps_greedy_seeded_and_beam_answers(server):
    client = server.client()
    fixed = [
        (PRESS, {}),  # greedy with logprobs
        ("The sea at night", {"temperature": 0.8, "seed": 7, "n": 3, "max_tokens": 32}),
        ("A letter to the king", {"n": 3, "max_tokens": 16, "logprobs": None,
                                  "extra_body": {"use_beam_search": True}}),
    ]
    alone = [answer(client, prompt, **kwargs) for prompt, kwargs in fixed]
    rng = random.Random(29)
    load = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))),
             {"temperature": 0.8, "seed": i, "max_tokens": rng.randint(8, 64)})
            for i in range(16)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        crowd = [pool.submit(answer, client, prompt, **kwargs) for prompt, kwargs in load[:8]]
        under_load = [pool.submit(answer, client, prompt, **kwargs) for prompt, kwargs in fixed]
        crowd += [pool.submit(answer, client, prompt, **kwargs) for prompt, kwargs in load[8:]]
        assert [f.result() for f in under_load] == alone
        assert all(f.result() for f in crowd)
