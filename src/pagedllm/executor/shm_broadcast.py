"""A one-writer, many-reader ring buffer in shared memory: the driver's step messages to ranks.

The writer copies a message into shared memory once, whatever the number of readers; each
reader copies it out and acknowledges it. Layout (all counters int64, each with one writer):

    [ written | read[0] .. read[R-1] | pad ]  [ chunk 0 ] ... [ chunk C-1 ]
    chunk: [ length int32 | last uint8 | pad ] [ payload: chunk_bytes ]

`written` counts the chunks published; `read[r]` the chunks reader r has consumed. Chunk k goes
into slot k % C once every reader has consumed chunk k - C. A message longer than a chunk
spans consecutive chunks; the last one carries `last`.

A reader that finds nothing to read blocks on its doorbell, a pipe the writer rings with one
byte per chunk, so an idle rank sleeps instead of spinning; the pipe also reports the writer's
death to it (end of file), so a rank never outlives its driver. The counters, not the rings,
say what is there to read.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait

_COUNTER = 8
_CHUNK_HEADER = 8  # int32 length, uint8 last, 3 bytes pad
_LAST = 1

# Microseconds a reader watches for the next message before it sleeps (RingReader).
SPIN_US_ENV = "PAGEDLLM_RING_SPIN_US"
DEFAULT_SPIN_US = 0

_fence_lock = threading.Lock()


def _memory_fence() -> None:
    """Orders the stores before it against those after it, as seen by another process.

    NOTE: x86 keeps stores in order anyway; taking a lock is a full barrier on every CPU that
    CPython runs on (vLLM's shm_broadcast does the same).
    """
    _fence_lock.acquire()
    _fence_lock.release()


class WorkerDiedError(RuntimeError):
    """A rank's process ended (killed, crashed or exited) while the driver needed it."""


class ShmRingBuffer:
    """The shared memory of one ring: created by the writer, attached to by each reader.

    Pass `name=None` to create a fresh segment (the writer), or the writer's `name` to attach.
    """

    def __init__(self, num_readers: int, chunk_bytes: int = 1 << 18, num_chunks: int = 8,
                 name: str | None = None) -> None:
        assert num_readers >= 1 and num_chunks >= 1 and chunk_bytes >= 1
        self.num_readers = num_readers
        self.chunk_bytes = chunk_bytes
        self.num_chunks = num_chunks
        # The header fills whole 64-byte lines, so counters and chunks never share one.
        self._header_bytes = -(-(1 + num_readers) * _COUNTER // 64) * 64
        size = self._header_bytes + num_chunks * (_CHUNK_HEADER + chunk_bytes)
        self.is_owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.is_owner, size=size)
        if self.is_owner:
            self.shm.buf[: self._header_bytes] = bytes(self._header_bytes)
        # counters[0] = written, counters[1 + r] = read by reader r (aligned 8-byte loads and
        # stores: one instruction each on 64-bit CPUs, so never seen half written).
        self._counters = self.shm.buf[: self._header_bytes].cast("q")

    @property
    def name(self) -> str:
        return self.shm.name

    def handle(self) -> tuple[int, int, int, str]:
        """What a reader process needs to attach: ShmRingBuffer(*handle)."""
        return (self.num_readers, self.chunk_bytes, self.num_chunks, self.name)

    def _slot(self, chunk_index: int) -> int:
        return self._header_bytes + (chunk_index % self.num_chunks) * (
            _CHUNK_HEADER + self.chunk_bytes)

    def close(self) -> None:
        """Detaches; the owner also removes the segment."""
        self._counters.release()
        self.shm.close()
        if self.is_owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class RingWriter:
    """The driver's end: publishes messages to every reader.

    `check_readers` is called while the writer waits for a full ring to drain; it raises
    (WorkerDiedError) when a reader is gone, so the writer never waits on the dead.
    """

    def __init__(self, ring: ShmRingBuffer, doorbells: list[Connection],
                 check_readers: Callable[[], None]) -> None:
        assert len(doorbells) == ring.num_readers
        self.ring = ring
        self._doorbells = doorbells
        self._check_readers = check_readers
        # True from before the first chunk of a message longer than one is published until
        # after its last: a write cut off (Ctrl-C) while it holds may leave half a message.
        self.in_message = False

    @property
    def num_chunks_written(self) -> int:
        """Chunks published so far: after a write, where its message ends in the sequence."""
        return self.ring._counters[0]

    def write(self, payload: bytes) -> None:
        ring = self.ring
        view = memoryview(payload)
        offset = 0
        while True:
            piece = view[offset : offset + ring.chunk_bytes]
            offset += len(piece)
            last = offset >= len(view)
            written = ring._counters[0]
            self._wait_for_slot(written)
            slot = ring._slot(written)
            buf = ring.shm.buf
            buf[slot + _CHUNK_HEADER : slot + _CHUNK_HEADER + len(piece)] = piece
            struct.pack_into("<iB", buf, slot, len(piece), _LAST if last else 0)
            _memory_fence()  # the chunk before the counter that publishes it
            if not last:
                self.in_message = True
            ring._counters[0] = written + 1
            if last:
                self.in_message = False
            for doorbell in self._doorbells:
                doorbell.send_bytes(b"\x01")
            if last:
                return

    def _wait_for_slot(self, written: int) -> None:
        """Waits until every reader has consumed the chunk that last used this slot."""
        ring = self.ring
        delay = 1e-5
        while written - min(ring._counters[1 : 1 + ring.num_readers]) >= ring.num_chunks:
            self._check_readers()
            time.sleep(delay)
            delay = min(2 * delay, 1e-2)
        _memory_fence()  # their reads before our overwrite


class RingReader:
    """One rank's end: reads each message once, in order, and acknowledges each chunk."""

    def __init__(self, ring: ShmRingBuffer, reader_index: int, doorbell: Connection,
                 spin_seconds: float | None = None) -> None:
        assert 0 <= reader_index < ring.num_readers
        self.ring = ring
        self.reader_index = reader_index
        self._doorbell = doorbell
        # How long a reader watches the counter (yielding its core between looks) before it
        # sleeps on the doorbell: a rank on its own core that is woken from sleep for every
        # step pays the wake-up (more where an idle virtual CPU halts) on the critical path.
        if spin_seconds is None:
            spin_seconds = float(os.environ.get(SPIN_US_ENV, DEFAULT_SPIN_US)) * 1e-6
        self._spin_seconds = spin_seconds

    @property
    def num_chunks_read(self) -> int:
        """Chunks consumed so far: after a message, where it ends in the ring's sequence."""
        return self.ring._counters[1 + self.reader_index]

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next message; None when `timeout` seconds pass first. Raises EOFError once the
        writer has gone (its end of the doorbell is closed) and nothing is left to read."""
        ring = self.ring
        counter = 1 + self.reader_index
        pieces = []
        while True:
            done = ring._counters[counter]
            if ring._counters[0] == done and self._spin_seconds > 0 and not pieces:
                deadline = time.perf_counter() + self._spin_seconds
                while ring._counters[0] == done and time.perf_counter() < deadline:
                    os.sched_yield()
            if ring._counters[0] == done:
                # Nothing published: sleep until the doorbell rings. NOTE: the rings are only
                # wake-ups (the counters say what is there), so a ring left over from a chunk
                # already read costs one more look, and all of them are drained here.
                # A message's later chunks may wait for the slowest reader: no timeout then.
                if not wait([self._doorbell], None if pieces else timeout):
                    return None
                self._doorbell.recv_bytes()  # EOFError: the writer is gone
                while self._doorbell.poll(0):
                    self._doorbell.recv_bytes()
                continue
            _memory_fence()  # the counter before the chunk it publishes
            slot = ring._slot(done)
            length, flags = struct.unpack_from("<iB", ring.shm.buf, slot)
            start = slot + _CHUNK_HEADER
            pieces.append(bytes(ring.shm.buf[start : start + length]))
            _memory_fence()  # our copy before the writer may reuse the slot
            ring._counters[counter] = done + 1
            if flags & _LAST:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
