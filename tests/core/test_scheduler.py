"""Scheduler: schedule(), a fabricated runner output, update_from_output(), then the next step."""

from __future__ import annotations

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.interface import ModelRunnerOutput, SampledToken, SchedulerOutput
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerConfig
from pagedllm.sampling_params import SamplingParams

EOS = 99


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens_per_step=64):
    return Scheduler(
        SchedulerConfig(max_num_seqs, max_tokens_per_step, max_model_len=1000),
        BlockManager(num_blocks, block_size),
    )


_arrivals = iter(range(10**6))


def make_request(rid, num_prompt, max_tokens=8, **params):
    return Request(
        rid,
        list(range(1, num_prompt + 1)),
        SamplingParams(max_tokens=max_tokens, **params),
        arrival_index=next(_arrivals),
        max_tokens=max_tokens,
        eos_token_id=EOS,
    )


def run_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedules one step and feeds back `token` for every request that samples."""
    out = scheduler.schedule()
    sampled = {
        s.seq_id: SampledToken(token, -0.5, 1, None) for s in out.scheduled if s.sample
    }
    scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    return out


def test_prefill_then_decode():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 6))
    scheduler.add_request(make_request("b", 4))
    out = run_step(scheduler)
    assert [(s.request_id, s.num_tokens, s.start_position) for s in out.scheduled] == [
        ("a", 6, 0),
        ("b", 4, 0),
    ]
    assert out.num_batched_tokens == 10
    assert out.scheduled[0].block_table == [0, 1]
    assert out.scheduled[1].block_table == [2]
    out = run_step(scheduler)
    # Each decodes the token sampled last step, at the position after its prompt.
    assert [(s.request_id, s.token_ids, s.start_position) for s in out.scheduled] == [
        ("a", [7], 6),
        ("b", [7], 4),
    ]
    # b's 5th token opens its second block; a's 7th still fits in block 1.
    assert out.scheduled[0].block_table == [0, 1]
    assert out.scheduled[1].block_table == [2, 3]


def test_chunked_prefill_respects_token_budget():
    scheduler = make_scheduler(max_tokens_per_step=5)
    scheduler.add_request(make_request("a", 12))
    chunks = []
    for _ in range(3):
        out = run_step(scheduler)
        chunks.append([(s.num_tokens, s.start_position, s.sample) for s in out.scheduled])
    assert chunks == [[(5, 0, False)], [(5, 5, False)], [(2, 10, True)]]
    assert scheduler.requests["a"].seqs[0].output_token_ids == [7]


def test_waiting_requests_fill_the_rest_of_the_budget():
    scheduler = make_scheduler(max_tokens_per_step=8)
    scheduler.add_request(make_request("a", 4))
    run_step(scheduler)
    scheduler.add_request(make_request("b", 10))
    out = run_step(scheduler)
    # a decodes 1 token, b gets the 7 left in the budget.
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs_limits_admission():
    scheduler = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        scheduler.add_request(make_request(rid, 2))
    out = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert scheduler.num_waiting == 1


def test_admission_is_first_come_first_served():
    # 4 blocks of 4: a big request at the head of the queue blocks later small ones.
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("a", 8))
    run_step(scheduler)
    scheduler.add_request(make_request("big", 12))
    scheduler.add_request(make_request("small", 1))
    out = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]


def test_preemption_frees_latest_arrival_and_requeues_it_first():
    # 3 blocks of 2 tokens: a and b each hold 1 full block after prefill.
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    scheduler.add_request(make_request("a", 2, max_tokens=10))
    scheduler.add_request(make_request("b", 2, max_tokens=10))
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 1
    # Both need a new block for token 3: a takes the last free one, b is preempted.
    out = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert out.preempted_request_ids == ["b"]
    b = scheduler.requests["b"]
    assert b.status == RequestStatus.WAITING and b.seqs[0].num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    assert scheduler.block_manager.get_block_table("a#0") == [0, 2]
    assert not scheduler.block_manager.has_blocks("b#0")
    # b comes back as a prefill of its prompt plus the token it had generated.
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    out = run_step(scheduler)
    assert [(s.request_id, s.token_ids, s.sample) for s in out.scheduled] == [
        ("b", [1, 2, 7], True)
    ]


def test_oldest_request_preempts_later_ones_in_reverse_arrival_order():
    # 3 blocks of 2 tokens, each request holds one full block after its prefill.
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    for rid in "abc":
        scheduler.add_request(make_request(rid, 2, max_tokens=10))
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 0
    out = run_step(scheduler)
    # a needs a block: c (latest) goes and a takes c's block 2. Then b needs a block and is
    # itself the latest running request, so it goes too.
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert out.preempted_request_ids == ["c", "b"]
    assert scheduler.block_manager.get_block_table("a#0") == [0, 2]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    assert scheduler.num_preemptions == 2


def test_stop_conditions():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("eos", 2, max_tokens=5))
    scheduler.add_request(make_request("len", 2, max_tokens=2))
    scheduler.add_request(make_request("ignore", 2, max_tokens=3, ignore_eos=True))
    scheduler.add_request(make_request("min", 2, max_tokens=5, min_tokens=2))
    out = scheduler.schedule()
    sampled = {
        s.seq_id: SampledToken(5 if s.request_id == "len" else EOS, 0.0, 1, None)
        for s in out.scheduled
    }
    updates = scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    reasons = {u.request_id: u.finish_reason for u in updates}
    assert reasons == {"eos": "stop", "len": None, "ignore": None, "min": None}
    assert [u.stop_token_id for u in updates if u.request_id == "eos"] == [EOS]
    # min_tokens forbids EOS while fewer than 2 tokens exist.
    out = scheduler.schedule()
    forbidden = {s.request_id: s.min_tokens_stop_ids for s in out.scheduled}
    assert forbidden["min"] == [EOS] and forbidden["ignore"] == []
    sampled = {s.seq_id: SampledToken(5, 0.0, 1, None) for s in out.scheduled}
    updates = scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    assert {u.request_id: u.finish_reason for u in updates} == {
        "len": "length",
        "ignore": None,
        "min": None,
    }


def test_finish_frees_all_blocks():
    scheduler = make_scheduler()
    for rid in "abc":
        scheduler.add_request(make_request(rid, 5))
    run_step(scheduler)
    for rid in "abc":
        assert scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    assert scheduler.block_manager.num_free_blocks == 16
    assert not scheduler.has_unfinished_requests()
    assert not scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
