"""The shared-memory collectives of ranks on one host (distributed/shm_comm.py), in real
processes: all-reduce sums every rank's tensor in rank order (fp32 and bf16, the same bits on
every rank), all-gather stacks them, the column gather puts them side by side on one rank
only, over many calls and tensors larger than a rank's area (sent in chunks)."""

from __future__ import annotations

import io
import multiprocessing

import pytest
import torch

from pagedllm.distributed.shm_comm import ShmCommunicator, create_shm_buffer
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the C++ CPU ops are unavailable")

WORLD_SIZE = 3
AREA_BYTES = 1024  # tiny, so that most tensors below go in several chunks


def inputs(rank: int, call: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * call + rank)
    numel = [5, 256, 1000][call % 3]  # within one area, exactly one, several
    return [torch.randn(numel, generator=gen),
            torch.randn(numel, generator=gen).bfloat16(),
            torch.randn(3, numel, generator=gen),
            torch.randn(numel // 4 + 1, 7, generator=gen)]  # logit columns: rows in chunks


def rank_main(name: str, rank: int, results) -> None:
    comm = ShmCommunicator(name, rank, WORLD_SIZE)
    out = []
    for call in range(6):
        fp32, bf16, rows, logits = inputs(rank, call)
        out.append((comm.all_reduce(fp32.clone()), comm.all_reduce(bf16.clone()),
                    comm.all_gather(rows, dim=-1),
                    comm.gather_columns(logits, dst=call % WORLD_SIZE)))
    comm.close()
    # As bytes: a tensor itself would cross as a file descriptor, which needs its sender alive.
    data = io.BytesIO()
    torch.save(out, data)
    results.put((rank, data.getvalue()))


def test_all_reduce_all_gather_and_column_gather_over_three_processes():
    buffer = create_shm_buffer(WORLD_SIZE, AREA_BYTES)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(buffer.name, rank, results), daemon=True)
             for rank in range(WORLD_SIZE)]
    try:
        for proc in procs:
            proc.start()
        got = {rank: torch.load(io.BytesIO(data))
               for rank, data in (results.get(timeout=120) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        buffer.close()
        buffer.unlink()
    for call in range(6):
        parts = [inputs(rank, call) for rank in range(WORLD_SIZE)]
        fp32 = parts[0][0].clone()
        bf16 = parts[0][1].float()
        for rank in range(1, WORLD_SIZE):  # rank order, fp32 sums
            fp32 += parts[rank][0]
            bf16 += parts[rank][1].float()
        gathered = torch.cat([p[2] for p in parts], dim=-1)
        columns = torch.cat([p[3] for p in parts], dim=-1)
        for rank in range(WORLD_SIZE):
            reduced_fp32, reduced_bf16, rows, logits = got[rank][call]
            assert torch.equal(reduced_fp32, fp32)
            assert torch.equal(reduced_bf16, bf16.bfloat16())
            assert torch.equal(rows, gathered)
            if rank == call % WORLD_SIZE:
                assert torch.equal(logits, columns)
            else:
                assert logits is None
