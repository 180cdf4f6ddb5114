"""Iteration-level scheduling: which sequences run each step and how many tokens each computes."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from pagedllm.core.beam_step import beam_step
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.grammar_mask import GrammarMaskBuilder, wait_for_grammars
from pagedllm.core.interface import (
    ModelRunnerOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.core.request import Request, RequestStatus, Sequence
from pagedllm.core.stop_checker import check_stop
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.proposer import Speculator

# The preemption modes the scheduler knows: the one list that settings are checked against.
PREEMPTION_MODES = ("recompute", "swap")
# Longest a step with nothing to run waits for a grammar compile before it returns (empty).
GRAMMAR_WAIT_S = 0.01


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step and the preemption policy."""

    # Most sequences in RUNNING at once.
    max_num_seqs: int
    # Most tokens computed in one forward pass (prefill chunks + decodes).
    max_num_batched_tokens: int
    # Context length cap: a sequence stops with "length" when it reaches it.
    max_model_len: int
    # "recompute" frees a preempted request's blocks; "swap" moves them to the host pool and
    # falls back to recompute when the host pool is full.
    preemption_mode: str = "recompute"
    # Speculative decoding (spec_decode/): None decodes one token per step.
    speculative_config: SpeculativeConfig | None = None
    # Structured outputs: fill each step's bitmask on a thread beside the forward pass (the
    # engine decides: structured_output/manager.py's grammar_mask_overlap).
    grammar_mask_overlap: bool = False

    def __post_init__(self) -> None:
        # The engine's settings check the user's value (ValueError) against the same constant.
        assert self.preemption_mode in PREEMPTION_MODES, self.preemption_mode


@dataclass
class _GroupPlan:
    """One request's share of a step, decided but not yet committed to the step output."""

    items: list[ScheduledRequest]
    copies: list[tuple[int, int]]
    num_tokens: int


