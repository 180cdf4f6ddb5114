"""The server's web page in a real headless browser (Debian's chromium and chromedriver, driven
by selenium; nothing is downloaded at run time), and GET /kv_cache/blocks against the engine's
own stats.

Two servers on a tiny random Llama (SmolLM2's tokenizer, 4096 positions so that an answer can be
long): one open, one with an API key. The open one's pool (256 blocks) is smaller than 8 long
requests with n=2 need, so they also preempt and swap. Screenshots go to $PAGEDLLM_TEST_ARTIFACTS
(default tests/artifacts/).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from test_server import ServerProcess, request_json
from test_server_engine import FakeLLMEngine, collect

from pagedllm.core.kv_cache_snapshot import KVCacheSnapshot, PoolSnapshot, RequestBlocks
from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.engine.llm_engine import EngineStats
from pagedllm.entrypoints.openai.web_page import KVMapEncoder, kv_cache_json

TINY_NAME = "tiny"
API_KEY = "sk-page-key"
SERVER_ARGS = ("--num-kv-blocks", "256", "--swap-space", "0.001", "--preemption-mode", "swap",
               "--served-model-name", TINY_NAME)
ARTIFACTS = Path(os.environ.get("PAGEDLLM_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "artifacts")


# ---- helpers ----------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def blocks(server: ServerProcess, **params: str) -> dict:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, body = request_json("GET", f"{server.url}/kv_cache/blocks?{query}")
    assert status == 200, body
    return body


def long_completion(server: ServerProcess, index: int, max_tokens: int) -> dict:
    prompt = f"Request {index}: " + "the paged cache holds every token of this prompt " * 3
    status, body = request_json("POST", server.url + "/v1/completions", {
        "model": TINY_NAME, "prompt": prompt, "max_tokens": max_tokens, "n": 2,
        "temperature": 1.0, "seed": index, "ignore_eos": True}, timeout=120)
    assert status == 200, body
    return body


def check_snapshot(snap: dict) -> None:
    """The blocks agree with the pool totals and with get_stats() of the same step."""
    stats, device, host = snap["stats"], snap["device"], snap["host"]
    states = device["state"]
    n = device["num_blocks"]
    assert n == stats["num_blocks"] == len(states)
    # The compact layout lists the blocks in use only; every other block is free (count 0).
    ref_counts = [device["ref_count"].get(str(b), 0) for b in range(n)]
    cached = [s in "cOS" for s in states]  # upper case: in use and holding a hash
    for rc, state in zip(ref_counts, states):
        assert state in ("fc" if rc == 0 else "oO" if rc == 1 else "sS")
    num_free = ref_counts.count(0)
    assert num_free == device["num_free_blocks"] == stats["num_free_blocks"]
    assert n - num_free == device["num_used_blocks"] == len(device["ref_count"])
    assert sum(cached) == device["num_cached_blocks"] == stats["num_cached_blocks"]
    assert sum(ref_counts) == device["num_logical_blocks"] == stats["num_logical_blocks"]
    assert device["num_shared_blocks"] == states.count("s") + states.count("S")
    assert device["num_cached_free_blocks"] == states.count("c")
    # Every block in use names its requests, and only live requests.
    live = {r["id"] for r in snap["requests"]}
    assert set(device["owners"]) == set(device["ref_count"])
    assert all(ids and set(ids) <= live for ids in device["owners"].values())
    for status in ("running", "waiting", "swapped"):
        assert sum(r["status"] == status for r in snap["requests"]) == stats[f"num_{status}"]
    assert host["num_blocks"] == stats["num_cpu_blocks"]
    assert host["num_free_blocks"] == stats["num_free_cpu_blocks"]
    assert host["num_blocks"] - len(host["ref_count"]) == host["state"].count("f")
    assert set(host["owners"]) == set(host["ref_count"])
    assert sum(r["num_host_blocks"] for r in snap["requests"]) == host["num_used_blocks"]


def counts(driver) -> dict[str, int]:
    return {k: int(driver.find_element(By.ID, f"kv-count-{k}").text)
            for k in ("free", "cached", "owned", "shared")}


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tiny_llama_factory, tmp_path_factory):
    model = tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152,
                               max_position_embeddings=4096)
    logs = tmp_path_factory.mktemp("web-page")
    procs = {"open": ServerProcess(model, logs / "open.log", *SERVER_ARGS),
             "keyed": ServerProcess(model, logs / "keyed.log", *SERVER_ARGS,
                                    "--api-key", API_KEY)}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["open"].wait_ready(timeout_s=300)  # a first use may build the C++ ops


@pytest.fixture(scope="module")
def keyed_server(servers) -> ServerProcess:
    return servers["keyed"].wait_ready(timeout_s=300)


@pytest.fixture(scope="module")
def driver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: `make setup` "
                    "installs them (apt-get install chromium chromium-driver, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--proxy-server=direct://", "--proxy-bypass-list=*"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield browser
    finally:
        browser.quit()


def open_page(driver, server: ServerProcess, tab: str = "chat") -> None:
    driver.get("about:blank")  # a fresh page: the same URL with another #tab would not reload
    driver.get(f"{server.url}/#{tab}")
    wait_for(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-auth")
             != "checking", 10, "the page's server check")


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


# ---- the JSON of a snapshot --------------------------------------------------------------------

def test_kv_cache_json_names_every_block():
    # Device pool of 6 blocks: request "a" has 2 samples sharing its prompt block 0 (hashed) and
    # one block each (1, 2); request "b" reuses block 0 through the prefix cache and owns 3;
    # block 4 is free but still holds a hash; block 5 is free. Host pool of 2: "c" swapped to 1.
    snapshot = KVCacheSnapshot(
        block_size=4, num_steps=9,
        device=PoolSnapshot([3, 1, 1, 1, 0, 0], [11, None, None, None, 44, None]),
        host=PoolSnapshot([0, 1], [None, None]),
        requests=[RequestBlocks("a", "running", 0, [[0, 1], [0, 2]], []),
                  RequestBlocks("b", "running", 0, [[0, 3]], []),
                  RequestBlocks("c", "swapped", 1, [], [[1]])])
    stats = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    out = kv_cache_json(snapshot, stats)
    device = out["device"]
    assert device["state"] == "Sooocf"
    assert device["ref_count"] == {"0": 3, "1": 1, "2": 1, "3": 1}
    assert device["owners"] == {"0": ["a", "b"], "1": ["a"], "2": ["a"], "3": ["b"]}
    assert {k: v for k, v in device.items() if k.startswith("num_")} == {
        "num_blocks": 6, "num_free_blocks": 2, "num_used_blocks": 4, "num_shared_blocks": 1,
        "num_cached_blocks": 2, "num_cached_free_blocks": 1, "num_logical_blocks": 6}
    assert out["host"]["state"] == "fo" and out["host"]["owners"] == {"1": ["c"]}
    assert [(r["id"], r["status"], r["num_seqs"], r["num_device_blocks"], r["num_host_blocks"])
            for r in out["requests"]] == [("a", "running", 2, 3, 0), ("b", "running", 1, 2, 0),
                                          ("c", "swapped", 1, 0, 1)]
    assert out["num_steps"] == 9 and out["block_size"] == 4 and out["stats"] == vars(stats)
    listed = kv_cache_json(snapshot, stats, "blocks")["device"]["blocks"]
    assert listed[0] == {"id": 0, "ref_count": 3, "state": "shared", "cached": True,
                         "owners": ["a", "b"]}
    assert listed[4] == {"id": 4, "ref_count": 0, "state": "cached", "cached": True,
                         "owners": []}
    assert [b["state"] for b in listed] == ["shared", "owned", "owned", "owned", "cached",
                                            "free"]
    with pytest.raises(ValueError, match="layout must be one of compact, blocks"):
        kv_cache_json(snapshot, stats, "rows")


def test_the_encoder_reuses_the_last_poll_and_matches_a_fresh_encoding():
    # A 2,000-block pool (4 stretches of KVMapEncoder's 512) changed a little between polls,
    # as a busy engine changes it: every body equals a fresh encoding, and an unchanged
    # snapshot reuses the last body with a new time.
    rng = np.random.default_rng(0)
    num_blocks = 2000
    ref_counts = [0] * num_blocks
    hashes: list[int | None] = [None] * num_blocks
    encoder = KVMapEncoder()
    stats = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    for step in range(40):
        for block in rng.integers(0, num_blocks, size=3).tolist():
            ref_counts[block] = int(rng.choice([0, 1, 2, 3, 300]))  # 300: past a byte
            hashes[block] = None if rng.random() < 0.5 else int(rng.integers(0, 2**62))
        if step % 10 == 9:
            hashes = [None] * num_blocks  # e.g. the prefix cache reset
        owner = [b for b in range(num_blocks) if ref_counts[b]]
        snapshot = KVCacheSnapshot(
            block_size=16, num_steps=step, device=PoolSnapshot(list(ref_counts), list(hashes)),
            host=None, requests=[RequestBlocks("r", "running", 0, [owner], [])])
        fresh = kv_cache_json(snapshot, stats)
        body = json.loads(encoder.body(snapshot, stats))
        assert body["time"] >= fresh["time"] - 1
        assert {**body, "time": 0} == {**fresh, "time": 0}
        again = json.loads(encoder.body(snapshot, stats))
        assert again["time"] >= body["time"] and {**again, "time": 0} == {**body, "time": 0}
    assert json.loads(encoder.body(snapshot, stats, "blocks"))["device"]["blocks"] == (
        kv_cache_json(snapshot, stats, "blocks")["device"]["blocks"])


# ---- the engine thread's snapshot (a scripted fake engine: milliseconds) ----------------------

class SnapshotFake(FakeLLMEngine):
    """Snapshots name the step they follow; a step is marked while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.in_step = False

    def step(self):
        self.in_step = True
        try:
            return super().step()
        finally:
            self.in_step = False

    def get_kv_cache_snapshot(self):
        self._touch()
        return (self.num_steps, self.in_step), self.get_stats()


