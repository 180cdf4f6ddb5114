"""The control plane at scale (issue 23): is the driver's per-step message small?

Measures, on this machine, the per-step control message of executor/step_message.py for a
steady decode of `batch` sequences at `context` tokens each (Llama-2's 32,000-token vocabulary,
blocks of 16 tokens, contexts staggered so that 1/16 of the sequences take a new block each
step, as in a long-running batch):
- its size in bytes (pickled, as both backends send it), against the whole state of the step
  pickled as it is (every prompt, output and block table: what a protocol without diffs sends);
- the time to build the step (the scheduler's SchedulerOutput), to encode and pickle it (the
  driver) and to unpickle and decode it (each rank);
- the time to write it into the shared-memory ring of shm_broadcast.py for N reader processes
  (the driver's cost) and until every reader has it (delivery), and the time to hand it to one
  TCP socket (the cost of each message to another node).

It then projects the driver's cost per step at 8, 64 and 512 ranks for Llama-2-70B against that
model's compute time per step on A100-class GPUs (a roofline: see ASSUMPTIONS).

    python -m pagedllm.benchmarks.control_plane [--output-json benchmarks/results/control_plane.json]

NOTE: past the package's ~350 lines on purpose: the measurements and the projection built on
them stay in one module, so the JSON and the table cannot disagree on what was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pagedllm.executor.shm_broadcast import RingReader, RingWriter, ShmRingBuffer

BLOCK_SIZE = 16
VOCAB_SIZE = 32_000  # Llama-2's

# Llama-2-70B and the hardware the projection assumes. NOTE: a roofline, not a measurement:
# a decode step reads every weight and the batch's KV cache once and does 2 FLOPs per weight
# per token (plus attention's); its time is the larger of bytes / bandwidth and FLOPs / peak,
# both at `efficiency`. Two layouts of the ranks:
# - "tp8_pp": tensor parallelism over the 8 GPUs of a node and pipeline stages across nodes
#   (vLLM's advice for more than one node). A step still crosses every layer, so its time is
#   the whole model's on 8 GPUs whatever the number of nodes, and every rank still needs the
#   step's message (each stage holds the KV cache of its layers).
# - "ideal_tp": every rank takes 1/ranks of every layer with no communication cost: the
#   shortest step the hardware allows, so the control plane's largest share (an upper bound;
#   the all-reduces of a 64-node TP group would cost more than the step itself).
MODEL = {"name": "Llama-2-70B", "num_layers": 80, "hidden_size": 8192, "num_heads": 64,
         "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 28_672,
         "vocab_size": VOCAB_SIZE, "bytes_per_param": 2}
ASSUMPTIONS = {
    "gpu": "A100-80GB SXM (the PagedAttention paper's GPUs)",
    "hbm_bytes_per_s": 2.039e12, "peak_bf16_flops": 312e12, "efficiency": 0.6,
    "ranks_per_node": 8, "nic_bytes_per_s": 12.5e9,  # one 100 Gb/s NIC at the driver
    "transport": "one shared-memory ring per node (the driver's node: the ring measured here; "
                 "each other node: one TCP send of the message from the driver, measured here "
                 "on loopback, plus its bytes on the NIC, then that node's own ring)",
}
PROJECTED_RANKS = (8, 64, 512)


def model_params(m: dict = MODEL) -> int:
    h, kv = m["hidden_size"], m["num_kv_heads"] * m["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m["intermediate_size"]
    return m["num_layers"] * per_layer + 2 * m["vocab_size"] * h  # untied embedding and head


def step_compute_s(batch: int, context: int, ranks: int, a: dict = ASSUMPTIONS,
                   m: dict = MODEL) -> float:
    """Roofline time of one decode step of `batch` sequences at `context` tokens on `ranks`."""
    params = model_params(m)
    kv_bytes_per_token = m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 2 * 2
    bytes_read = params * m["bytes_per_param"] + batch * context * kv_bytes_per_token
    attention_flops = 4 * batch * context * m["num_layers"] * m["num_heads"] * m["head_dim"]
    flops = 2 * params * batch + attention_flops
    eff = a["efficiency"]
    return max(bytes_read / (ranks * a["hbm_bytes_per_s"] * eff),
               flops / (ranks * a["peak_bf16_flops"] * eff))


# ---- the workload: a steady decode ------------------------------------------------------------

@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    outputs: list[int]
    block_table: list[int]


class DecodeWorkload:
    """`batch` running sequences near `context` tokens, each generating one token a step."""

    def __init__(self, batch: int, context: int, seed: int = 0) -> None:
        from pagedllm.sampling_params import SamplingParams

        rng = self.rng = random.Random(seed)
        self.params = [SamplingParams(temperature=0.0, max_tokens=context) for _ in range(batch)]
        self.seqs = []
        next_block = 0
        for i in range(batch):
            length = max(2, context - i % BLOCK_SIZE)  # staggered block boundaries
            num_out = min(length - 1, 16)
            tokens = [rng.randrange(VOCAB_SIZE) for _ in range(length)]
            num_blocks = -(-length // BLOCK_SIZE)
            table = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks + 4  # room to grow
            self.seqs.append(_Seq(f"req-{i}", tokens[:-num_out], tokens[-num_out:], table))
        self._next_block = next_block

    def step(self):
        """The next step's SchedulerOutput: the last token of every sequence."""
        from pagedllm.core.interface import ScheduledRequest, SchedulerOutput

        scheduled = []
        for seq, params in zip(self.seqs, self.params):
            position = len(seq.prompt) + len(seq.outputs) - 1
            if position // BLOCK_SIZE >= len(seq.block_table):
                seq.block_table.append(self._next_block)
                self._next_block += 1
            scheduled.append(ScheduledRequest(
                request_id=seq.request_id, seq_index=0, seq_id=f"{seq.request_id}#0",
                token_ids=[seq.outputs[-1]], start_position=position,
                block_table=seq.block_table, sample=True, sampling_params=params,
                prompt_token_ids=seq.prompt, output_token_ids=seq.outputs,
                min_tokens_stop_ids=[]))
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=len(scheduled))

    def advance(self) -> None:
        """Every sequence samples one token (the scheduler's update_from_output)."""
        for seq in self.seqs:
            seq.outputs.append(self.rng.randrange(VOCAB_SIZE))

    @property
    def live_request_ids(self) -> set[str]:
        return {seq.request_id for seq in self.seqs}