class Scheduler:
    """First-come-first-served continuous batching with chunked prefill and preemption.

    Each step:
      1. RUNNING requests, oldest first, get the tokens their sequences lack (1 for a decode,
         the next chunk of a partly prefilled prompt) within the token budget. When a request
         cannot get its blocks, the latest-arrived running request is preempted whole: swapped
         to the host pool, or freed to be recomputed.
      2. If nothing was preempted, SWAPPED requests come back in arrival order, then WAITING
         requests are admitted in arrival order while the budget, `max_num_seqs` and the free
         blocks allow; the first that does not fit stops admission, so none overtakes an older one.
         The exception: a constrained request whose grammar is still compiling is passed over
         (it keeps its place) and the requests behind it go ahead.
      3. The constrained sequences that sample get their grammar's bitmask in the output,
         filled on the mask thread (core/grammar_mask.py) while the step runs.

    With speculative decoding (spec_decode/), a decoding sequence also gets slots for up to k
    proposed tokens (counted in the budget); update_from_output appends the tokens the runner
    accepted, checking each for a stop, and rolls the rest back (computed count, tail blocks).

    Invariant: `running`, `swapped` and `waiting` are each sorted by arrival.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swap_outs = 0
        # Live requests under a structured-output constraint (no bitmask work without one).
        self._num_structured = 0
        self._grammar_masks = GrammarMaskBuilder(config.grammar_mask_overlap)
        spec = config.speculative_config
        self.speculator = Speculator(spec) if spec is not None else None
        self._speculate = False  # whether this step proposes (decided as it starts)

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._num_structured += request.is_structured

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Ends a live request and every sequence of it (abort)."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        for seq in request.live_seqs():
            self._finish_seq(seq, status)
        return True

    def finish_sequence(self, request_id: str, seq_index: int, status: RequestStatus) -> None:
        """Ends one sequence (a stop string found by the output side)."""
        request = self.requests.get(request_id)
        if request is not None and not request.seqs[seq_index].is_finished:
            self._finish_seq(request.seqs[seq_index], status)

    def _finish_seq(self, seq: Sequence, status: RequestStatus,
                    stop_token_id: int | None = None) -> None:
        seq.finish(status, stop_token_id)
        self.block_manager.free(seq.seq_id)
        if self.speculator is not None:
            self.speculator.forget(seq.seq_id)
        request = seq.request
        if request.live_seqs():
            return
        del self.requests[request.request_id]
        self._num_structured -= request.is_structured
        queue = {RequestStatus.RUNNING: self.running, RequestStatus.SWAPPED: self.swapped,
                 RequestStatus.WAITING: self.waiting}[request.status]
        queue.remove(request)
        request.status = status

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def num_tokens_stored(self) -> int:
        """Tokens whose keys/values are in the device cache now, over all sequences."""
        return sum(s.num_computed_tokens for r in self.running for s in r.live_seqs())

    def _num_running_seqs(self) -> int:
        return sum(r.num_seqs_reserved for r in self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self._grammar_masks.wait()  # the last step's fill, if it was never waited for
        out = SchedulerOutput(scheduled=[], num_batched_tokens=0)
        budget = self.config.max_num_batched_tokens
        self._speculate = (self.speculator is not None
                           and self.speculator.step_enabled(self._num_running_seqs()))

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            plan = self._plan_group(request, budget, out)
            if plan is None:
                break  # it preempted itself: nothing after it is running any more
            budget = self._commit(plan, out, budget)
            index += 1

        preempted = bool(out.preempted_request_ids)
        while not preempted and self.swapped and budget > 0:
            request = self.swapped[0]
            seq_ids = [s.seq_id for s in request.live_seqs()]
            if self._num_running_seqs() + len(seq_ids) > self.config.max_num_seqs:
                break
            if not self.block_manager.can_swap_in(seq_ids):
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(self.block_manager.swap_in(seq_ids))
            self._set_running(request)
            plan = self._plan_group(request, budget, out, can_preempt=False)
            if plan is not None:
                budget = self._commit(plan, out, budget)

        compiling: list[Request] = []  # passed over: their grammars are not ready
        while not preempted and self.waiting and budget > 0:
            request = self.waiting[0]
            if not request.grammar_ready():
                compiling.append(self.waiting.popleft())
                continue
            if self._num_running_seqs() + request.num_seqs_reserved > self.config.max_num_seqs:
                break
            plan = self._plan_group(request, budget, out, can_preempt=False)
            if plan is None:
                break
            self.waiting.popleft()
            self._set_running(request)
            budget = self._commit(plan, out, budget)
        self.waiting.extendleft(reversed(compiling))
        if self._num_structured:
            out.grammar_bitmask = self._grammar_masks.start(out.scheduled, self.requests)
        if out.is_empty and compiling:
            # NOTE: otherwise the engine loop would spin on empty steps while grammars compile.
            wait_for_grammars([r.pending_grammar for r in compiling], GRAMMAR_WAIT_S)
        return out

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Advances computed tokens, appends sampled tokens and finishes sequences that stop."""
        self._grammar_masks.wait()  # accepted tokens advance the grammars it may still read
        updates: list[RequestUpdate] = []
        beam_requests: dict[str, Request] = {}  # every beam has offered: ready to step
        for item in scheduler_output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:  # finished while the step ran (abort)
                continue
            seq = request.seqs[item.seq_index]
            if seq.is_finished:
                continue
            seq.advance_computed(item.num_tokens - len(item.spec_token_ids))
            self._register_blocks(seq)
            sampled = runner_output.sampled.get(item.seq_id)
            prompt_logprobs = (runner_output.prompt_logprobs.get(item.request_id)
                               if item.seq_index == 0 else None)
            if sampled is None:
                if prompt_logprobs is not None:  # a prefill chunk: its prompt logprobs alone
                    updates.append(RequestUpdate(request.request_id, seq.index, [], None,
                                                 prompt_logprobs=prompt_logprobs))
                continue
            if request.beam is not None:
                if request.add_beam_offer(seq, sampled.top_logprobs):
                    beam_requests[request.request_id] = request
                continue
            # With speculation: the sampled token, then those that verification accepted after
            # it, each checked for a stop as if decoded alone.
            new_tokens = [sampled, *runner_output.spec_accepted.get(item.seq_id, ())]
            if item.spec_token_ids:
                self.speculator.record(seq.seq_id, len(item.spec_token_ids), len(new_tokens) - 1)
            stop = None
            for j, token in enumerate(new_tokens):
                if j:  # the token before this one was a confirmed proposal: its K/V holds
                    seq.advance_computed(1)
                seq.append_token(token.token_id, token.logprob)
                stop = check_stop(request, seq, self.config.max_model_len)
                if stop is not None:
                    del new_tokens[j + 1 :]
                    break
            if stop is not None:
                self._finish_seq(seq, stop.status, stop.token_id)
            elif item.spec_token_ids:  # roll back: rejected proposals' slots are free again
                self._register_blocks(seq)
                self.block_manager.trim(seq.seq_id, seq.num_tokens)
            updates.append(
                RequestUpdate(
                    request_id=request.request_id,
                    seq_index=seq.index,
                    new_tokens=new_tokens,
                    finish_reason=stop.status.finish_reason if stop is not None else None,
                    stop_token_id=seq.stop_token_id,
                    prompt_logprobs=prompt_logprobs,
                )
            )
        for request in beam_requests.values():
            outcome = beam_step(request, self.block_manager)
            for seq, status in outcome.to_finish:
                self._finish_seq(seq, status)
            if outcome.update is not None:
                updates.append(outcome.update)
        return updates

    # ---- internals -----------------------------------------------------------------------

    def _register_blocks(self, seq: Sequence) -> None:
        """Offers the sequence's newly computed full blocks to the prefix cache."""
        if seq.num_computed_tokens // self.block_manager.block_size <= seq.num_registered_blocks:
            return  # no block filled since the last offer (most decode steps)
        seq.mark_registered(self.block_manager.cache_full_blocks(
            seq.seq_id, seq.block_hashes, seq.all_token_ids, seq.num_computed_tokens,
            seq.num_registered_blocks,
        ))

    def _proposals(self, request: Request, seq: Sequence, start: int, num_new: int,
                   room: int) -> list[int]:
        """Speculative tokens to verify after a decode of `seq` ([] when it does not propose):
        never more than the budget's `room`, max_tokens or the context length can take."""
        if (not self._speculate or num_new != 1 or start != seq.num_tokens - 1
                or not request.is_forked or request.beam is not None or request.is_structured):
            return []
        max_k = min(room, request.max_tokens - seq.num_output_tokens - 1,
                    self.config.max_model_len - seq.num_tokens - 1)
        return self.speculator.propose(seq, max_k) if max_k > 0 else []

    def _plan_group(self, request: Request, budget: int, out: SchedulerOutput,
                    can_preempt: bool = True) -> _GroupPlan | None:
        """Decides and allocates the request's tokens for this step, all sequences or none.

        Returns None when the request cannot run: it was preempted (can_preempt) or it does not
        fit (admission). Blocks are allocated only once the whole request fits, so a request
        never holds blocks for a step it does not run in.
        """
        manager = self.block_manager
        self._maybe_fork(request)
        wants = []  # (seq, start, num_new, prefix_hit, proposals)
        num_tokens = 0
        for seq in request.live_seqs():
            hit = None
            start = seq.num_computed_tokens
            # NOTE: prompt logprobs need every prompt position's logits: no prefix hits.
            if (start == 0 and not manager.has_blocks(seq.seq_id)
                    and request.sampling_params.prompt_logprobs is None):
                hit = manager.find_prefix(seq.block_hashes, seq.all_token_ids, seq.num_tokens)
                start = hit.num_blocks * manager.block_size
            num_new = max(min(request.prefill_limit(seq) - start, budget - num_tokens), 0)
            if num_new == 0 and not (hit and hit.num_blocks):
                continue
            spec = (self._proposals(request, seq, start, num_new, budget - num_tokens - num_new)
                    if self._speculate else [])
            wants.append((seq, start, num_new, hit, spec))
            num_tokens += num_new + len(spec)
        if not wants:
            return _GroupPlan([], [], 0)
        # NOTE: conservative when several sequences of the request hit the same cached blocks
        # (each counts their revival), never optimistic.
        needed = sum(manager.num_blocks_needed(seq.seq_id, start, n + len(spec), hit)
                     for seq, start, n, hit, spec in wants)
        if needed > manager.num_free_blocks and any(w[4] for w in wants):
            # Proposals never cost a preemption: the request decodes without them.
            wants = [(seq, start, n, hit, []) for seq, start, n, hit, _ in wants]
            num_tokens = sum(w[2] for w in wants)
            needed = sum(manager.num_blocks_needed(seq.seq_id, start, n, hit)
                         for seq, start, n, hit, _ in wants)
        while needed > manager.num_free_blocks:
            if not can_preempt:
                return None
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return None
        plan = _GroupPlan([], [], num_tokens)
        # NOTE: every prefix hit is attached before any fresh block is taken, because taking a
        # block from the free queue may evict a cached block that a later hit points to.
        for seq, start, _, hit, _ in wants:
            if hit is not None:
                manager.record_prefix_query(seq.num_tokens, start)
                manager.attach_prefix(seq.seq_id, hit)
                seq.advance_computed(start)  # the hit's tokens are cached: nothing to compute
        for seq, start, num_new, _, spec in wants:
            plan.copies.extend(manager.allocate_slots(seq.seq_id, start, num_new + len(spec)))
            if num_new:
                table = manager.get_block_table(seq.seq_id)
                plan.items.append(ScheduledRequest.from_sequence(seq, num_new, table, spec))
        return plan

    def _commit(self, plan: _GroupPlan, out: SchedulerOutput, budget: int) -> int:
        out.scheduled.extend(plan.items)
        out.blocks_to_copy.extend(plan.copies)
        out.num_batched_tokens += plan.num_tokens
        return budget - plan.num_tokens

    def _maybe_fork(self, request: Request) -> None:
        """Forks the first sequence into best_of once all but its last prompt token is cached."""
        if request.is_forked:
            return
        parent = request.seqs[0]
        if parent.num_computed_tokens < request.prefill_limit(parent):
            return
        if parent.num_computed_tokens == 0 and not self.block_manager.has_blocks(parent.seq_id):
            # A one-token prompt (or nothing cached): children start with empty tables.
            self.block_manager.allocate_slots(parent.seq_id, 0, 0)
        for _ in range(1, request.best_of):
            child = request.fork_seq(parent)
            self.block_manager.fork(parent.seq_id, child.seq_id)

    def _set_running(self, request: Request) -> None:
        request.set_live_status(RequestStatus.RUNNING)
        _insert_by_arrival(self.running, request)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempts a whole request: swap out all its sequences at once, or free them."""
        self.running.remove(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted_request_ids.append(request.request_id)
        seqs = request.live_seqs()
        seq_ids = [s.seq_id for s in seqs]
        if self.config.preemption_mode == "swap" and self.block_manager.can_swap_out(seq_ids):
            out.blocks_to_swap_out.extend(self.block_manager.swap_out(seq_ids))
            self.num_swap_outs += 1
            status, queue = RequestStatus.SWAPPED, self.swapped
        else:
            for seq in seqs:
                self.block_manager.free(seq.seq_id)
                seq.reset_computed()
            request.drop_beam_offers()
            status, queue = RequestStatus.WAITING, self.waiting
        request.set_live_status(status)
        _insert_by_arrival(queue, request)


def _insert_by_arrival(queue: list[Request] | deque[Request], request: Request) -> None:
    """Inserts `request` where it keeps `queue` sorted by arrival."""
    keys = [r.arrival_index for r in queue]
    queue.insert(bisect.bisect(keys, request.arrival_index), request)