def test_snapshot_is_taken_by_the_engine_thread_between_steps():
    fake = SnapshotFake()
    fake.step_delay_s = 0.05

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = asyncio.ensure_future(collect(engine, "a", 6))
        await asyncio.sleep(0.07)  # inside a step: the snapshot waits for its end
        first, second = await asyncio.gather(engine.get_kv_cache_snapshot(),
                                             engine.get_kv_cache_snapshot())
        (num_steps, in_step), stats = first
        assert first is second  # concurrent readers share one
        assert num_steps >= 1 and not in_step and stats.num_running == 1
        await stream
        (num_steps, _), stats = await engine.get_kv_cache_snapshot()  # idle: woken for it
        assert num_steps == 6 and stats.num_running == 0
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.get_kv_cache_snapshot(), 5)

    asyncio.run(main())
    assert fake.calling_threads == {"pagedllm-engine"}


def test_snapshot_of_a_dying_engine_raises_instead_of_hanging():
    fake = SnapshotFake()
    fake.step_delay_s = 0.1
    fake.fail_on_step = True

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = asyncio.ensure_future(collect(engine, "a", 5))
        await asyncio.sleep(0.03)  # asked for during the step that fails
        with pytest.raises(EngineDeadError, match="exploded"):
            await asyncio.wait_for(engine.get_kv_cache_snapshot(), 5)
        with pytest.raises(EngineDeadError):
            await stream
        with pytest.raises(EngineDeadError):
            await engine.get_kv_cache_snapshot()
        await engine.shutdown()

    asyncio.run(main())


