"""Structured outputs in the scheduler, without a model or a grammar library: a fake grammar
that accepts one fixed token string; the scheduler waits for its compile, advances it with each
appended token, copies it into forked samples, keeps it through preemption and lays out each
step's bitmask over the rows that sample."""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.interface import ModelRunnerOutput, SampledToken, SchedulerOutput
from pagedllm.core.request import Request
from pagedllm.core.scheduler import GRAMMAR_WAIT_S, Scheduler, SchedulerConfig
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.backend import StructuredOutputGrammar

EOS = 99
VOCAB = 100  # 4 words of 32 bits per bitmask row


class FixedGrammar(StructuredOutputGrammar):
    """Accepts exactly `tokens`, then EOS."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.accepted: list[int] = []

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def _next(self) -> int:
        done = len(self.accepted) >= len(self.tokens)
        return EOS if done else self.tokens[len(self.accepted)]

    def accept_tokens(self, tokens) -> bool:
        for token in tokens:
            if token != self._next():
                return False
            self.accepted.append(token)
        return True

    def validate_tokens(self, tokens) -> int:
        return 0

    def rollback(self, num_tokens: int) -> None:
        del self.accepted[len(self.accepted) - num_tokens:]

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        bitmask[row] = 0
        token = self._next()
        bitmask[row, token // 32] = np.int32(np.uint32(1 << (token % 32)).view(np.int32))

    def is_terminated(self) -> bool:
        return self.accepted and self.accepted[-1] == EOS

    def copy(self) -> FixedGrammar:
        other = FixedGrammar(self.tokens)
        other.accepted = list(self.accepted)
        return other


def allowed_tokens(bitmask: np.ndarray, row: int) -> list[int]:
    bits = np.unpackbits(bitmask[row].astype("<i4").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:VOCAB]).tolist()


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens_per_step=64,
                   preemption_mode="recompute"):
    return Scheduler(
        SchedulerConfig(max_num_seqs, max_tokens_per_step, max_model_len=1000,
                        preemption_mode=preemption_mode),
        BlockManager(num_blocks, block_size, num_cpu_blocks=16),
    )


_arrivals = iter(range(10**6))


def compiled(tokens: list[int] | None) -> Future:
    """A compile: done with a FixedGrammar of `tokens`, or (None) still running."""
    future: Future = Future()
    if tokens is not None:
        future.set_result(FixedGrammar(tokens))
    return future


def make_request(rid, num_prompt, grammar: Future | None = None, max_tokens=8, **params):
    structured = None
    if grammar is not None:
        structured = StructuredOutputsParams(regex="stands for the fake").with_compiled(grammar)
    return Request(
        rid, list(range(1, num_prompt + 1)),
        SamplingParams(max_tokens=max_tokens, structured_outputs=structured, **params),
        arrival_index=next(_arrivals), max_tokens=max_tokens, eos_token_id=EOS, block_size=4,
    )


def run_step(scheduler: Scheduler, tokens: dict[str, int] | None = None, token: int = 7
             ) -> SchedulerOutput:
    """One step; each sampling sequence gets tokens[seq_id], else the token its bitmask allows
    first (`token` for an unconstrained one)."""
    out = scheduler.schedule()
    rows = [s for s in out.scheduled if s.sample]
    sampled = {}
    for row, item in enumerate(rows):
        chosen = (tokens or {}).get(item.seq_id)
        if chosen is None:
            chosen = (token if out.grammar_bitmask is None
                      else allowed_tokens(out.grammar_bitmask, row)[0])
        sampled[item.seq_id] = SampledToken(chosen, -0.5, 1, None)
    scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    return out


def test_no_bitmask_without_a_constrained_request():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("free", 3))
    assert run_step(scheduler).grammar_bitmask is None
    assert run_step(scheduler).grammar_bitmask is None


def test_bitmask_rows_follow_the_rows_that_sample():
    scheduler = make_scheduler(max_tokens_per_step=9)
    json_request = make_request("json", 3, compiled([40, 41]))
    scheduler.add_request(json_request)
    scheduler.add_request(make_request("free", 2))
    scheduler.add_request(make_request("long", 20))  # prefilled in chunks: samples nothing yet
    out = run_step(scheduler)
    # Step 1: json (3 tokens) and free (2) sample; long's first chunk (4) does not.
    assert [(s.request_id, s.sample) for s in out.scheduled] == [
        ("json", True), ("free", True), ("long", False)]
    assert out.grammar_bitmask.shape == (2, 4) and out.grammar_bitmask.dtype == np.int32
    assert allowed_tokens(out.grammar_bitmask, 0) == [40]
    assert (out.grammar_bitmask[1] == -1).all()  # unconstrained: every token
    out = run_step(scheduler)
    assert allowed_tokens(out.grammar_bitmask, 0) == [41]
    run_step(scheduler)
    # The grammar is complete: EOS alone, which ends the request.
    seq = json_request.seqs[0]
    assert seq.output_token_ids == [40, 41, EOS] and seq.is_finished
    assert seq.grammar.accepted == [40, 41, EOS]


def test_a_compiling_request_waits_while_later_ones_run():
    scheduler = make_scheduler()
    pending = compiled(None)
    scheduler.add_request(make_request("slow", 3, pending))
    scheduler.add_request(make_request("free", 3))
    out = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["free"]
    assert [r.request_id for r in scheduler.waiting] == ["slow"]
    assert scheduler.requests["slow"].seqs[0].grammar is None
    pending.set_result(FixedGrammar([5]))
    out = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["free", "slow"]
    # The template stays in its initial state: the sequence advanced a copy.
    assert pending.result().accepted == []
    assert scheduler.requests["slow"].seqs[0].grammar.accepted == [5]


def test_an_idle_step_waits_briefly_for_a_compile():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("slow", 3, compiled(None)))
    start = time.perf_counter()
    assert scheduler.schedule().is_empty
    assert time.perf_counter() - start >= GRAMMAR_WAIT_S * 0.9


def test_forked_samples_advance_their_own_grammars():
    scheduler = make_scheduler()
    # n=2: the samples fork after the prompt and may take different paths.
    grammar = compiled(None)
    grammar.set_result(_BranchGrammar())
    scheduler.add_request(make_request("n2", 3, grammar, n=2, temperature=1.0))
    run_step(scheduler)  # the prompt but its last token
    run_step(scheduler, {"n2#0": 10, "n2#1": 11})
    run_step(scheduler, {"n2#0": 20, "n2#1": 21})
    seqs = scheduler.requests["n2"].seqs
    assert [s.grammar.accepted for s in seqs] == [[10, 20], [11, 21]]
    out = run_step(scheduler)
    assert [allowed_tokens(out.grammar_bitmask, row) for row in (0, 1)] == [[EOS], [EOS]]


class _BranchGrammar(FixedGrammar):
    """Accepts any two tokens, then EOS."""

    def __init__(self) -> None:
        super().__init__([])

    def _next(self) -> int:
        return EOS if len(self.accepted) >= 2 else 10

    def accept_tokens(self, tokens) -> bool:
        self.accepted.extend(tokens)
        return True

    def copy(self) -> _BranchGrammar:
        other = _BranchGrammar()
        other.accepted = list(self.accepted)
        return other


def _preempted_grammar_stays_with_its_tokens(mode: str) -> None:
    # 6 blocks of 4 tokens: two requests of 5-token prompts grow until one is preempted.
    scheduler = make_scheduler(num_blocks=6, preemption_mode=mode)
    target = list(range(30, 45))
    scheduler.add_request(make_request("old", 5, max_tokens=15))
    scheduler.add_request(make_request("json", 5, compiled(target), max_tokens=15))
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        out = run_step(scheduler)
        json_request = scheduler.requests.get("json")
        if json_request is not None:
            seq = json_request.seqs[0]
            assert seq.grammar.accepted == list(seq.output_token_ids)
    assert scheduler.num_preemptions > 0
    assert out.scheduled  # the last step still ran something


def test_preemption_by_recompute_keeps_the_grammar_with_the_tokens():
    _preempted_grammar_stays_with_its_tokens("recompute")


def test_preemption_by_swap_keeps_the_grammar_with_the_tokens():
    _preempted_grammar_stays_with_its_tokens("swap")
