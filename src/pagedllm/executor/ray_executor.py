"""The `ray` backend: one Ray actor per rank, on this machine or across a Ray cluster.

    driver (engine process)                                 rank r (Ray actor)
    StepEncoder.encode -> pickle (once) -> actor.execute_model.remote(payload) for every rank
                                              -> StepDecoder.decode -> Worker.execute_model
    decode_runner_output <- ray.wait/ray.get <- rows (rank 0), None (the others)

The step message is the `mp` backend's (step_message.py), pickled once by the driver; Ray
carries it: inlined in each actor call while small, else put once in the object store and
passed by reference. Actor calls from one caller run in the order they were made, so each rank
sees the messages in order, as the shared-memory ring guarantees for `mp`.

Where the ranks run: with `RAY_ADDRESS` set (a cluster started by `ray start --head` and
`ray start --address=...`), the driver joins that cluster; otherwise it starts a small local
Ray instance (no dashboard) and stops it at shutdown. The
ranks reserve one CPU each through a placement group (packed onto as few nodes as hold them).

Under tensor parallelism the ranks join a gloo group at rank 0's node; when they all share
one node, their collectives go through one shared buffer instead (distributed/shm_comm.py),
as under `mp`, unless PAGEDLLM_TP_COMM=process_group keeps them in gloo. Each rank takes its share of its node's cores, pinned, as the `mp` ranks do.

A rank whose actor dies (killed, out of memory, its node lost) turns into a WorkerDiedError as
soon as Ray reports it (about a second); the driver never waits on one reference alone, so an
error from any rank surfaces even while the others are blocked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import weakref
from collections.abc import Callable, Container
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedllm.distributed.utils import use_shm_collectives
from pagedllm.executor.abstract import DURING, Executor, RemoteTraceback, engine_dead
from pagedllm.executor.ray_worker import RankLayout, RayWorkerWrapper
from pagedllm.executor.shm_broadcast import WorkerDiedError
from pagedllm.executor.step_message import StepEncoder, decode_runner_output
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pagedllm.config import EngineConfig
    from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# Messages up to this size travel inside each actor call (Ray inlines arguments below 100 KiB);
# larger ones (a big first prefill) are put in the object store once, for every rank.
_INLINE_BYTES = 64 * 1024
# Seconds to wait for the cluster to grant the ranks' CPUs before refusing to start.
_PLACEMENT_TIMEOUT_S = 60.0
# Seconds to wait for RAY_ADDRESS's head node to accept a connection.
_CONNECT_TIMEOUT_S = 10.0
# Seconds between looks at the ranks while waiting for an answer (errors arrive at once
# anyway; this bounds how long a Ctrl-C waits to be seen).
_POLL_S = 1.0


class RayDistributedExecutor(Executor):
    """Ranks as Ray actors, driven by the same step messages as `mp`.

    Attributes read by benchmarks and tests: `num_steps`, `last_message_bytes`,
    `total_message_bytes`, `worker_pids`, `owns_ray` (True when this executor called
    ray.init, starting a local instance or joining RAY_ADDRESS's cluster; its shutdown then
    calls ray.shutdown, which stops a local instance and leaves a cluster running).
    """

    def __init__(self, config: EngineConfig, hf_config: PretrainedConfig, model_dir: Path,
                 max_model_len: int, profiler: StepProfiler | None = None) -> None:
        self.world_size = config.tensor_parallel_size
        self.profiler = profiler or StepProfiler()
        self.num_steps = 0
        self.last_message_bytes = 0
        self.total_message_bytes = 0
        self._encoder = StepEncoder()
        self._dead: str | None = None  # why no step can run any more
        self._actors: list[Any] = []
        self._pids: list[int] = []
        self._nodes: list[str] = []
        self._placement: list[Any] = []  # the placement group, once made
        self.owns_ray = False
        if not ray.is_initialized():
            self.owns_ray = True
            _init_ray(self.world_size, config.device.startswith("cuda"))
        # Runs at shutdown(), when the executor is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_ranks, self._actors, self._placement,
                                           self.owns_ray)
        try:
            self._start(config, hf_config, model_dir, max_model_len)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d Ray actor(s) ready (pids %s on %s)", self.world_size,
                    ", ".join(map(str, self._pids)), ", ".join(sorted(set(self._nodes))))

    def _start(self, config: EngineConfig, hf_config: PretrainedConfig, model_dir: Path,
               max_model_len: int) -> None:
        # On CUDA each rank takes one GPU, which Ray makes its only visible device.
        num_gpus = 1 if config.device.startswith("cuda") else 0
        bundle = {"CPU": 1, "GPU": 1} if num_gpus else {"CPU": 1}
        group = placement_group([bundle] * self.world_size, strategy="PACK")
        self._placement.append(group)
        ready, _ = ray.wait([group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"the Ray cluster did not grant {self.world_size} x {bundle} for the ranks within "
                f"{_PLACEMENT_TIMEOUT_S:.0f} s (available: {ray.available_resources()}); "
                f"add nodes or lower tensor_parallel_size")
        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=0)(RayWorkerWrapper)
        for rank in range(self.world_size):
            self._actors.append(actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank),
            ).remote(rank, self.world_size))
        infos = self._gather([a.node_info.remote() for a in self._actors], "start")
        self._nodes = [node_ip for _, node_ip, _ in infos]
        self._pids = [pid for _, _, pid in infos]
        node_ranks: dict[str, list[int]] = {}
        for rank, (node_id, *_) in enumerate(infos):
            node_ranks.setdefault(node_id, []).append(rank)
        port = self._gather([self._actors[0].free_port.remote()], "start")[0]
        # One node: the collectives go through shared memory, as under `mp`; else gloo
        # (or gloo on one node too, where PAGEDLLM_TP_COMM=process_group asks for it).
        one_node = self.world_size > 1 and len(node_ranks) == 1
        shm_name = (self._gather([self._actors[0].create_comm_buffer.remote()], "start")[0]
                    if use_shm_collectives(one_node) else None)
        init_method = f"tcp://{'127.0.0.1' if one_node else infos[0][1]}:{port}"
        omp = os.environ.get("OMP_NUM_THREADS")
        layouts = [RankLayout(node_ranks[node_id].index(rank), len(node_ranks[node_id]),
                              init_method, shm_name, omp)
                   for rank, (node_id, *_) in enumerate(infos)]
        sizes = self._gather([
            actor.start.remote(config, hf_config, str(model_dir), max_model_len, layout)
            for actor, layout in zip(self._actors, layouts)], "start")
        if shm_name is not None:
            self._gather([self._actors[0].unlink_comm_buffer.remote()], "start")
        self._num_kv_blocks = min(num_kv for num_kv, _ in sizes)
        self._num_cpu_blocks = min(num_cpu for _, num_cpu in sizes)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self._num_cpu_blocks

    @property
    def worker_pids(self) -> list[int]:
        return list(self._pids)

    def execute_model(self, scheduler_output: SchedulerOutput,
                      live_request_ids: Container[str] = ()) -> ModelRunnerOutput:
        self.check_health()
        with self.profiler.section("encode step"):
            try:
                message = self._encoder.encode(scheduler_output, live_request_ids)
                payload = pickle.dumps(message.to_wire(), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException:
                self._encoder.forget_all()  # encoded (in part), never sent
                raise
        self.num_steps += 1
        self.last_message_bytes = len(payload)
        self.total_message_bytes += len(payload)
        with self.profiler.section("worker step"):
            refs = self._submit(lambda actor, arg: actor.execute_model.remote(arg), payload)
            rows = self._gather(refs, "step")[0]
        return decode_runner_output(scheduler_output, rows)

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        self.check_health()
        refs = self._submit(lambda actor, _: actor.rpc.remote(method, args, kwargs), None)
        return self._gather(refs, "rpc")

    def check_health(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor is shut down"
        self._finalizer()

    # ---- internals -----------------------------------------------------------------------

    def _submit(self, call: Callable[[Any, Any], Any], payload: bytes | None) -> list[Any]:
        """One call per rank, rank 0 first. A message is put in the object store once when it
        is too large to inline. Interrupted (Ctrl-C) before any call is made, the encoder
        forgets what it sent; between two calls, the ranks no longer agree and the executor
        is dead."""
        arg = payload
        if payload is not None and len(payload) > _INLINE_BYTES:
            try:
                arg = ray.put(payload)
            except BaseException:
                self._encoder.forget_all()
                raise
        refs: list[Any] = []
        try:
            for actor in self._actors:
                refs.append(call(actor, arg))
        except BaseException:
            if refs:
                self._dead = "a message to the workers was cut off: start a new engine"
            elif payload is not None:
                self._encoder.forget_all()
            raise
        return refs

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every rank's answer, in rank order; the first error from any rank raises at once
        (a dead actor as WorkerDiedError; a failed start or rpc as the rank's own error)."""
        index = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        rpc_error: BaseException | None = None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref, timeout=0)
                except RayActorError as exc:
                    self._died(rank, what, exc)
                except RayTaskError as exc:
                    if what == "start":  # e.g. a weight that does not fit: as `uni` says it
                        raise _cause(exc)
                    if what == "rpc":  # the rank keeps running: raised once all answer
                        rpc_error = rpc_error or _cause(exc)
                        continue
                    self._dead = engine_dead(f"rank {rank} failed {DURING[what]} "
                                             f"({exc.cause!r})")
                    raise WorkerDiedError(self._dead) from RemoteTraceback(str(exc))
                except GetTimeoutError:  # cannot happen for a ready ref; keep waiting
                    pending.append(ref)
        if rpc_error is not None:
            raise rpc_error
        return results

    def _died(self, rank: int, what: str, exc: BaseException) -> None:
        pid = f"pid {self._pids[rank]}, " if rank < len(self._pids) else ""
        node = f"node {self._nodes[rank]}" if rank < len(self._nodes) else "its node"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._dead = engine_dead(f"the Ray actor of rank {rank} ({pid}{node}) died "
                                 f"{DURING[what]} ({reason})")
        raise WorkerDiedError(self._dead) from exc