# ---- the map's polls, answered ahead of FastAPI ------------------------------------------------

class _MapEngine:
    """Just what build_app and the two map routes read; `dead` makes its snapshot fail."""

    max_model_len = 64
    is_running = True

    def __init__(self, snapshot: KVCacheSnapshot, dead: bool = False) -> None:
        self.snapshot, self.dead = snapshot, dead

    async def get_kv_cache_snapshot(self):
        if self.dead:
            raise EngineDeadError("the engine is not running: it exploded")
        return self.snapshot, EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})


async def _asgi_get(app, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bytes]:
    """One GET through an ASGI app, without a server: status, headers, body."""
    route, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": route, "raw_path": route.encode(), "root_path": "",
             "query_string": query.encode(), "headers": [(b"host", b"test"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


def test_map_polls_skip_fastapi_and_answer_as_its_routes_do():
    # The same requests through the app as served (KVMapPolls in front) and through the same
    # app without it (FastAPI's routes): the same status, headers and JSON, "time" aside.
    from pagedllm.entrypoints.openai.api_server import KVMapPolls, build_app

    snapshot = KVCacheSnapshot(
        block_size=4, num_steps=3, device=PoolSnapshot([2, 1, 0, 0], [7, None, 9, None]),
        host=None, requests=[RequestBlocks("a", "running", 0, [[0, 1], [0]], [])])
    paths = ["/kv_cache/blocks", "/kv_cache/history", "/kv_cache/blocks?layout=blocks",
             "/kv_cache/blocks?layout=rows", "/kv_cache/blocks?layout=blocks&layout=compact",
             "/kv_cache/blocks?layout=", "/kv_cache/blocks?other=1"]
    keys = [None, API_KEY]
    given = [[], [(b"authorization", f"Bearer {API_KEY}".encode())],
             [(b"authorization", b"Bearer sk-wrong")]]

    async def main():
        statuses = set()
        for dead in (False, True):
            for key in keys:
                served = build_app(_MapEngine(snapshot, dead), None, ["m"], "/nowhere",
                                   api_key=key)
                plain = build_app(_MapEngine(snapshot, dead), None, ["m"], "/nowhere",
                                  api_key=key)
                plain.user_middleware = [m for m in plain.user_middleware
                                         if m.cls is not KVMapPolls]
                assert len(plain.user_middleware) == len(served.user_middleware) - 1
                for headers in given:
                    for path in paths:
                        slow = await _asgi_get(plain, path, headers)
                        fast = await _asgi_get(served, path, headers)
                        fast_json, slow_json = json.loads(fast[2]), json.loads(slow[2])
                        if "time" in slow_json:
                            assert fast_json["time"] >= slow_json["time"]
                            fast_json["time"] = slow_json["time"] = 0
                            for response in (fast, slow):  # the time's digits vary
                                del response[1][b"content-length"]
                        assert (fast[0], fast[1], fast_json) == (slow[0], slow[1], slow_json), (
                            path, key, headers)
                        statuses.add(fast[0])
        assert statuses == {200, 400, 401, 503}

    asyncio.run(main())


def test_the_servers_connections_send_without_waiting_for_acks():
    # A response goes out in two writes (headers, body): with Nagle's algorithm on, the second
    # waits for the client's delayed ACK, 40 ms per keep-alive poll. asyncio turns it off on
    # the connections of a socket made with IPPROTO_TCP, which bind_socket makes.
    import socket

    from pagedllm.entrypoints.openai.api_server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    port = sock.getsockname()[1]

    async def main() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                conn = transport.get_extra_info("socket")
                accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0


# ---- HTTP -------------------------------------------------------------------------------------

def test_page_files_and_key(server, keyed_server):
    for url in (server.url, keyed_server.url):  # the page itself needs no key
        status, html = request_json("GET", url + "/")
        assert status == 200 and "static/app.js" in html
        for name in ("app.js", "app.css"):
            assert request_json("GET", f"{url}/static/{name}")[0] == 200
    assert request_json("GET", server.url + "/static/missing.js")[0] == 404
    assert request_json("GET", server.url + "/static/..%2Fweb_page.py")[0] == 404
    # Its API calls do, as /v1's.
    for path in ("/kv_cache/blocks", "/kv_cache/history"):
        status, body = request_json("GET", keyed_server.url + path)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _ = request_json("GET", keyed_server.url + path,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200
    status, body = request_json("GET", server.url + "/kv_cache/blocks?layout=rows")
    assert status == 400 and body["error"]["param"] == "layout"


def test_kv_cache_blocks_match_get_stats_at_every_poll(server):
    """8 concurrent n=2 requests on a pool too small for them (preemption, swap): every poll is
    one consistent step boundary."""
    seen = {"shared": 0, "host": 0, "polls": 0}
    last_step = -1
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_completion, server, i, 120) for i in range(8)]
        while not all(f.done() for f in futures):
            snap = blocks(server)
            check_snapshot(snap)
            assert snap["num_steps"] >= last_step
            last_step = snap["num_steps"]
            seen["polls"] += 1
            seen["shared"] += snap["device"]["num_shared_blocks"] > 0
            seen["host"] += snap["host"]["num_used_blocks"] > 0
        for future in futures:
            assert len(future.result()["choices"]) == 2
    assert seen["polls"] >= 5 and seen["shared"] > 0, seen
    idle = wait_for(lambda: (s := blocks(server))["device"]["num_used_blocks"] == 0 and s, 10,
                    "every block back")
    check_snapshot(idle)
    assert not idle["requests"] and idle["device"]["num_cached_free_blocks"] > 0
    # The per-block layout says the same, block by block.
    listed = blocks(server, layout="blocks")
    names = {"f": "free", "c": "cached", "o": "owned", "s": "shared"}
    listed_blocks = listed["device"]["blocks"]
    assert [b["id"] for b in listed_blocks] == list(range(len(idle["device"]["state"])))
    assert [names[s.lower()] for s in idle["device"]["state"]] == [b["state"] for b
                                                                   in listed_blocks]
    assert [s in "cOS" for s in idle["device"]["state"]] == [b["cached"] for b in listed_blocks]
    assert all(b["ref_count"] == 0 and not b["owners"] for b in listed_blocks)


# ---- the browser ------------------------------------------------------------------------------

def test_chat_streams_a_reply(server, driver):
    open_page(driver, server)
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "ok"
    set_field(driver, "chat-max_tokens", "1500")
    set_field(driver, "chat-seed", "1")
    set_field(driver, "chat-input", "Tell me a long story about paged memory.")
    driver.find_element(By.ID, "chat-send").click()
    bubble = lambda: driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1]
    stats = driver.find_element(By.ID, "chat-stats")
    first = wait_for(lambda: bubble().text, 20, "the first tokens")
    wait_for(lambda: len(bubble().text) > len(first) + 20, 20, "more tokens")
    assert stats.get_attribute("data-state") == "streaming"  # still going: it streams
    driver.save_screenshot(str(ARTIFACTS / "chat_streaming.png"))
    wait_for(lambda: stats.get_attribute("data-state") == "done", 60, "the answer's end")
    assert "1500 tokens" in stats.text and "tokens/s" in stats.text and "length" in stats.text
    user = driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.user")
    assert [u.text for u in user] == ["Tell me a long story about paged memory."]


