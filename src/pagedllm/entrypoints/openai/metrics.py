"""Prometheus metrics and the periodic stats log line of one server, fed by the engine thread.

Every server owns a CollectorRegistry, so several servers (or tests) can live in one process.
Names follow vLLM's with the `pagedllm:` prefix; counters get prometheus' `_total` suffix.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import EngineStats
    from pagedllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)


class ServerMetrics:
    """The server's metrics; `observe` is the engine thread's StepListener.

    Gauges mirror the latest EngineStats; counters advance by the change of the engine's
    monotonic totals, so they stay correct however often `observe` runs. Latency histograms
    are observed once per finished request from its RequestOutput timestamps.
    """

    def __init__(self, model_name: str, log_interval_s: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        self.log_interval_s = log_interval_s
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.num_running = gauge("pagedllm:num_requests_running", "Requests being computed.")
        self.num_waiting = gauge("pagedllm:num_requests_waiting",
                                 "Requests queued (new or preempted).")
        self.kv_usage = gauge("pagedllm:kv_cache_usage_perc",
                              "Fraction of KV cache blocks in use (0 to 1).")
        self.num_preemptions = counter("pagedllm:num_preemptions", "Preemptions since start.")
        self.prompt_tokens = counter("pagedllm:prompt_tokens", "Prompt tokens of requests that "
                                     "produced a first token.")
        self.generation_tokens = counter("pagedllm:generation_tokens", "Generated tokens.")
        self._success = Counter("pagedllm:request_success", "Finished requests by reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.ttft = histogram("pagedllm:time_to_first_token_seconds",
                              "Arrival to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("pagedllm:time_per_output_token_seconds",
                              "Mean time between output tokens, per request.", _TPOT_BUCKETS)
        self.e2e = histogram("pagedllm:e2e_request_latency_seconds",
                             "Arrival to last token.", _E2E_BUCKETS)
        self.num_swapped = gauge("pagedllm:num_requests_swapped",
                                 "Requests whose KV blocks are swapped out to CPU memory.")
        self.prefix_queries = counter("pagedllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("pagedllm:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.")
        # Speculative decoding (vLLM's spec_decode names); zero without it.
        self.spec_drafts = counter("pagedllm:spec_decode_num_drafts",
                                   "Sequence-steps that verified speculative proposals.")
        self.spec_draft_tokens = counter("pagedllm:spec_decode_num_draft_tokens",
                                         "Speculative tokens proposed.")
        self.spec_accepted_tokens = counter("pagedllm:spec_decode_num_accepted_tokens",
                                            "Speculative tokens accepted.")
        self._spec_accepted_per_pos = Counter(
            "pagedllm:spec_decode_num_accepted_tokens_per_pos",
            "Speculative tokens accepted, by position in the proposal.",
            labels + ["position"], registry=self.registry)
        self._log_spec = [0, 0, 0]  # drafts, draft tokens, accepted tokens since the last line
        # Last seen engine totals, for counter deltas.
        self._last_totals: dict[str, int] = {}
        # Requests that produced a first token and are not finished yet.
        self._started: set[str] = set()
        # For the log line: token counts since the last line.
        self._last_log = time.monotonic()
        self._log_prompt_tokens = 0
        self._log_generation_tokens = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Updates every metric from one engine iteration (engine thread)."""
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        used = stats.num_blocks - stats.num_free_blocks
        self.kv_usage.set(used / stats.num_blocks if stats.num_blocks else 0.0)
        self.num_preemptions.inc(self._delta("num_preemptions", stats.num_preemptions))
        num_generated = self._delta("num_generation_tokens", stats.num_generation_tokens)
        self.generation_tokens.inc(num_generated)
        self._log_generation_tokens += num_generated
        self.num_swapped.set(stats.num_swapped)
        self.prefix_queries.inc(self._delta("prefix_cache_queries", stats.prefix_cache_queries))
        self.prefix_hits.inc(self._delta("prefix_cache_hits", stats.prefix_cache_hits))
        self._observe_spec_decode(stats)
        for output in outputs:
            self._observe_request(output)
        self._maybe_log(stats)

    def _observe_spec_decode(self, stats: EngineStats) -> None:
        deltas = [self._delta(f"spec_decode_{name}", getattr(stats, f"spec_decode_{name}"))
                  for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")]
        for metric, delta, i in zip((self.spec_drafts, self.spec_draft_tokens,
                                     self.spec_accepted_tokens), deltas, range(3)):
            metric.inc(delta)
            self._log_spec[i] += delta
        for pos, total in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            self._spec_accepted_per_pos.labels(self._model_name, str(pos)).inc(
                self._delta(f"spec_decode_accepted_pos{pos}", total))

    def _delta(self, name: str, total: int) -> int:
        delta = total - self._last_totals.get(name, 0)
        self._last_totals[name] = total
        return max(delta, 0)

    def _observe_request(self, output: RequestOutput) -> None:
        times = output.metrics
        rid = output.request_id
        if "first_token" in times and rid not in self._started:
            self._started.add(rid)
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self._log_prompt_tokens += len(output.prompt_token_ids)
            if "arrival" in times:
                self.ttft.observe(max(times["first_token"] - times["arrival"], 0.0))
        if not output.finished:
            return
        self._started.discard(rid)
        reason = output.outputs[0].finish_reason if output.outputs else None
        self._success.labels(self._model_name, reason or "abort").inc()
        if reason == "abort" or "finished" not in times:
            return
        if "arrival" in times:
            self.e2e.observe(max(times["finished"] - times["arrival"], 0.0))
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if "first_token" in times and num_tokens > 1:
            decode_s = max(times["finished"] - times["first_token"], 0.0)
            self.tpot.observe(decode_s / (num_tokens - 1))

    def _maybe_log(self, stats: EngineStats) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.log_interval_s:
            return
        busy = stats.num_running or stats.num_waiting or stats.num_swapped
        if busy or self._log_prompt_tokens or self._log_generation_tokens:
            used = stats.num_blocks - stats.num_free_blocks
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                "Running: %d reqs, Waiting: %d reqs, Swapped: %d reqs, KV cache usage: %.1f%%",
                self._log_prompt_tokens / elapsed,
                self._log_generation_tokens / elapsed,
                stats.num_running,
                stats.num_waiting,
                stats.num_swapped,
                100.0 * used / stats.num_blocks if stats.num_blocks else 0.0,
            )
        drafts, draft_tokens, accepted = self._log_spec
        if drafts:
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, "
                "Drafted: %d tokens, Acceptance rate: %.1f%%",
                1 + accepted / drafts, accepted, draft_tokens, 100.0 * accepted / draft_tokens)
            self._log_spec = [0, 0, 0]
        self._last_log = now
        self._log_prompt_tokens = 0
        self._log_generation_tokens = 0