def measure_message(batch: int, context: int, num_steps: int) -> dict:
    """Bytes and times of `num_steps` steady decode steps (after the first, which sends every
    request in full); medians, in bytes and microseconds. The garbage collector is off while
    timing, as in timeit: a collection's pause lands on whichever step triggers it."""
    gc.collect()
    gc.disable()
    try:
        return _measure_message(batch, context, num_steps)
    finally:
        gc.enable()


def _measure_message(batch: int, context: int, num_steps: int) -> dict:
    from pagedllm.executor.step_message import StepDecoder, StepEncoder, StepMessage

    workload = DecodeWorkload(batch, context)
    encoder, decoder = StepEncoder(), StepDecoder()
    live = workload.live_request_ids
    first = workload.step()
    first_payload = pickle.dumps(encoder.encode(first, live).to_wire(), pickle.HIGHEST_PROTOCOL)
    decoder.decode(StepMessage.from_wire(pickle.loads(first_payload)))
    workload.advance()
    sizes, build, encode, decode, payloads, full = [], [], [], [], [], []
    full_bytes = 0
    for i in range(num_steps):
        t0 = time.perf_counter()
        scheduler_output = workload.step()
        t1 = time.perf_counter()
        payload = pickle.dumps(encoder.encode(scheduler_output, live).to_wire(),
                               pickle.HIGHEST_PROTOCOL)
        t2 = time.perf_counter()
        decoder.decode(StepMessage.from_wire(pickle.loads(payload)))
        t3 = time.perf_counter()
        if i < 5:  # the whole state of the step, as it is, for comparison
            t = time.perf_counter()
            full_bytes = len(pickle.dumps(scheduler_output, pickle.HIGHEST_PROTOCOL))
            full.append(time.perf_counter() - t)
        workload.advance()
        sizes.append(len(payload))
        payloads.append(payload)
        build.append(t1 - t0)
        encode.append(t2 - t1)
        decode.append(t3 - t2)
    median_size = statistics.median_low(sizes)
    return {
        "batch": batch, "context": context,
        "first_step_bytes": len(first_payload),
        "message_bytes": median_size, "message_bytes_max": max(sizes),
        "full_state_bytes": full_bytes, "full_state_pickle_us": statistics.median(full) * 1e6,
        "build_us": statistics.median(build) * 1e6,
        "encode_us": statistics.median(encode) * 1e6,
        "decode_us": statistics.median(decode) * 1e6,
        "_payload": payloads[sizes.index(median_size)],
    }