def _cause(exc: RayTaskError) -> BaseException:
    """The rank's own error, with its traceback chained as the cause."""
    cause = exc.cause if isinstance(exc.cause, BaseException) else None
    if cause is None:
        cause = RuntimeError(f"a rank raised an error that could not be pickled: {exc}")
    cause.__cause__ = RemoteTraceback(str(exc))
    return cause


def _init_ray(world_size: int, use_gpus: bool) -> None:
    """Joins the cluster at RAY_ADDRESS, or starts a small local one (no dashboard, the
    workers' logs kept out of the driver's output, this machine's GPUs only for CUDA ranks).

    NOTE: the local instance counts this machine's cores as its CPUs (at least one per rank),
    as Ray does by default, so that a second engine in this process finds CPUs for its ranks;
    Ray's CPUs are only a count here (it starts one idle worker process either way)."""
    address = os.environ.get("RAY_ADDRESS")
    common = {"include_dashboard": False, "log_to_driver": False,
              "configure_logging": False}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise RuntimeError(
                f"could not join the Ray cluster at RAY_ADDRESS={address!r}: {exc} (is "
                f"`ray start --head` running there? A cluster with token authentication, "
                f"Ray's default, also needs RAY_AUTH_MODE=token and its token here: "
                f"~/.ray/auth_token or RAY_AUTH_TOKEN)") from exc
    else:
        ray.init(address="local", num_cpus=max(world_size, os.cpu_count() or 1),
                 num_gpus=None if use_gpus else 0,
                 **common)


def _check_reachable(address: str) -> None:
    """Refuses a host:port nobody listens on within seconds (ray.init would retry for many
    minutes); other forms ("auto", "ray://...") go to ray.init as they are."""
    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RuntimeError(f"no Ray cluster answers at RAY_ADDRESS={address!r} ({exc}): start "
                           f"one there with `ray start --head --port={port}`, or unset "
                           f"RAY_ADDRESS to run the ranks on a local Ray instance") from exc


def _stop_ranks(actors: list[Any], placement: list[Any], owns_ray: bool) -> None:
    """Kills the actors and frees their placement group; stops Ray if this executor started
    it (the local instance's processes go with it)."""
    if not ray.is_initialized():
        return
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)
    for group in placement:
        with contextlib.suppress(Exception):  # already gone with its cluster
            remove_placement_group(group)
    if owns_ray:
        ray.shutdown()
