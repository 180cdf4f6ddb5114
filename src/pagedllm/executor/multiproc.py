"""The `mp` backend: one worker process per rank on this host.

    driver (engine process)                            rank r (spawned process)
    StepEncoder.encode -> pickle -> RingWriter ==shm==> RingReader -> StepDecoder.decode
                                                           -> Worker.execute_model
    decode_runner_output <- reply pipe (rank 0 only) <- encode_runner_output

A step's message is written once into shared memory for every rank (shm_broadcast); only
rank 0 answers a step, and every rank answers collective_rpc. While the driver waits for an
answer it also waits on every rank's process sentinel, so a rank that dies (killed, crashed)
turns into a WorkerDiedError at once instead of a hang.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import traceback
import weakref
from collections.abc import Callable, Container
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.distributed.shm_comm import create_shm_buffer
from pagedllm.distributed.utils import free_local_port, use_shm_collectives
from pagedllm.executor.abstract import (
    DURING,
    Executor,
    RemoteTraceback,
    call_worker,
    engine_dead,
)
from pagedllm.executor.shm_broadcast import (
    RingReader,
    RingWriter,
    ShmRingBuffer,
    WorkerDiedError,
)
from pagedllm.executor.step_message import (
    StepDecoder,
    StepEncoder,
    StepMessage,
    decode_runner_output,
    encode_runner_output,
)
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pagedllm.config import EngineConfig
    from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_EXECUTE, _RPC = 0, 1
# Seconds a rank gets to leave on its own at shutdown before it is terminated.
_SHUTDOWN_GRACE_S = 5.0


class MultiprocExecutor(Executor):
    """Ranks in spawned processes, driven through shared memory.

    Attributes read by benchmarks and tests: `num_steps`, `last_message_bytes` and
    `total_message_bytes` (the pickled step messages the driver wrote).
    """

    def __init__(self, config: EngineConfig, hf_config: PretrainedConfig, model_dir: Path,
                 max_model_len: int, profiler: StepProfiler | None = None) -> None:
        self.world_size = config.tensor_parallel_size
        # Tensor parallelism: the all-reduces go through a shared buffer
        # (distributed/shm_comm.py), unless PAGEDLLM_TP_COMM=process_group asks for the
        # process group's (gloo's); checked before anything starts.
        shm_collectives = self.world_size > 1 and use_shm_collectives(one_host=True)
        self.profiler = profiler or StepProfiler()
        self.num_steps = 0
        self.last_message_bytes = 0
        self.total_message_bytes = 0
        self._encoder = StepEncoder()
        self._dead: str | None = None  # why no step can run any more
        ctx = multiprocessing.get_context("spawn")
        ring = ShmRingBuffer(num_readers=self.world_size)
        # Rank 0 serves the process group's store on a free local port.
        comm_buffer = create_shm_buffer(self.world_size) if shm_collectives else None
        dist_args = (f"tcp://127.0.0.1:{free_local_port()}",
                     None if comm_buffer is None else comm_buffer.name)
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._replies: list[Connection] = []
        doorbells: list[Connection] = []
        # Runs at shutdown(), when the executor is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_ranks, self._procs, doorbells,
                                           self._replies, ring, comm_buffer)
        for rank in range(self.world_size):
            bell_reader, bell_writer = ctx.Pipe(duplex=False)
            reply_reader, reply_writer = ctx.Pipe(duplex=False)
            doorbells.append(bell_writer)
            self._replies.append(reply_reader)
            proc = ctx.Process(
                target=_rank_main, name=f"pagedllm-rank{rank}", daemon=True,
                args=(rank, config, hf_config, str(model_dir), max_model_len, ring.handle(),
                      bell_reader, reply_writer, dist_args))
            proc.start()
            self._procs.append(proc)
            # The ranks hold these ends now; ours must close for end-of-file to be seen.
            bell_reader.close()
            reply_writer.close()
        # NOTE: a weak reference, so that the writer does not keep the executor alive (its
        # finalizer stops the ranks once nothing else holds it).
        check_ranks = weakref.WeakMethod(self._check_ranks)
        self._writer = RingWriter(ring, doorbells, lambda: check_ranks()())
        try:
            sizes = [self._receive(rank, "start", 0) for rank in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self._num_kv_blocks = min(num_kv for num_kv, _ in sizes)
        self._num_cpu_blocks = min(num_cpu for _, num_cpu in sizes)
        logger.info("%d worker process(es) ready (pids %s)", self.world_size,
                    ", ".join(str(p.pid) for p in self._procs))

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self._num_cpu_blocks

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def execute_model(self, scheduler_output: SchedulerOutput,
                      live_request_ids: Container[str] = ()) -> ModelRunnerOutput:
        self.check_health()
        with self.profiler.section("encode step"):
            try:
                message = self._encoder.encode(scheduler_output, live_request_ids)
                payload = pickle.dumps((_EXECUTE, message.to_wire()),
                                       protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException:
                self._encoder.forget_all()  # encoded (in part), never sent
                raise
        self.num_steps += 1
        self.last_message_bytes = len(payload)
        self.total_message_bytes += len(payload)
        with self.profiler.section("worker step"):
            end = self._broadcast(payload, if_unsent=self._encoder.forget_all)
            rows = self._receive(0, "step", end)
        return decode_runner_output(scheduler_output, rows)

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        self.check_health()
        end = self._broadcast(pickle.dumps((_RPC, method, args, kwargs),
                                           protocol=pickle.HIGHEST_PROTOCOL))
        results: list[Any] = []
        error: BaseException | None = None
        for rank in range(self.world_size):  # every answer, so that none is left unread
            try:
                results.append(self._receive(rank, "rpc", end))
            except WorkerDiedError:
                raise
            except Exception as exc:  # noqa: BLE001 - the rank's error, raised below
                error = error or exc
        if error is not None:
            raise error
        return results

    def check_health(self) -> None:
        if self._dead is None:
            self._check_ranks()
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor is shut down"
        self._finalizer()

    # ---- internals -----------------------------------------------------------------------

    def _check_ranks(self) -> None:
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._died(rank, "")

    def _died(self, rank: int, during: str) -> None:
        proc = self._procs[rank]
        proc.join(0.5)  # its exit code
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        self._dead = engine_dead(f"the worker process of rank {rank} (pid {proc.pid}) died "
                                 f"({how}){during}")
        raise WorkerDiedError(self._dead)

    def _broadcast(self, payload: bytes, if_unsent: Callable[[], None] | None = None) -> int:
        """Writes a message for every rank; returns where it ends in the ring's sequence of
        chunks, which the ranks' answers to it carry. `if_unsent` runs when the write stops
        (e.g. Ctrl-C) before any of the message is published."""
        written = self._writer.num_chunks_written
        try:
            self._writer.write(payload)
        except (BrokenPipeError, ConnectionError):  # a doorbell's rank is gone
            self._check_ranks()
            raise
        except BaseException:
            if self._writer.in_message and self._dead is None:  # cut off mid-message
                self._dead = "a message to the workers was cut off: start a new engine"
            elif self._writer.num_chunks_written == written and if_unsent is not None:
                if_unsent()
            raise
        return self._writer.num_chunks_written

    def _receive(self, rank: int, what: str, end: int) -> Any:
        """Rank `rank`'s answer to the message that ends at chunk `end`, waiting on every
        rank's sentinel too, so that a death raises at once.

        Answers to earlier messages are stale (their caller was interrupted, e.g. by Ctrl-C,
        while it waited) and dropped. During a step, the other ranks answer only to report an
        error.
        """
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        sources = {self._replies[rank]: rank}
        if what == "step":
            sources = {c: r for r, c in enumerate(self._replies)}
        while True:
            ready = wait([*sources, *sentinels])
            for conn in sorted((c for c in ready if c in sources),
                               key=lambda c: sources[c] != rank):
                source = sources[conn]
                try:
                    answer_end, kind, status, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    del sources[conn]  # closed: its sentinel tells how it ended
                    continue
                if answer_end < end and not (status == "error" and kind == "step"):
                    continue  # stale
                if status == "ok" and source == rank:
                    return value
                self._raise_remote(source, kind, value)
            dead = [sentinels[s] for s in ready if s in sentinels]
            if dead:
                self._died(dead[0], " " + DURING[what])

    def _raise_remote(self, rank: int, what: str, value: tuple) -> None:
        exc, text = value
        if what == "step":
            # The rank leaves after a failed step: its state no longer matches the driver's.
            self._dead = engine_dead(f"rank {rank} failed during a step ({exc!r})")
            raise WorkerDiedError(self._dead) from RemoteTraceback(text)
        if exc is None:
            exc = RuntimeError(f"rank {rank} raised an error that could not be pickled")
        raise exc from RemoteTraceback(text)


def _stop_ranks(procs: list, doorbells: list[Connection], replies: list[Connection],
                ring: ShmRingBuffer, comm_buffer: shared_memory.SharedMemory | None) -> None:
    """Closes the doorbells (each rank reads end-of-file and leaves), then waits, terminates
    and kills whatever is left, and frees the shared memory."""
    for doorbell in doorbells:
        doorbell.close()
    for proc in procs:
        proc.join(_SHUTDOWN_GRACE_S)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for reply in replies:
        reply.close()
    ring.close()
    if comm_buffer is not None:
        comm_buffer.close()
        try:
            comm_buffer.unlink()
        except FileNotFoundError:
            pass


# ---- the rank's process --------------------------------------------------------------------

def _answer(conn: Connection, end: int, kind: str, status: str, value: Any) -> None:
    """Sends an answer to the message that ended at chunk `end` (a "start", "step" or "rpc");
    `status` is "ok" (value: the result) or "error" (value: see `_error`)."""
    try:
        conn.send_bytes(pickle.dumps((end, kind, status, value),
                                     protocol=pickle.HIGHEST_PROTOCOL))
    except (BrokenPipeError, ConnectionError):
        pass  # the driver is gone: nobody to tell


def _error(exc: BaseException) -> tuple[BaseException | None, str]:
    """The error and its traceback as text; the error itself only where it pickles."""
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any error that does not survive pickling
        return None, text
    return exc, text


def _rank_main(rank: int, config: EngineConfig, hf_config: PretrainedConfig, model_dir: str,
               max_model_len: int, ring_handle: tuple, doorbell: Connection,
               reply: Connection, dist_args: tuple[str, str | None]) -> None:
    # Ctrl-C reaches the whole process group; the driver decides when its ranks stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ring = ShmRingBuffer(*ring_handle)
    try:
        from pagedllm.distributed.utils import init_worker_distributed
        from pagedllm.worker.worker import Worker

        init_worker_distributed(rank, config.tensor_parallel_size, *dist_args)
        worker = Worker(config, hf_config, Path(model_dir), max_model_len,
                        StepProfiler(enabled=config.profile))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the driver
        _answer(reply, 0, "start", "error", _error(exc))
        ring.close()
        return
    _answer(reply, 0, "start", "ok", (worker.num_kv_blocks, worker.num_cpu_blocks))
    reader = RingReader(ring, rank, doorbell)
    decoder = StepDecoder()
    profiler = worker.profiler  # profile=True: the rank's own sections, and its idle time
    try:
        while True:
            try:
                with profiler.section("wait for a message"):
                    payload = reader.read()
            except EOFError:
                return  # the driver closed the ring (shutdown) or died
            end = reader.num_chunks_read
            kind, *body = pickle.loads(payload)
            if kind == _EXECUTE:
                try:
                    with profiler.section("step"):
                        with profiler.section("decode step"):
                            scheduler_output = decoder.decode(StepMessage.from_wire(body[0]))
                        output = worker.execute_model(scheduler_output)
                        # Only rank 0 samples (the others' LM heads gather their logits to it).
                        rows = (encode_runner_output(scheduler_output, output) if rank == 0
                                else None)
                        if rank == 0:
                            _answer(reply, end, "step", "ok", rows)
                except BaseException as exc:  # noqa: BLE001 - to the driver, then leave
                    _answer(reply, end, "step", "error", _error(exc))
                    return
                profiler.num_steps += 1
            else:
                method, args, kwargs = body
                try:
                    result = call_worker(worker, method, args, kwargs)
                except Exception as exc:  # noqa: BLE001 - raised in the driver
                    _answer(reply, end, "rpc", "error", _error(exc))
                else:
                    _answer(reply, end, "rpc", "ok", result)
    finally:
        ring.close()