# ---- transports ---------------------------------------------------------------------------------

def _ring_reader(handle: tuple, index: int, doorbell) -> None:
    ring = ShmRingBuffer(*handle)
    reader = RingReader(ring, index, doorbell)
    try:
        while True:
            reader.read()
    except EOFError:
        pass
    finally:
        ring.close()


def measure_ring(payloads: list[bytes], num_readers: int, repeats: int) -> list[dict]:
    """For each payload: the driver's time to write it into the ring for `num_readers` reader
    processes, and the time until every reader has read it (medians, microseconds)."""
    ctx = multiprocessing.get_context("spawn")
    ring = ShmRingBuffer(num_readers=num_readers)
    doorbells, procs = [], []
    for index in range(num_readers):
        bell_reader, bell_writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_ring_reader, args=(ring.handle(), index, bell_reader),
                           daemon=True)
        proc.start()
        bell_reader.close()
        doorbells.append(bell_writer)
        procs.append(proc)

    def check_readers() -> None:
        if not all(p.is_alive() for p in procs):
            raise RuntimeError("a ring reader died")

    writer = RingWriter(ring, doorbells, check_readers)
    counters = ring._counters
    results = []
    try:
        for payload in payloads:
            write, deliver = [], []
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                writer.write(payload)
                t1 = time.perf_counter()
                written = counters[0]
                while min(counters[1 : 1 + num_readers]) < written:
                    os.sched_yield()
                t2 = time.perf_counter()
                write.append(t1 - t0)
                deliver.append(t2 - t0)
            results.append({"write_us": statistics.median(write[3:]) * 1e6,
                            "deliver_us": statistics.median(deliver[3:]) * 1e6})
    finally:
        for doorbell in doorbells:
            doorbell.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        ring.close()
    return results


def _tcp_drain(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while conn.recv(1 << 20):
            pass


def measure_tcp_send(payloads: list[bytes], repeats: int) -> list[float]:
    """The driver's time to hand each payload to a loopback TCP socket (the cost of one message
    to another node; the wire time is added in the projection), median microseconds."""
    ctx = multiprocessing.get_context("spawn")
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = ctx.Process(target=_tcp_drain, args=(server.getsockname()[1],), daemon=True)
        proc.start()
        conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results = []
    with conn:
        for payload in payloads:
            header = len(payload).to_bytes(8, "little")
            times = []
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                conn.sendall(header + payload)
                times.append(time.perf_counter() - t0)
                time.sleep(0)
            results.append(statistics.median(times[3:]) * 1e6)
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return results


# ---- the projection ---------------------------------------------------------------------------

def project(row: dict, ring_fit: tuple[float, float], a: dict = ASSUMPTIONS) -> list[dict]:
    """The driver's cost per step at each of PROJECTED_RANKS, against the step's compute time.

    Driver = build + encode (once, whatever the ranks) + its node's ring write for its ranks +
    one TCP send (and the bytes on its NIC) per other node. `ring_fit` is the ring write's
    (fixed µs, µs per reader) fitted on the readers measured here.
    """
    fixed, per_reader = ring_fit
    out = []
    for ranks in PROJECTED_RANKS:
        per_node = min(ranks, a["ranks_per_node"])
        other_nodes = math.ceil(ranks / a["ranks_per_node"]) - 1
        ring_us = fixed + per_reader * per_node
        send_us = other_nodes * (row["tcp_send_us"]
                                 + row["message_bytes"] / a["nic_bytes_per_s"] * 1e6)
        driver_us = row["build_us"] + row["encode_us"] + ring_us + send_us
        tp8_us = step_compute_s(row["batch"], row["context"], per_node, a) * 1e6
        ideal_us = step_compute_s(row["batch"], row["context"], ranks, a) * 1e6
        # Without diffs: the whole state through the same path.
        full_us = row["build_us"] + row["full_state_pickle_us"] + ring_us + other_nodes * (
            row["tcp_send_us"] + row["full_state_bytes"] / a["nic_bytes_per_s"] * 1e6)
        out.append({"batch": row["batch"], "context": row["context"], "ranks": ranks,
                    "nodes": other_nodes + 1, "message_bytes": row["message_bytes"],
                    "driver_us": driver_us, "ring_us": ring_us, "remote_send_us": send_us,
                    "step_ms_tp8_pp": tp8_us / 1e3, "share_tp8_pp": driver_us / tp8_us,
                    "step_ms_ideal_tp": ideal_us / 1e3, "share_ideal_tp": driver_us / ideal_us,
                    "full_state_bytes": row["full_state_bytes"], "full_state_driver_us": full_us,
                    "full_state_share_tp8_pp": full_us / tp8_us})
    return out


def fit_ring(readers: list[int], ring_rows: dict[int, list[dict]], index: int
             ) -> tuple[float, float]:
    """(fixed µs, µs per reader) of the ring write for payload `index`, by least squares over
    the reader counts measured (the doorbells are the part that grows with readers)."""
    xs = readers
    ys = [ring_rows[n][index]["write_us"] for n in readers]
    if len(xs) == 1:
        return ys[0] / 2, ys[0] / 2 / xs[0]  # no slope to fit: half and half
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def run(batches: list[int], contexts: list[int], readers: list[int], num_steps: int,
        repeats: int) -> dict:
    rows = [measure_message(b, c, num_steps) for b in batches for c in contexts]
    payloads = [row.pop("_payload") for row in rows]
    ring_rows = {n: measure_ring(payloads, n, repeats) for n in readers}
    for row, tcp_us in zip(rows, measure_tcp_send(payloads, repeats)):
        row["tcp_send_us"] = tcp_us
    for i, row in enumerate(rows):
        row["ring"] = {str(n): ring_rows[n][i] for n in readers}
    projection = [p for i, row in enumerate(rows)
                  for p in project(row, fit_ring(readers, ring_rows, i))]
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "settings": {"block_size": BLOCK_SIZE, "vocab_size": VOCAB_SIZE, "steps": num_steps,
                     "repeats": repeats, "readers": readers},
        "model": {**MODEL, "params": model_params()}, "assumptions": ASSUMPTIONS,
        "measured": rows, "projection": projection,
    }


