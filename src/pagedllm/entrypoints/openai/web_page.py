"""The server's web page (`GET /`: chat, completions, a live map of the paged KV cache) and the
JSON it draws the map from (`GET /kv_cache/blocks`, `GET /kv_cache/history`).

The page is three static files inside the package (static/: plain HTML, JS and CSS; no build
step, nothing loaded from elsewhere). The map's JSON comes from a KVCacheSnapshot that the engine
thread copies between two steps; this module turns it into JSON on the event loop. Each
engine's KVMapEncoder keeps the previous poll's work: a snapshot equal to the last one reuses
its body, and a changed pool recomputes only the stretches of blocks that changed, so that a
poll of a busy 11,650-block pool costs about 0.2 ms of CPU besides the HTTP round trip.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.responses import Response

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
# The "state" string's letter per block, by code (see _PoolCodes): free, cached (free, holding
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
                          ) -> bytes | ErrorResponse:
    """GET /kv_cache/blocks: a snapshot taken between two engine steps, as UTF-8 JSON."""
    if layout not in LAYOUTS:
        return make_error(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", 400,
                          param="layout")
    try:
        snapshot, stats = await engine.get_kv_cache_snapshot()
    except EngineDeadError as exc:
        return make_error(str(exc), 503)
    encoder = _ENCODERS.get(engine)
    if encoder is None:
        encoder = _ENCODERS[engine] = KVMapEncoder()
    return encoder.body(snapshot, stats, layout)


def kv_cache_history(history: StatsHistory | None) -> bytes:
    """GET /kv_cache/history: the charts' samples (none without a history), as UTF-8 JSON."""
    return _dumps((history or StatsHistory()).to_json())


def kv_cache_json(snapshot: KVCacheSnapshot, stats: EngineStats, layout: str = "compact"
                  ) -> dict[str, Any]:
    """The JSON of GET /kv_cache/blocks (the README documents it), as a dict.

    `layout` "compact" (the page's): every block's state as one letter of a string indexed by
    block id, and the reference counts and owners of the blocks in use only (a free block has
    none), so that its cost grows with the blocks in use; "blocks": a list of one object per
    block, easier to read and about 20x dearer on a large pool.
    """
    return KVMapEncoder().to_json(snapshot, stats, layout)


# The encoder of each served engine (one event loop reads it).
_ENCODERS: weakref.WeakKeyDictionary[Any, KVMapEncoder] = weakref.WeakKeyDictionary()


class KVMapEncoder:
    """Turns one engine's successive snapshots into JSON, reusing the previous one's work.

    Used by one thread (the event loop). A snapshot equal to the previous one (an idle engine,
    or several pages polling within one step) reuses its body with a new "time"; otherwise each
    pool's state codes are kept from the previous snapshot, and only the stretches of
    CHUNK blocks whose reference counts or hashes differ are recomputed.
    """

    def __init__(self) -> None:
        self._pools = {"device": _PoolCodes(), "host": _PoolCodes()}
        self._last: tuple[KVCacheSnapshot, EngineStats] | None = None
        self._body_after_time = b""  # the compact body from its first field after "time"

    def body(self, snapshot: KVCacheSnapshot, stats: EngineStats, layout: str = "compact"
             ) -> bytes:
        """The UTF-8 JSON of `to_json`, "time" first."""
        if layout != "compact":
            return _dumps(self.to_json(snapshot, stats, layout))
        if self._last is None or self._last != (snapshot, stats):
            out = self.to_json(snapshot, stats, layout)
            del out["time"]
            self._body_after_time = _dumps(out)[1:]
            self._last = snapshot, stats
        return b'{"time":' + repr(time.time()).encode() + b"," + self._body_after_time

    def to_json(self, snapshot: KVCacheSnapshot, stats: EngineStats, layout: str = "compact"
                ) -> dict[str, Any]:
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
            "device": self._pool_json("device", snapshot.device, device_owners, layout),
            "host": (self._pool_json("host", host, host_owners, layout)
                     if host is not None else None),
            "requests": requests,
            "stats": dict(vars(stats)),
        }

    def _pool_json(self, name: str, pool: PoolSnapshot, owners: dict[int, list[str]],
                   layout: str) -> dict[str, Any]:
        codes = self._pools[name].update(pool)
        num_blocks = len(codes)
        counts = np.bincount(codes, minlength=6)
        used = np.flatnonzero(codes >= 2).tolist()  # codes 2-5: a reference count above 0
        ref_counts = pool.ref_counts
        out: dict[str, Any] = {
            "num_blocks": num_blocks,
            "num_free_blocks": int(counts[0] + counts[1]),
            "num_used_blocks": num_blocks - int(counts[0] + counts[1]),
            "num_shared_blocks": int(counts[4] + counts[5]),
            "num_cached_blocks": int(counts[1] + counts[3] + counts[5]),
            "num_cached_free_blocks": int(counts[1]),
            "num_logical_blocks": sum(ref_counts[b] for b in used),
        }
        state = _STATE_LETTERS[codes].tobytes().decode("ascii")
        if layout == "blocks":
            out["blocks"] = [
                {"id": b, "ref_count": rc, "state": _STATE_NAMES[s.lower()],
                 "cached": code % 2 == 1, "owners": owners.get(b, [])}
                for b, (rc, s, code) in enumerate(zip(ref_counts, state, codes.tolist()))
            ]
            return out
        out["state"] = state
        out["ref_count"] = {str(b): ref_counts[b] for b in used}
        out["owners"] = {str(b): owners.get(b, []) for b in used}
        return out