def test_stop_ends_a_long_answer_and_frees_its_blocks(server, driver):
    open_page(driver, server)
    set_field(driver, "chat-max_tokens", "4000")
    set_field(driver, "chat-seed", "2")
    set_field(driver, "chat-input", "Write the longest answer you can.")
    driver.find_element(By.ID, "chat-send").click()
    running = wait_for(
        lambda: [r for r in blocks(server)["requests"]
                 if r["id"].startswith("chatcmpl-") and r["num_device_blocks"] >= 3], 20,
        "the chat request holding blocks")
    request_id = running[0]["id"]
    driver.find_element(By.ID, "chat-stop").click()
    stats = driver.find_element(By.ID, "chat-stats")
    wait_for(lambda: stats.get_attribute("data-state") == "stopped", 10, "the page to stop")
    snap = wait_for(lambda: (s := blocks(server))["device"]["num_used_blocks"] == 0 and s, 10,
                    "the aborted request's blocks to come back")
    assert request_id not in {r["id"] for r in snap["requests"]}
    assert snap["stats"]["num_running"] == 0
    text = driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1].text
    time.sleep(0.5)
    assert driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1].text == text
    assert "stopped" in stats.text and not driver.find_element(By.ID, "chat-send").get_attribute(
        "disabled")


