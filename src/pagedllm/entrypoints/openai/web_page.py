"""The server's web page (`GET /`: chat, completions, a live map of the paged KV cache) and the
JSON it draws the map from (`GET /kv_cache/blocks`, `GET /kv_cache/history`).

The page is three static files inside the package (static/: plain HTML, JS and CSS; no build
step, nothing loaded from elsewhere). The map's JSON comes from a KVCacheSnapshot that the engine
thread copies between two steps; this module turns it into JSON on the event loop, with numpy
over the per-block lists, so that a poll costs the engine about a millisecond of CPU.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_engine import EngineDeadError
from pagedllm.entrypoints.openai.protocol import ErrorResponse, make_error

if TYPE_CHECKING:
    from pagedllm.core.kv_cache_snapshot import KVCacheSnapshot, PoolSnapshot
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.engine.llm_engine import EngineStats
    from pagedllm.outputs import RequestOutput

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
# The layouts of GET /kv_cache/blocks.
LAYOUTS = ("compact", "blocks")
# The "state" string's letter per block, by code (see _pool_json): free, cached (free, holding
# a hash), owned (one holder), shared (several); upper case: in use and holding a hash.
_STATE_LETTERS = np.frombuffer(b"fcoOsS", dtype=np.uint8)
_STATE_NAMES = {"f": "free", "c": "cached", "o": "owned", "s": "shared"}


def static_file(name: str) -> Response:
    """A file of static/ (only the page's own files), or a 404."""
    path = STATIC_DIR / name
    if name not in {p.name for p in STATIC_DIR.iterdir()} or path.suffix not in _STATIC_TYPES:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix],
                    headers={"Cache-Control": "no-cache"})


async def kv_cache_blocks(engine: AsyncLLMEngine, layout: str = "compact"
                          ) -> Response | ErrorResponse:
    """GET /kv_cache/blocks: a snapshot taken between two engine steps, as JSON."""
    if layout not in LAYOUTS:
        return make_error(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", 400,
                          param="layout")
    try:
        snapshot, stats = await engine.get_kv_cache_snapshot()
    except EngineDeadError as exc:
        return make_error(str(exc), 503)
    return JSONResponse(kv_cache_json(snapshot, stats, layout))


def kv_cache_json(snapshot: KVCacheSnapshot, stats: EngineStats, layout: str = "compact"
                  ) -> dict[str, Any]:
    """The JSON of GET /kv_cache/blocks (the README documents it).

    `layout` "compact" (the page's): every block's state as one letter of a string indexed by
    block id, and the reference counts and owners of the blocks in use only (a free block has
    none), so that its cost grows with the blocks in use; "blocks": a list of one object per
    block, easier to read and about 20x dearer on a large pool.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    device_owners: dict[int, list[str]] = {}
    host_owners: dict[int, list[str]] = {}
    requests = []
    for req in snapshot.requests:
        device_blocks = _add_owner(device_owners, req.device_tables, req.request_id)
        host_blocks = _add_owner(host_owners, req.host_tables, req.request_id)
        requests.append({
            "id": req.request_id,
            "status": req.status,
            "num_seqs": max(len(req.device_tables), len(req.host_tables)),
            "num_preemptions": req.num_preemptions,
            "num_device_blocks": device_blocks,
            "num_host_blocks": host_blocks,
        })
    host = snapshot.host
    return {
        "time": time.time(),
        "num_steps": snapshot.num_steps,
        "block_size": snapshot.block_size,
        "layout": layout,
        "device": _pool_json(snapshot.device, device_owners, layout),
        "host": _pool_json(host, host_owners, layout) if host is not None else None,
        "requests": requests,
        "stats": dict(vars(stats)),
    }


def _add_owner(owners: dict[int, list[str]], tables: list[list[int]], request_id: str) -> int:
    """Records the request on each distinct block of its tables; returns how many there are."""
    blocks = set(itertools.chain.from_iterable(tables))
    for block_id in blocks:
        owners.setdefault(block_id, []).append(request_id)
    return len(blocks)


def _pool_json(pool: PoolSnapshot, owners: dict[int, list[str]], layout: str) -> dict[str, Any]:
    num_blocks = len(pool.ref_counts)
    ref_counts = np.array(pool.ref_counts, dtype=np.int64)
    cached = np.fromiter(map(operator.is_not, pool.block_hashes, itertools.repeat(None)),
                         dtype=bool, count=num_blocks)
    # Codes: 2 x (0 free, 1 one holder, 2 several) + 1 when holding a hash, e.g. a shared
    # block with a hash is 5, "S".
    codes = np.minimum(ref_counts, 2) * 2 + cached
    counts = np.bincount(codes, minlength=6)
    out: dict[str, Any] = {
        "num_blocks": num_blocks,
        "num_free_blocks": int(counts[0] + counts[1]),
        "num_used_blocks": num_blocks - int(counts[0] + counts[1]),
        "num_shared_blocks": int(counts[4] + counts[5]),
        "num_cached_blocks": int(counts[1] + counts[3] + counts[5]),
        "num_cached_free_blocks": int(counts[1]),
        "num_logical_blocks": int(ref_counts.sum()),
    }
    state = _STATE_LETTERS[codes].tobytes().decode("ascii")
    if layout == "blocks":
        out["blocks"] = [
            {"id": b, "ref_count": rc, "state": _STATE_NAMES[s.lower()], "cached": c,
             "owners": owners.get(b, [])}
            for b, (rc, s, c) in enumerate(zip(pool.ref_counts, state, cached.tolist()))
        ]
        return out
    out["state"] = state
    used = np.flatnonzero(ref_counts).tolist()
    out["ref_count"] = {str(b): pool.ref_counts[b] for b in used}
    out["owners"] = {str(b): owners.get(b, []) for b in used}
    return out


class QuietMapPolls(logging.Filter):
    """Drops uvicorn's access-log lines of /kv_cache/ polls: an open page polls 4 times a
    second, which would bury every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3
                    and str(args[2]).startswith("/kv_cache/"))


class StatsHistory:
    """The engine's stats once a second for the last minutes, for the page's charts.

    `observe` is a StepListener (engine thread); `samples` is read on the loop. An idle engine
    does not step, so idle stretches have no samples (the charts draw them flat).
    """

    FIELDS = ("time", "num_running", "num_waiting", "num_swapped", "num_preemptions",
              "num_used_blocks", "num_blocks", "prefix_cache_queries", "prefix_cache_hits",
              "num_generation_tokens")

    def __init__(self, interval_s: float = 1.0, max_age_s: float = 600.0) -> None:
        self.interval_s = interval_s
        self._samples: deque[tuple] = deque(maxlen=max(int(max_age_s / interval_s), 1))
        self._last = -float("inf")
        self._lock = threading.Lock()

    def observe(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        sample = (time.time(), stats.num_running, stats.num_waiting, stats.num_swapped,
                  stats.num_preemptions, stats.num_blocks - stats.num_free_blocks,
                  stats.num_blocks, stats.prefix_cache_queries, stats.prefix_cache_hits,
                  stats.num_generation_tokens)
        with self._lock:
            self._samples.append(sample)

    def to_json(self) -> dict[str, Any]:
        """{"fields": [...], "samples": [[value per field], ...]}, oldest first."""
        with self._lock:
            samples = [list(s) for s in self._samples]
        return {"interval_s": self.interval_s, "fields": list(self.FIELDS), "samples": samples}
