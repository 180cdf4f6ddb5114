"""A grammar slow to compile does not stall other requests' streams (issue 26): a stream's token
gaps are measured while another request's grammar compiles on a live server."""

from __future__ import annotations

import itertools
import json
import random
import socket
import statistics
import string
import threading
import time

import pytest
from test_server import ServerProcess, open_stream

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_factory, tmp_path_factory):
    model = tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152,
                               max_position_embeddings=8192)
    proc = ServerProcess(model, tmp_path_factory.mktemp("stall") / "server.log",
                         "--num-kv-blocks", "1024", "--served-model-name", NAME)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def slow_choices(num: int = 100_000) -> list[str]:
    """Distinct 10-letter words: as a `choice` constraint, llguidance takes 1-2 s to compile
    them on two shared cores; checking them on the request's thread is cheap."""
    rng = random.Random(0)
    return sorted({"".join(rng.choices(string.ascii_lowercase, k=10)) for _ in range(num)})


def test_a_slow_grammar_compile_does_not_stall_other_streams(server):
    # NOTE: the server's first constrained request builds llguidance's token tables, which
    # holds the GIL for about 0.5 s, once: that is done first, so the compile measured below
    # is the grammar's own.
    warm = server.client().completions.create(
        model=NAME, prompt="Pick:", max_tokens=4, temperature=0,
        extra_body={"structured_outputs": {"regex": "[ab]{4}"}})
    assert len(warm.choices[0].text) == 4
    conn, response = open_stream(server, {"model": NAME, "prompt": "Once upon a time",
                                          "max_tokens": 6000, "ignore_eos": True,
                                          "temperature": 0})
    arrivals: list[float] = []  # when each of the running stream's chunks arrived

    def read() -> None:
        while True:
            try:
                line = response.readline()
            except OSError:  # the connection's end, below
                return
            if not line or line.strip() == b"data: [DONE]":
                return
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while len(arrivals) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(arrivals) >= 20, "the running stream did not start"
        choices = slow_choices()
        start = time.monotonic()
        answer = server.client().completions.create(
            model=NAME, prompt="Pick a word:", max_tokens=16, temperature=0,
            extra_body={"structured_outputs": {"choice": choices}})
        end = time.monotonic()
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end; the server aborts
        reader.join(timeout=30)
        conn.close()
    assert answer.choices[0].text in choices
    compile_s = end - start
    # The constrained request waited for its grammar: slow to compile beside the stream's pace
    # (0.7 s on a quiet machine, several seconds on a loaded one; a token every ~10-50 ms).
    before = [t for t in arrivals if t < start]
    pace = statistics.median(b - a for a, b in itertools.pairwise(before))
    assert compile_s > 10 * pace, (
        f"the grammar compiled in {compile_s:.2f} s, a token every {pace:.3f} s: not a slow one")
    during = [t for t in arrivals if start <= t <= end]
    edges = [start, *during, end]
    gaps = [b - a for a, b in itertools.pairwise(edges)]
    max_gap = max(gaps)
    print(f"compile {compile_s:.2f} s, {len(during)} tokens streamed meanwhile, longest gap "
          f"{max_gap:.3f} s")
    # The running stream kept its pace while the grammar compiled: its longest silence (the
    # window's edges included) is far below the compile time.
    assert len(during) >= 10, f"{len(during)} tokens streamed in {compile_s:.2f} s of compile"
    assert max_gap < compile_s / 4, (
        f"the stream stalled {max_gap:.2f} s during a {compile_s:.2f} s compile: "
        + json.dumps([round(gap, 3) for gap in gaps if gap > 0.1]))
