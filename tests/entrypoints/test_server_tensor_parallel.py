"""`pagedllm serve --tensor-parallel-size 2` serves the official `openai` client, streaming
included, with the tokens of one rank (the in-process engine); stopping the server leaves no
process of its tree behind."""

from __future__ import annotations

import time

import psutil
import pytest
from test_server import ServerProcess

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.slow  # a server and two ranks: ~30-60 s to start on 2 busy cores

SETTINGS = ("--dtype", "float32", "--num-kv-blocks", "64", "--block-size", "8")


def test_tp2_server_streams_the_tp1_tokens(tiny_llama_factory, tmp_path):
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2)
    # Token ids (the tiny model's vocabulary is SmolLM2's first 512 tokens).
    prompts = [[5, 17, 300, 42], [120, 121, 122], [7] * 9]
    with LLM(str(model_dir), dtype="float32", num_kv_blocks=64, block_size=8) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)
    want = [o.outputs[0].text for o in outputs]
    server = ServerProcess(model_dir, tmp_path / "server.log", "--tensor-parallel-size", "2",
                           *SETTINGS)
    try:
        server.wait_ready(timeout_s=300)
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        assert len(tree) >= 2  # the two ranks (and multiprocessing's resource tracker)
        client = server.client()
        model = client.models.list().data[0].id
        for prompt, text in zip(prompts, want):
            done = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                             temperature=0, extra_body={"ignore_eos": True})
            assert done.choices[0].text == text
            stream = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            chunks = [c.choices[0].text for c in stream if c.choices]
            assert len(chunks) > 1 and "".join(chunks) == text
    finally:
        server.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.2)
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
