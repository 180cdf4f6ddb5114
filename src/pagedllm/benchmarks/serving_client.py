"""The serving benchmark's load generator: arrival times, and streaming completions timed as
they arrive (time to first token, gaps between tokens, end to end)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pagedllm.benchmarks.workloads import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    error: str | None = None
    ttft: float = 0.0
    latency: float = 0.0
    num_output_tokens: int = 0
    # Gaps between consecutive content chunks after the first.
    itl: list[float] = field(default_factory=list)


def arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request. Gamma gaps with mean 1/rate; shape 1 is Poisson, < 1 is
    burstier. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), num).tolist()


async def send_one(client, url: str, model: str, request: BenchRequest,
                   ignore_eos: bool) -> RequestResult:
    import httpx2

    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(prompt_len=len(request.prompt_token_ids))
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
                if chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
    except httpx2.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.latency = time.perf_counter() - start
    result.num_output_tokens = result.num_output_tokens or num_chunks
    result.ok = num_chunks > 0
    return result


async def run_rate(base_url: str, model: str, requests: list[BenchRequest], rate: float,
                   burstiness: float, seed: int, ignore_eos: bool, progress: tqdm | None = None
                   ) -> tuple[list[RequestResult], float]:
    """Sends `requests` at `rate` (gamma gaps of shape `burstiness`) and waits for them all.

    Returns each request's result and the seconds from the first send to the last answer;
    `progress` advances by one as each request ends.
    """
    import httpx2

    url = base_url.rstrip("/") + "/v1/completions"
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    limits = httpx2.Limits(max_connections=len(requests) + 1,
                           max_keepalive_connections=len(requests) + 1)
    async with httpx2.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        tasks = []
        for gap, request in zip(gaps, requests):
            await asyncio.sleep(gap)
            task = asyncio.create_task(send_one(client, url, model, request, ignore_eos))
            if progress is not None:
                task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start