def print_tables(result: dict) -> None:
    readers = result["settings"]["readers"]
    ring_cols = "".join(f" {'ring ' + str(n) + 'r w/d':>16}" for n in readers)
    print(f"Measured (this machine, load {result['machine']['load_average'][0]:.1f}; "
          f"medians; ring: write / delivered to all readers, µs)")
    print(f"{'batch':>5} {'ctx':>5} {'msg B':>7} {'full B':>9} {'build':>7} {'encode':>7} "
          f"{'decode':>7} {'tcp':>6}{ring_cols}")
    for r in result["measured"]:
        ring = "".join(f" {r['ring'][str(n)]['write_us']:>7.1f}/"
                       f"{r['ring'][str(n)]['deliver_us']:<8.1f}" for n in readers)
        print(f"{r['batch']:>5} {r['context']:>5} {r['message_bytes']:>7} "
              f"{r['full_state_bytes']:>9} {r['build_us']:>7.0f} {r['encode_us']:>7.0f} "
              f"{r['decode_us']:>7.0f} {r['tcp_send_us']:>6.1f}{ring}")
    a = result["assumptions"]
    print(f"\nProjection: {result['model']['name']} ({result['model']['params'] / 1e9:.1f}B "
          f"params, bf16) on {a['gpu']}, roofline at {a['efficiency']:.0%} efficiency, "
          f"{a['ranks_per_node']} ranks per node")
    print(f"{'batch':>5} {'ctx':>5} {'ranks':>5} {'msg B':>7} {'driver µs':>9} "
          f"{'TP8xPP ms':>9} {'share':>6} {'ideal ms':>8} {'share':>7} "
          f"{'no-diff µs':>10} {'share':>6}")
    for p in result["projection"]:
        print(f"{p['batch']:>5} {p['context']:>5} {p['ranks']:>5} {p['message_bytes']:>7} "
              f"{p['driver_us']:>9.0f} {p['step_ms_tp8_pp']:>9.2f} {p['share_tp8_pp']:>6.1%} "
              f"{p['step_ms_ideal_tp']:>8.2f} {p['share_ideal_tp']:>7.1%} "
              f"{p['full_state_driver_us']:>10.0f} {p['full_state_share_tp8_pp']:>6.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedllm.benchmarks.control_plane",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="reader processes of the shared-memory ring")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per configuration")
    parser.add_argument("--repeats", type=int, default=50, help="sends timed per payload")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("batches", "contexts", "readers"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name} takes integers >= 1")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats take integers >= 1")
    result = run(args.batches, args.contexts, sorted(set(args.readers)), args.steps,
                 args.repeats)
    print_tables(result)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.output_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
