"""The engine side of a beam search step: the search (`BeamState.step`) picks the next beams by
score; this turns its picks into sequences, forking a beam chosen more than once (its blocks
shared, copy-on-write) and ending the beams that were not chosen."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.interface import RequestUpdate
from pagedllm.core.request import Request, RequestStatus, Sequence


@dataclass
class BeamStepOutcome:
    """What the scheduler must still do after a beam step."""

    # Sequences to finish, with their status: the beams no candidate continued (aborted), or
    # every live beam once the search is done. Their blocks are freed only then, after the
    # forks that share them.
    to_finish: list[tuple[Sequence, RequestStatus]]
    # Once the search is done: the request's final update, with its hypotheses best first.
    update: RequestUpdate | None = None


def beam_step(request: Request, block_manager: BlockManager) -> BeamStepOutcome:
    """Advances the request's beams by one token, from the offers every beam has made."""
    beams = request.beam_seqs
    result = request.beam.step(
        [seq.cumulative_logprob for seq in beams],
        [seq.output_token_ids for seq in beams],
        request.take_beam_offers(),
        beams[0].num_output_tokens,
    )
    if result.done:
        hypotheses = request.beam.best()
        ended_by_eos = bool(hypotheses) and hypotheses[0].finish_reason == "stop"
        status = RequestStatus.FINISHED_STOPPED if ended_by_eos else RequestStatus.FINISHED_LENGTH
        update = RequestUpdate(request.request_id, 0, [], status.finish_reason, beams=hypotheses)
        return BeamStepOutcome([(seq, status) for seq in request.live_seqs()], update)
    # Forks first, from parents that have not taken their own next token yet.
    chosen: list[Sequence] = []
    used: set[int] = set()
    for cand in result.continuations:
        parent = beams[cand.parent]
        if cand.parent in used:
            child = request.fork_seq(parent)
            block_manager.fork(parent.seq_id, child.seq_id)
            chosen.append(child)
        else:
            used.add(cand.parent)
            chosen.append(parent)
    for seq, cand in zip(chosen, result.continuations):
        seq.append_beam_token(cand.token_id, cand.cumulative_logprob)
    request.beam_seqs = chosen
    dropped = [seq for position, seq in enumerate(beams) if position not in used]
    return BeamStepOutcome([(seq, RequestStatus.FINISHED_ABORTED) for seq in dropped])