def test_map_shows_owned_and_shared_then_free_and_cached(server, driver):
    open_page(driver, server, "kv")
    wait_for(lambda: "step" in driver.find_element(By.ID, "kv-updated").text, 10, "the map")
    results: list[dict] = []
    threads = [threading.Thread(target=lambda i=i: results.append(long_completion(server, i, 400)))
               for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: (c := counts(driver))["owned"] > 0 and c["shared"] > 0, 30,
                 "owned and shared cells on the map")
        driver.save_screenshot(str(ARTIFACTS / "kv_map_shared_load.png"))
        # The page draws what the server said: a shared block held by one request's 2 samples.
        snap = driver.execute_script("return window.pagedllm.snapshot")
        shared = [b for b, s in enumerate(snap["device"]["state"]) if s in "sS"]
        assert shared and all(snap["device"]["ref_count"][str(b)] >= 2 for b in shared)
        assert all(snap["device"]["owners"][str(b)] for b in shared)
        rows = driver.find_elements(By.CSS_SELECTOR, "#kv-requests tbody tr")
        assert rows and int(driver.find_element(By.ID, "kv-running").text) > 0
        # Hovering a shared cell names its request, reference count and hash state.
        canvas = driver.find_element(By.ID, "kv-device")
        x, y = driver.execute_script(
            "const g = arguments[0]._grid, b = arguments[1];"
            "return [(b % g.cols + 0.5) * g.cell - arguments[0].clientWidth / 2,"
            "        (Math.floor(b / g.cols) + 0.5) * g.cell - arguments[0].clientHeight / 2];",
            canvas, shared[0])
        ActionChains(driver).move_to_element_with_offset(canvas, int(x), int(y)).perform()
        tip = driver.find_element(By.ID, "kv-tooltip").text
        assert f"block {shared[0]}: shared" in tip and "reference count" in tip, tip
        assert "request cmpl-" in tip and "prefix cache:" in tip, tip
    finally:
        for thread in threads:
            thread.join(timeout=120)
    assert len(results) == 8
    wait_for(lambda: (c := counts(driver))["owned"] == 0 and c["shared"] == 0
             and c["cached"] > 0 and c["free"] > 0, 10, "free and cached cells after the load")
    driver.save_screenshot(str(ARTIFACTS / "kv_map_after.png"))
    assert driver.find_element(By.ID, "kv-running").text == "0"


