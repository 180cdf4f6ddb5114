"""A beam search through the scheduler with fabricated offers: forks share blocks, unchosen beams
end and free theirs, and the search ends with its hypotheses and one finish reason."""

from __future__ import annotations

import pytest

from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.interface import ModelRunnerOutput, RequestUpdate, SampledToken, SchedulerOutput
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerConfig
from pagedllm.sampling_params import SamplingParams

EOS = 99


def step(scheduler: Scheduler, offers: dict[str, list[tuple[int, float]]]
         ) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    """Schedules one step; each sampling sequence offers `offers[seq_id]`."""
    out = scheduler.schedule()
    assert sorted(s.seq_id for s in out.scheduled if s.sample) == sorted(offers)
    sampled = {seq_id: SampledToken(row[0][0], row[0][1], 1, row) for seq_id, row in offers.items()}
    return out, scheduler.update_from_output(out, ModelRunnerOutput(sampled))


def test_beams_fork_drop_and_finish():
    scheduler = Scheduler(SchedulerConfig(8, 64, max_model_len=100), BlockManager(8, 4))
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=3, logprobs=4, ignore_eos=True),
                      arrival_index=0, max_tokens=3, eos_token_id=EOS,
                      block_size=4, beam_search=BeamSearchParams(beam_width=2, max_tokens=3))
    scheduler.add_request(request)
    manager = scheduler.block_manager

    # Step 1: the prompt (3 tokens, block 0) offers 10 and 11: both continue, so the one beam
    # forks; the child r#1 shares block 0.
    _, updates = step(scheduler, {"r#0": [(10, -0.1), (11, -0.5), (12, -1.0), (13, -2.0)]})
    assert updates == []
    r0, r1 = request.seqs
    assert request.beam_seqs == [r0, r1]
    assert (r0.output_token_ids, r1.output_token_ids) == ([10], [11])
    assert (r0.cumulative_logprob, r1.cumulative_logprob) == (-0.1, -0.5)
    assert manager.get_block_table("r#1") == [0] and manager.pool.ref_count(0) == 2

    # Step 2: both write position 3 into shared block 0: r#0 takes a private copy (block 1).
    # Beam 0 offers EOS first: [10, 99] is a finished hypothesis, and its next two offers beat
    # all of beam 1's, so beam 0 forks into r#0 (20) and r#2 (22), and r#1 is dropped.
    out, updates = step(scheduler, {
        "r#0": [(EOS, -0.2), (20, -0.3), (22, -0.35), (23, -0.4)],
        "r#1": [(21, -0.5), (24, -0.6), (25, -0.7), (26, -0.8)],
    })
    assert out.blocks_to_copy == [(0, 1)]
    assert updates == []
    r2 = request.seqs[2]
    assert request.beam_seqs == [r0, r2]
    assert (r0.output_token_ids, r2.output_token_ids) == ([10, 20], [10, 22])
    assert r1.status == RequestStatus.FINISHED_ABORTED and not manager.has_blocks("r#1")
    assert manager.get_block_table("r#2") == [1] and manager.pool.ref_count(1) == 2
    [hypothesis] = request.beam.finished
    assert (hypothesis.token_ids, hypothesis.finish_reason) == ([10, EOS], "stop")
    assert hypothesis.score == pytest.approx(-0.3 / 2)  # cumulative logprob / length

    # Step 3: every candidate reaches max_tokens. The EOS hypothesis keeps the best score, so
    # the request's finish reason is "stop"; the second best ended by length.
    _, updates = step(scheduler, {"r#0": [(30, -0.1), (31, -0.2)], "r#2": [(32, -0.1)]})
    [update] = updates
    assert (update.request_id, update.finish_reason, update.new_tokens) == ("r", "stop", [])
    assert [(h.token_ids, h.finish_reason) for h in update.beams] == [
        ([10, EOS], "stop"), ([10, 20, 30], "length")]
    assert [s.status for s in request.seqs] == [RequestStatus.FINISHED_STOPPED,
                                                RequestStatus.FINISHED_ABORTED,
                                                RequestStatus.FINISHED_STOPPED]
    assert not scheduler.has_unfinished_requests()
    assert manager.num_free_blocks == 8
