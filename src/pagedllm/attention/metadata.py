"""Builds `AttentionMetadata` for one engine step from per-sequence Python lists.

The model runner calls this once per step (up to a few hundred sequences), so the index
arithmetic is done with numpy on whole arrays rather than with a Python loop per token.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Flattens a batch of sequences into the tensors an `AttentionBackend` reads.

    Sequence i schedules `query_lens[i]` new tokens, which sit at the end of its context of
    `seq_lens[i]` tokens (cached + new). `block_tables[i]` lists its physical blocks in logical
    order; it may hold more blocks than the context needs (pre-allocated room to grow), and the
    extra ones are left out of the padded table.

    Args:
        query_lens: new tokens per sequence, each in 1..seq_lens[i].
        seq_lens: context length per sequence after this step (cached + new).
        block_tables: physical block ids per sequence; needs ceil(seq_lens[i] / block_size).
        block_size: tokens per KV-cache block.
        device: where the tensors go; the host copies stay Python lists.
    Returns:
        The metadata, with `block_tables` padded with 0 to the longest needed table.
    Raises:
        ValueError: if the lists disagree in length, a length is out of range, or a block
            table is too short for its sequence.
    """
    num_seqs = len(query_lens)
    if len(seq_lens) != num_seqs or len(block_tables) != num_seqs:
        raise ValueError(
            f"query_lens, seq_lens and block_tables must have one entry per sequence; got "
            f"{num_seqs}, {len(seq_lens)} and {len(block_tables)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    query_lens_np = np.asarray(query_lens, dtype=np.int64).reshape(num_seqs)  # [num_seqs]
    seq_lens_np = np.asarray(seq_lens, dtype=np.int64).reshape(num_seqs)  # [num_seqs]
    table_lens_np = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)
    # Blocks each context actually occupies: ceil(seq_len / block_size).
    num_blocks_np = -(-seq_lens_np // block_size)  # [num_seqs]

    bad = (query_lens_np < 1) | (query_lens_np > seq_lens_np)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"sequence {i}: query_len {query_lens[i]} must be in 1..seq_len ({seq_lens[i]})"
        )
    short = table_lens_np < num_blocks_np
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise ValueError(
            f"sequence {i}: block table has {table_lens_np[i]} blocks but seq_len {seq_lens[i]} "
            f"needs {num_blocks_np[i]} at block_size {block_size}; allocate its slots first"
        )

    # query_start_loc: E.g., query_lens [3, 1, 2] -> [0, 3, 4, 6]
    query_start_loc_np = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens_np, out=query_start_loc_np[1:])
    num_tokens = int(query_start_loc_np[-1])

    # Padded block table, keeping only the blocks each context needs.
    # E.g., block_size 4, seq_lens [6, 3], block_tables [[7, 2, 9], [5]]
    #   num_blocks [2, 1] -> keep mask [[T, T], [T, F]] -> table [[7, 2], [5, 0]]
    max_num_blocks = int(num_blocks_np.max(initial=0))
    block_tables_np = np.zeros((num_seqs, max_num_blocks), dtype=np.int32)
    flat_blocks = np.fromiter(
        itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(table_lens_np.sum())
    )
    # Flat index of each sequence's first block, then keep the first num_blocks of each row.
    table_starts = np.cumsum(table_lens_np) - table_lens_np  # [num_seqs]
    cols = np.arange(max_num_blocks, dtype=np.int64)  # [max_num_blocks]
    keep = cols[None, :] < num_blocks_np[:, None]  # [num_seqs, max_num_blocks]
    block_tables_np[keep] = flat_blocks[(table_starts[:, None] + cols[None, :])[keep]]
    # Blocks freed out of a sliding window (core.block_manager.NULL_BLOCK, -1) -> block 0: the
    # backends never weigh keys before a query's window.
    np.maximum(block_tables_np, 0, out=block_tables_np)

    # Slot of every new token. Worked example, block_size 4, one sequence with
    # seq_len 6, query_len 3 and block table [7, 2]:
    #   token_seq_idx [0, 0, 0]; offset in query [0, 1, 2]
    #   positions     = (6 - 3) + [0, 1, 2]      = [3, 4, 5]
    #   block ids     = table[0, positions // 4] = [7, 2, 2]
    #   slot_mapping  = block id * 4 + pos % 4   = [31, 8, 9]
    # token_seq_idx: E.g., query_lens [2, 1, 3] -> [0, 0, 1, 2, 2, 2]
    token_seq_idx = np.repeat(np.arange(num_seqs, dtype=np.int64), query_lens_np)  # [num_tokens]
    offset_in_query = np.arange(num_tokens, dtype=np.int64) - query_start_loc_np[token_seq_idx]
    num_cached_np = seq_lens_np - query_lens_np  # [num_seqs]
    positions = num_cached_np[token_seq_idx] + offset_in_query  # [num_tokens]
    block_ids = block_tables_np[token_seq_idx, positions // block_size].astype(np.int64)
    slot_mapping_np = block_ids * block_size + positions % block_size  # [num_tokens]

    return AttentionMetadata(
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        query_start_loc=torch.from_numpy(query_start_loc_np).to(device),
        seq_lens=torch.from_numpy(seq_lens_np).to(device),
        block_tables=torch.from_numpy(block_tables_np).to(device),
        slot_mapping=torch.from_numpy(slot_mapping_np).to(device),
        query_lens_cpu=query_lens_np.tolist(),
        seq_lens_cpu=seq_lens_np.tolist(),
        max_query_len=int(query_lens_np.max(initial=0)),
        max_seq_len=int(seq_lens_np.max(initial=0)),
    )


def build_decode_metadata(
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """`build_attention_metadata` for a step where every sequence schedules one new token
    (query_lens all 1): the same tensors, from Python lists without numpy's per-call costs,
    which dominate at a few sequences (a single stream's decode step).

    Raises:
        ValueError: as build_attention_metadata, for the same faults.
    """
    num_seqs = len(seq_lens)
    if len(block_tables) != num_seqs:
        raise ValueError(
            f"query_lens, seq_lens and block_tables must have one entry per sequence; got "
            f"{num_seqs}, {num_seqs} and {len(block_tables)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_blocks = [(s + block_size - 1) // block_size for s in seq_lens]
    max_num_blocks = max(num_blocks, default=0)
    rows: list[list[int]] = []
    slots: list[int] = []
    for i, (seq_len, n, table) in enumerate(zip(seq_lens, num_blocks, block_tables)):
        if seq_len < 1:
            raise ValueError(f"sequence {i}: query_len 1 must be in 1..seq_len ({seq_len})")
        if len(table) < n:
            raise ValueError(
                f"sequence {i}: block table has {len(table)} blocks but seq_len {seq_len} "
                f"needs {n} at block_size {block_size}; allocate its slots first"
            )
        row = table[:n]
        if min(row) < 0:  # blocks freed out of a sliding window (NULL_BLOCK) -> block 0
            row = [max(b, 0) for b in row]
        # The new token sits at position seq_len - 1, in the row's last block.
        slots.append(row[-1] * block_size + (seq_len - 1) % block_size)
        row.extend([0] * (max_num_blocks - n))
        rows.append(row)
    # NOTE: through numpy: torch.tensor(list) costs a few microseconds more per tensor.
    return AttentionMetadata(
        num_seqs=num_seqs,
        num_tokens=num_seqs,
        query_start_loc=host_tensor(np.arange(num_seqs + 1, dtype=np.int64), device),
        seq_lens=host_tensor(np.array(seq_lens, dtype=np.int64), device),
        block_tables=host_tensor(
            np.array(rows, dtype=np.int32).reshape(num_seqs, max_num_blocks), device),
        slot_mapping=host_tensor(np.array(slots, dtype=np.int64), device),
        query_lens_cpu=[1] * num_seqs,
        seq_lens_cpu=list(seq_lens),
        max_query_len=1 if num_seqs else 0,
        max_seq_len=max(seq_lens, default=0),
    )


def host_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor over `array` (shared on the CPU, else copied to `device`)."""
    t = torch.from_numpy(array)
    # NOTE: a torch.device's own type first: torch.device(device) costs ~0.4 us, six per step.
    on_cpu = (device.type if isinstance(device, torch.device) else torch.device(device).type) == "cpu"
    return t if on_cpu else t.to(device)
