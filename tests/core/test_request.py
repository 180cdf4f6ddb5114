"""Sequence state: live token views, and counters that change only through its own methods."""

from __future__ import annotations

from pagedllm.core.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams

EOS = 99


def make_request(num_prompt: int = 3, block_size: int = 2, **params) -> Request:
    return Request("r", list(range(1, num_prompt + 1)), SamplingParams(max_tokens=8, **params),
                   arrival_index=0, max_tokens=8, eos_token_id=EOS, block_size=block_size)


def test_token_views_are_live_and_read_like_lists():
    request = make_request()
    seq = request.seqs[0]
    outputs, all_tokens = seq.output_token_ids, seq.all_token_ids
    assert outputs == [] and len(outputs) == 0 and not list(outputs)
    seq.append_token(7, -0.5)
    seq.append_token(8, None)  # no logprob needed: the sum stays as it was
    # The views taken before the appends see them: no copy is made per call.
    assert outputs == [7, 8] and [7, 8] == outputs and outputs == (7, 8)
    assert outputs[-1] == 8 and outputs[:1] == [7] and list(outputs) == [7, 8]
    assert outputs is seq.output_token_ids
    assert all_tokens == [1, 2, 3, 7, 8] and all_tokens[3:] == outputs
    assert outputs != [7] and outputs != "78" and outputs != 7
    assert seq.num_output_tokens == 2 and seq.num_tokens == 5
    assert seq.cumulative_logprob == -0.5
    assert request.prompt_token_ids == [1, 2, 3]
    # Block hashes follow the tokens: 5 tokens fill 2 blocks of 2.
    assert len(seq.block_hashes) == 2


def test_counters_move_through_sequence_methods():
    request = make_request()
    seq = request.seqs[0]
    seq.advance_computed(2)  # a prefix hit of one block
    seq.advance_computed(1)  # then a step computes the last prompt token
    seq.mark_registered(1)
    assert (seq.num_computed_tokens, seq.num_registered_blocks) == (3, 1)
    seq.append_token(7, -1.0)
    child = request.fork_seq(seq)
    assert request.seqs == [seq, child] and child.index == 1 and child.seq_id == "r#1"
    assert child.output_token_ids == [7] and child.num_computed_tokens == 3
    assert child.cumulative_logprob == -1.0 and child.num_registered_blocks == 0
    # The child's tokens are its own.
    child.append_beam_token(9, -3.0)
    assert (seq.output_token_ids, child.output_token_ids) == ([7], [7, 9])
    assert child.cumulative_logprob == -3.0
    # Preemption by recompute forgets the cache.
    seq.reset_computed()
    assert (seq.num_computed_tokens, seq.num_registered_blocks) == (0, 0)
    request.set_live_status(RequestStatus.SWAPPED)
    assert [s.status for s in request.seqs] == [RequestStatus.SWAPPED] * 2
    seq.finish(RequestStatus.FINISHED_STOPPED, EOS)
    assert seq.is_finished and seq.stop_token_id == EOS
    assert request.live_seqs() == [child]
