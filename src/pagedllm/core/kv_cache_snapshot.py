"""A copy of the KV cache between two steps: every block's reference count and cached hash, and
which request's sequences hold which blocks (the server's map, GET /kv_cache/blocks).

Taking one copies flat lists only (C-speed: about 0.1 ms for 10,000 blocks), so the engine
thread can afford it between steps; turning it into JSON is the reader's work, off that thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.scheduler import Scheduler


@dataclass
class PoolSnapshot:
    """One pool (device or host), indexed by block id."""

    # How many block tables hold the block (0: free).
    ref_counts: list[int]
    # Its prefix-cache hash, or None; a free block with a hash can still be hit (lazy eviction).
    block_hashes: list[int | None]

    @classmethod
    def of(cls, pool: BlockPool) -> PoolSnapshot:
        return cls(*pool.snapshot())


@dataclass
class RequestBlocks:
    """The blocks one live request's sequences hold."""

    request_id: str
    # "waiting", "running" or "swapped".
    status: str
    num_preemptions: int
    # One table per sequence holding blocks: device block ids, and host block ids (swapped).
    device_tables: list[list[int]]
    host_tables: list[list[int]]


@dataclass
class KVCacheSnapshot:
    block_size: int
    # Engine steps run before the snapshot was taken.
    num_steps: int
    device: PoolSnapshot
    host: PoolSnapshot | None
    # Live requests in arrival order.
    requests: list[RequestBlocks]


def snapshot_kv_cache(scheduler: Scheduler, block_manager: BlockManager,
                      num_steps: int) -> KVCacheSnapshot:
    """Copies the pools and tables as they are now (call it between steps)."""
    device_tables, host_tables = block_manager.snapshot_tables()
    requests = []
    for request in sorted(scheduler.requests.values(), key=lambda r: r.arrival_index):
        seq_ids = [seq.seq_id for seq in request.seqs]
        requests.append(RequestBlocks(
            request_id=request.request_id,
            status=request.status.name.lower(),
            num_preemptions=request.num_preemptions,
            device_tables=[device_tables.pop(s) for s in seq_ids if s in device_tables],
            host_tables=[host_tables.pop(s) for s in seq_ids if s in host_tables],
        ))
    # NOTE: every table belongs to a live request's sequence; were one left (a bug), the map
    # still shows its blocks, under the sequence id.
    for seq_id in sorted(set(device_tables) | set(host_tables)):
        requests.append(RequestBlocks(seq_id, "unknown", 0, [device_tables.get(seq_id, [])],
                                      [host_tables.get(seq_id, [])]))
    cpu_pool = block_manager.cpu_pool
    return KVCacheSnapshot(
        block_size=block_manager.block_size,
        num_steps=num_steps,
        device=PoolSnapshot.of(block_manager.pool),
        host=PoolSnapshot.of(cpu_pool) if cpu_pool is not None else None,
        requests=requests,
    )