class _PoolCodes:
    """One pool's state code per block, kept from one snapshot to the next.

    Code: 2 x (0 free, 1 one holder, 2 several) + 1 when holding a hash; e.g. a shared block
    with a hash is 5, "S" (_STATE_LETTERS). The snapshot's lists are its own copies, so the
    previous ones can be kept and compared: equal lists compare at C speed (their items are the
    same objects), and a busy engine changes a few blocks per step.
    """

    CHUNK = 512

    def __init__(self) -> None:
        self._ref_counts: list[int] = []
        self._hashes: list[int | None] = []
        self.codes = np.zeros(0, dtype=np.uint8)

    def update(self, pool: PoolSnapshot) -> np.ndarray:
        """The codes of `pool`'s blocks (an array this object owns: read it before the next
        update)."""
        ref_counts, hashes = pool.ref_counts, pool.block_hashes
        old_counts, old_hashes = self._ref_counts, self._hashes
        if len(ref_counts) != len(old_counts):
            self.codes = _state_codes(ref_counts, hashes)
        elif ref_counts != old_counts or hashes != old_hashes:
            for start in range(0, len(ref_counts), self.CHUNK):
                end = start + self.CHUNK
                counts, chunk_hashes = ref_counts[start:end], hashes[start:end]
                if counts != old_counts[start:end] or chunk_hashes != old_hashes[start:end]:
                    self.codes[start:end] = _state_codes(counts, chunk_hashes)
        self._ref_counts, self._hashes = ref_counts, hashes
        return self.codes


def _state_codes(ref_counts: list[int], hashes: list[int | None]) -> np.ndarray:
    """Each block's state code (_PoolCodes), uint8."""
    try:
        counts = np.frombuffer(bytes(ref_counts), dtype=np.uint8)  # 3x faster than np.array
    except ValueError:  # a count past 255
        counts = np.array(ref_counts, dtype=np.int64)
    cached = np.fromiter(map(operator.is_not, hashes, itertools.repeat(None)), dtype=bool,
                         count=len(hashes))
    return (np.minimum(counts, 2) * 2 + cached).astype(np.uint8)


def _dumps(value: Any) -> bytes:
    # As Starlette's JSONResponse renders.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def _add_owner(owners: dict[int, list[str]], tables: list[list[int]], request_id: str) -> int:
    """Records the request on each distinct block of its tables; returns how many there are."""
    blocks = set(itertools.chain.from_iterable(tables))
    for block_id in blocks:
        owners.setdefault(block_id, []).append(request_id)
    return len(blocks)


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