def test_completions_tab_streams_a_raw_prompt(server, driver):
    open_page(driver, server, "completions")
    set_field(driver, "comp-prompt", "Once upon a time")
    set_field(driver, "comp-max_tokens", "40")
    set_field(driver, "comp-seed", "3")
    driver.find_element(By.ID, "comp-run").click()
    stats = driver.find_element(By.ID, "comp-stats")
    wait_for(lambda: stats.get_attribute("data-state") == "done", 20, "the completion")
    assert "40 tokens" in stats.text and "length" in stats.text
    assert driver.find_element(By.ID, "comp-prompt-echo").text == "Once upon a time"
    text = driver.execute_script("return document.getElementById('comp-text').textContent")
    status, body = request_json("POST", server.url + "/v1/completions", {
        "model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": 40, "seed": 3,
        "temperature": 0.7, "top_p": 1})
    assert status == 200 and body["choices"][0]["text"] == text  # seeded: the same tokens


def test_page_asks_for_the_api_key(keyed_server, driver):
    open_page(driver, keyed_server)
    body = driver.find_element(By.TAG_NAME, "body")
    banner = driver.find_element(By.ID, "key-banner")
    assert body.get_attribute("data-auth") == "needed" and banner.is_displayed()
    assert "requires an API key" in driver.find_element(By.ID, "key-message").text
    driver.save_screenshot(str(ARTIFACTS / "api_key_needed.png"))
    set_field(driver, "key-input", "sk-wrong")
    driver.find_element(By.ID, "key-submit").click()
    wait_for(lambda: body.get_attribute("data-auth") == "refused", 10, "the refusal")
    assert "refused" in driver.find_element(By.ID, "key-message").text
    set_field(driver, "key-input", API_KEY)
    driver.find_element(By.ID, "key-submit").click()
    wait_for(lambda: body.get_attribute("data-auth") == "ok", 10, "the key accepted")
    assert not banner.is_displayed()
    set_field(driver, "chat-max_tokens", "8")
    set_field(driver, "chat-input", "Hi")
    driver.find_element(By.ID, "chat-send").click()
    stats = driver.find_element(By.ID, "chat-stats")
    wait_for(lambda: stats.get_attribute("data-state") == "done", 20, "the keyed answer")
    assert "8 tokens" in stats.text
    driver.find_element(By.ID, "tab-kv").click()
    wait_for(lambda: "step" in driver.find_element(By.ID, "kv-updated").text, 10,
             "the keyed map")
