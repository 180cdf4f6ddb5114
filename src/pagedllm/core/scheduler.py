"""Iteration-level scheduling: which requests run each step and how many tokens each computes."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.interface import (
    ModelRunnerOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.core.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step."""

    # Most requests in RUNNING at once.
    max_num_seqs: int
    # Most tokens computed in one forward pass (prefill chunks + decodes).
    max_num_batched_tokens: int
    # Context length cap: a request stops with "length" when it reaches it.
    max_model_len: int


class Scheduler:
    """First-come-first-served continuous batching with chunked prefill and recompute preemption.

    Each step:
      1. RUNNING requests, oldest first, get the tokens they lack (1 for a decode, the next
         chunk for a partly prefilled prompt) within the token budget. When a request cannot
         get a block, the latest-arrived running request is preempted: its blocks are freed and
         it goes back to WAITING to be recomputed later.
      2. If nothing was preempted, WAITING requests are admitted in arrival order while the
         token budget, `max_num_seqs` and the free blocks allow; the first that does not fit
         stops admission, so no request overtakes an older one.

    Invariant: `running` and `waiting` are each sorted by arrival, and every running request
    arrived before every waiting one.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Ends a live request (abort, or a stop string found by the output side)."""
        assert status.is_finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_tokens_stored(self) -> int:
        """Tokens whose keys/values are in the cache now, over all requests."""
        return sum(r.num_computed_tokens for r in self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        token_budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, token_budget)
            target = request.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(request.request_id, target):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it preempted itself: nothing after it is running any more
            self.block_manager.allocate_slots(request.request_id, target)
            scheduled.append(self._make_scheduled(request, num_new))
            token_budget -= num_new
            index += 1

        while (
            not preempted
            and self.waiting
            and token_budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, token_budget)
            if not self.block_manager.can_allocate(request.request_id, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate_slots(request.request_id, num_new)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._make_scheduled(request, num_new))
            token_budget -= num_new

        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - token_budget,
            preempted_request_ids=preempted,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Advances computed tokens, appends sampled tokens and finishes requests that stop."""
        updates: list[RequestUpdate] = []
        for item in scheduler_output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:  # finished while the step ran (abort)
                continue
            request.num_computed_tokens += item.num_tokens
            sampled = runner_output.sampled.get(item.request_id)
            if sampled is None:
                continue
            request.append_output_token(sampled.token_id)
            status = self._check_stop(request, sampled.token_id)
            if status is not None:
                self.finish_request(request.request_id, status)
            updates.append(
                RequestUpdate(
                    request_id=request.request_id,
                    new_tokens=[sampled],
                    finish_reason=status.finish_reason if status is not None else None,
                    stop_token_id=request.stop_token_id,
                )
            )
        return updates

    # ---- internals -----------------------------------------------------------------------

    def _make_scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            start_position=start,
            block_table=self.block_manager.get_block_table(request.request_id),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            min_tokens_stop_ids=request.min_tokens_stop_ids(),
        )

    def _preempt(self, request: Request) -> None:
        """Preempts by recompute: frees the blocks and requeues the request by arrival order."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        keys = [r.arrival_index for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, request.arrival_index), request)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                request.stop_token_id = token_id
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_token_id = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
