"""Collectives over shared memory for the ranks of one host (vLLM's CPU `shm` all-reduce).

gloo's all-reduce goes through TCP and its own threads: on a busy 2-core host a 576-float
all-reduce took 1-1.6 ms, and a Llama layer needs two per step. Ranks on one host instead map
one buffer that the driver creates, and the native ops (`shm_all_reduce`, `shm_all_gather` in
ops/csrc/shm_comm.cpp) copy their part in, publish a flag and read every rank's part: tens
of microseconds. The native decoder stack calls the same all-reduce between its layer parts.
All-reduce sums the ranks' parts in rank order in fp32, so every rank gets the same bits.
"""

from __future__ import annotations

from multiprocessing import shared_memory

import torch

from pagedllm.ops import cpu_ops

# Bytes of each rank's area per slot (larger tensors go in chunks): a prefill chunk of 2048
# tokens of a 576-wide fp32 hidden state is 4.5 MiB.
DEFAULT_AREA_BYTES = 8 << 20
_HEADER_BYTES = 4096  # flags, one cache line per rank (as the op computes it, up to 64 ranks)


def shm_buffer_bytes(world_size: int, area_bytes: int = DEFAULT_AREA_BYTES) -> int:
    return _HEADER_BYTES * -(-world_size * 64 // _HEADER_BYTES) + 2 * world_size * area_bytes


def create_shm_buffer(world_size: int,
                      area_bytes: int = DEFAULT_AREA_BYTES) -> shared_memory.SharedMemory:
    """The driver's buffer for a group of `world_size` ranks (zeroed: no flag is set)."""
    return shared_memory.SharedMemory(create=True, size=shm_buffer_bytes(world_size, area_bytes))


class ShmCommunicator:
    """One rank's view of the group's shared buffer; the collectives the layers call."""

    def __init__(self, name: str, rank: int, world_size: int) -> None:
        self.ops = cpu_ops()
        if self.ops is None:
            raise RuntimeError("tensor parallelism on CPU needs pagedllm's C++ ops, which did "
                               "not build here")
        self.rank, self.world_size = rank, world_size
        self._shm = shared_memory.SharedMemory(name=name)
        self.buffer = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        # This rank's count of collective calls (the ops advance it; every rank agrees).
        self.generation = torch.zeros(1, dtype=torch.int64)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x <- the sum over the ranks, in place (contiguous fp32/bf16); returns x."""
        self.ops.shm_all_reduce(x, self.buffer, self.rank, self.world_size, self.generation)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim` in rank order, on every rank."""
        stacked = self.ops.shm_all_gather(x.contiguous(), self.buffer, self.rank,
                                          self.world_size, self.generation)
        return torch.cat(stacked.unbind(0), dim=dim)

    def gather_columns(self, x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Every rank's x [rows, cols] side by side in rank order, [rows, world_size * cols],
        on rank `dst`; None elsewhere (those ranks copy nothing out)."""
        x = x.contiguous()
        out = (torch.empty(x.shape[0], self.world_size * x.shape[1], dtype=x.dtype)
               if self.rank == dst else None)
        self.ops.shm_gather_columns(x, out, dst, self.buffer, self.rank, self.world_size,
                                    self.generation)
        return out

    def close(self) -> None:
        del self.buffer
        self._shm.close()
