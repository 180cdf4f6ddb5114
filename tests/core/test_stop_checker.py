"""Token stops: EOS, stop token ids, max_tokens and the context length, gated by min_tokens."""

from __future__ import annotations

from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.stop_checker import Stop, check_stop, min_tokens_stop_ids
from pagedllm.sampling_params import SamplingParams

EOS = 99
STOPPED, LENGTH = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


def stops_after(tokens: list[int], max_model_len: int = 100, max_tokens: int = 8,
                **params) -> list[Stop | None]:
    """check_stop after each token of `tokens`, appended to a 3-token prompt in turn.

    `max_tokens` is the request's cap (as clamped by the engine), not the params'.
    """
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=None, **params),
                      arrival_index=0, max_tokens=max_tokens, eos_token_id=EOS)
    seq = request.seqs[0]
    result = []
    for token in tokens:
        seq.append_token(token, 0.0)
        result.append(check_stop(request, seq, max_model_len))
    return result


def test_eos_and_stop_token_ids_stop_with_their_token():
    assert stops_after([5, EOS]) == [None, Stop(STOPPED, EOS)]
    assert stops_after([5, 42], stop_token_ids=[42]) == [None, Stop(STOPPED, 42)]
    assert stops_after([EOS, 5], max_tokens=2, ignore_eos=True) == [None, Stop(LENGTH)]


def test_min_tokens_gates_token_stops_but_not_length():
    # EOS and stop ids count from the 3rd generated token on.
    assert stops_after([EOS, 42, EOS], min_tokens=3, stop_token_ids=[42]) == [
        None, None, Stop(STOPPED, EOS)]
    assert stops_after([EOS, EOS], max_tokens=2, min_tokens=3) == [None, Stop(LENGTH)]


def test_length_stops_at_max_tokens_or_the_context_length():
    assert stops_after([5, 6, 7], max_tokens=3) == [None, None, Stop(LENGTH)]
    # The prompt has 3 tokens: the 5th token in all reaches max_model_len 5.
    assert stops_after([5, 6, 7], max_model_len=5) == [None, Stop(LENGTH), Stop(LENGTH)]


def test_min_tokens_stop_ids_until_min_tokens():
    request = Request("r", [1], SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=[42]),
                      arrival_index=0, max_tokens=8, eos_token_id=EOS)
    seq = request.seqs[0]
    assert min_tokens_stop_ids(request, seq) == [42, EOS]
    seq.append_token(5, 0.0)
    assert min_tokens_stop_ids(request, seq) == []
    ignoring = Request("i", [1], SamplingParams(max_tokens=8, min_tokens=1, ignore_eos=True),
                       arrival_index=1, max_tokens=8, eos_token_id=EOS)
    assert min_tokens_stop_ids(ignoring, ignoring.seqs[0]) == []
