"""When a sequence stops on a token: EOS, a stop token id, max_tokens or the context length.

Both sides of the `min_tokens` rule live here: the ids the sampler must not pick yet, and the
check after a token is appended. Stop strings need text and are the output processor's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.request import Request, RequestStatus, Sequence


@dataclass(frozen=True)
class Stop:
    """Why a sequence ends after its latest token."""

    # FINISHED_STOPPED (EOS or a stop token id) or FINISHED_LENGTH.
    status: RequestStatus
    # The EOS or stop token id that ended it; None for a length stop.
    token_id: int | None = None


def check_stop(request: Request, seq: Sequence, max_model_len: int) -> Stop | None:
    """Whether `seq` ends with the token just appended to it; None to keep generating."""
    params = request.sampling_params
    token_id = seq.output_token_ids[-1]
    if seq.num_output_tokens >= params.min_tokens:
        if token_id == request.eos_token_id and not params.ignore_eos:
            return Stop(RequestStatus.FINISHED_STOPPED, token_id)
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return Stop(RequestStatus.FINISHED_STOPPED, token_id)
    if seq.num_output_tokens >= request.max_tokens:
        return Stop(RequestStatus.FINISHED_LENGTH)
    if seq.num_tokens >= max_model_len:
        return Stop(RequestStatus.FINISHED_LENGTH)
    return None


def min_tokens_stop_ids(request: Request, seq: Sequence, num_pending: int = 0) -> list[int]:
    """Token ids that may not be sampled yet because `min_tokens` is not reached (after
    `num_pending` more tokens: the proposals before a speculative row)."""
    params = request.sampling_params
    if seq.num_output_tokens + num_pending >= params.min_tokens:
        return []
    ids = list(params.stop_token_ids or ())
    if request.eos_token_id is not None and not params.ignore_eos:
        ids.append(request.eos_token_id)
    return ids
