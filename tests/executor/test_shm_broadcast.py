"""The shared-memory ring: order, messages longer than a chunk, wrap-around, and a reader that
is gone. Writer and readers live in this process (each has its own attachment)."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from pagedllm.executor.shm_broadcast import (
    RingReader,
    RingWriter,
    ShmRingBuffer,
    WorkerDiedError,
)


@pytest.fixture
def ring_pair():
    """A ring of 4 chunks of 64 bytes with two readers, each on its own attachment."""
    ring = ShmRingBuffer(num_readers=2, chunk_bytes=64, num_chunks=4)
    attached = [ShmRingBuffer(*ring.handle()) for _ in range(2)]
    bells = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    alive = {"ok": True}

    def check_readers() -> None:
        if not alive["ok"]:
            raise WorkerDiedError("reader gone")

    writer = RingWriter(ring, [w for _, w in bells], check_readers)
    readers = [RingReader(a, i, r) for i, (a, (r, _)) in enumerate(zip(attached, bells))]
    yield writer, readers, alive
    for a in attached:
        a.close()
    ring.close()


def test_messages_arrive_in_order_at_every_reader(ring_pair):
    writer, readers, _ = ring_pair
    messages = [b"a", b"", b"x" * 64, b"y" * 65, bytes(range(200))]
    for message in messages[:3]:
        writer.write(message)
    # Three chunks published, none read: both readers see them in order.
    for reader in readers:
        assert [reader.read() for _ in range(3)] == messages[:3]
    writer.write(messages[3])  # 2 chunks
    for reader in readers:
        assert reader.read() == messages[3]
    writer.write(messages[4])  # 4 chunks: every slot, wrapping around the ring's end
    for reader in readers:
        assert reader.read() == messages[4]
    assert readers[0].read(timeout=0.01) is None  # nothing left


def test_a_full_ring_waits_for_the_slowest_reader_and_checks_it_is_alive(ring_pair):
    writer, readers, alive = ring_pair
    for i in range(4):
        writer.write(bytes([i]))  # fills every slot
    for _ in range(4):
        readers[0].read()
    # Reader 1 has read nothing: the next chunk has no slot, and the writer asks whether
    # the readers live while it waits.
    alive["ok"] = False
    with pytest.raises(WorkerDiedError):
        writer.write(b"more")
    assert [readers[1].read() for _ in range(4)] == [bytes([i]) for i in range(4)]


def test_a_reader_sees_end_of_file_when_the_writer_closes_its_doorbell():
    ring = ShmRingBuffer(num_readers=1, chunk_bytes=16, num_chunks=2)
    bell_r, bell_w = multiprocessing.Pipe(duplex=False)
    reader = RingReader(ShmRingBuffer(*ring.handle()), 0, bell_r)
    RingWriter(ring, [bell_w], lambda: None).write(b"last")
    bell_w.close()
    assert reader.read() == b"last"
    with pytest.raises(EOFError):
        reader.read()
    reader.ring.close()
    ring.close()


def test_a_spinning_reader_takes_a_message_without_its_doorbell():
    """A reader given spin time watches the ring's counter before it sleeps on its doorbell:
    a message published meanwhile is read at once (its doorbell here is never rung)."""
    ring = ShmRingBuffer(num_readers=1, chunk_bytes=64, num_chunks=4)
    attached = ShmRingBuffer(*ring.handle())
    silent_r, _silent_w = multiprocessing.Pipe(duplex=False)  # the reader's, never rung
    _, other_w = multiprocessing.Pipe(duplex=False)  # the writer rings this one instead
    writer = RingWriter(ring, [other_w], lambda: None)
    spinning = RingReader(attached, 0, silent_r, spin_seconds=5.0)
    sleeping = RingReader(attached, 0, silent_r, spin_seconds=0.0)
    timers = [threading.Timer(0.05, writer.write, args=(b"step",))]
    try:
        timers[0].start()
        assert spinning.read(timeout=2.0) == b"step"
        writer.write(b"next")
        assert spinning.read(timeout=2.0) == b"next"  # already published: no spin needed
        # Without spin time the same wait sleeps on the silent doorbell and misses it.
        timers.append(threading.Timer(0.05, writer.write, args=(b"missed",)))
        timers[1].start()
        assert sleeping.read(timeout=0.5) is None
    finally:
        for timer in timers:
            timer.join()
        attached.close()
        ring.close()
