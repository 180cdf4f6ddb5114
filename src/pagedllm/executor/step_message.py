"""The per-step control message from the driver to the ranks, sent as a diff (vLLM V1's
`NewRequestData` / `CachedRequestData`).

A rank keeps the state of every sequence it has run: the request's prompt and sampling
settings, the sequence's generated tokens and its block table. So a request's prompt and
settings cross once, when it is first scheduled, and a sequence's tokens and table once, when
it first runs (a fork is a new sequence); afterwards a step sends, per scheduled sequence, a
small integer handle, how many tokens to compute, the tokens generated since the rank last saw
it (one, in a decode), and its block table only where it changed.

`StepEncoder` (driver) turns a SchedulerOutput into a `StepMessage`; `StepDecoder` (rank)
turns it back into the SchedulerOutput the ModelRunner takes, equal field by field.

NOTE: a little over the package's ~350 lines on purpose: the two sides of one wire format
stay in one module, so a field cannot be encoded one way and decoded another.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from pagedllm.core.interface import (
    ModelRunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)

if TYPE_CHECKING:
    from pagedllm.sampling_params import SamplingParams


# NOTE: slots dataclasses pickle as a list of values, without a dict of field names per object.
@dataclass(slots=True)
class NewRequestData:
    """A request no rank has seen yet: sent once, with its first scheduled sequence."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass(slots=True)
class NewSeqData:
    """A sequence no rank has seen yet (its first run, or a fork): its full state."""

    # The integer that names the sequence in later steps (reused once its request ends).
    handle: int
    request_id: str
    seq_index: int
    # Tokens generated so far (a fork's are its parent's; a fresh sequence has none).
    output_token_ids: list[int]
    block_table: list[int]


@dataclass(slots=True)
class StepMessage:
    """One step for the ranks. Columns indexed by batch position i follow SchedulerOutput's
    `scheduled` order; a column of small counts or handles (all below 256) travels as `bytes`,
    one byte each, which reads back as the same ints.

    On the wire it is `to_wire()`, a plain tuple of the fields in order (no class to name).
    """

    # Requests that end before this step (the ranks forget them first; their handles and
    # request ids may come back as new ones below).
    finished_request_ids: list[str]
    # Requests and sequences first scheduled this step.
    new_requests: list[NewRequestData]
    new_seqs: list[NewSeqData]
    # [batch] handle of the sequence at position i.
    handles: list[int] | bytes
    # [batch] tokens to compute for it.
    num_scheduled_tokens: list[int] | bytes
    # [batch] how many tokens it generated since the ranks last saw it (0 for a new sequence),
    # and those tokens, concatenated in batch order.
    num_new_token_ids: list[int] | bytes
    new_token_ids: list[int]
    # (i, start position) of each chunk that stops short of its sequence's last token (a
    # chunked prefill, which samples nothing); every other chunk ends there and samples.
    partial_chunks: list[tuple[int, int]]
    # (handle, blocks kept, blocks appended) for each known sequence whose table changed:
    # grown (most steps that change one), or rebuilt after a preemption or copy-on-write.
    block_table_updates: list[tuple[int, int, list[int]]]
    # (i, token ids) where min_tokens forbids ids this step.
    min_tokens_stop_ids: list[tuple[int, list[int]]]
    # (i, proposed tokens, min_tokens_stop_ids after each) for each row that verifies
    # speculative proposals: its scheduled tokens end with them (they are not outputs yet).
    speculated: list[tuple[int, list[int], list[list[int]]]]
    # The block moves of SchedulerOutput, as they are.
    blocks_to_swap_out: list[tuple[int, int]]
    blocks_to_swap_in: list[tuple[int, int]]
    blocks_to_copy: list[tuple[int, int]]
    # Every other SchedulerOutput field that is set (e.g. a grammar bitmask), as it is.
    extras: dict[str, Any]

    def to_wire(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    @classmethod
    def from_wire(cls, wire: tuple) -> StepMessage:
        return cls(*wire)


def _compact(values: list[int]) -> bytes | list[int]:
    """One byte per value where all fit (e.g. [3, 0, 1] -> b"\\x03\\x00\\x01"), else the list."""
    return bytes(values) if not values or max(values) < 256 else values


# SchedulerOutput's fields that the message rebuilds (or, for preemptions, that ranks do not
# need); any other field travels in `extras` as it is, so a new one is never dropped.
_REBUILT = {"scheduled", "num_batched_tokens", "preempted_request_ids", "blocks_to_swap_out",
            "blocks_to_swap_in", "blocks_to_copy"}
_EXTRA_FIELDS = [f.name for f in fields(SchedulerOutput) if f.name not in _REBUILT]


def _is_set(value: Any) -> bool:
    return value is not None and not (isinstance(value, (list, tuple, dict)) and not value)


@dataclass
class _SentRequest:
    # The request's prompt view, whose identity tells a reused request id from the request
    # the ranks know (a live view is never another request's).
    prompt_view: Sequence[int]
    seq_ids: list[str]


@dataclass
class _SentSeq:
    handle: int
    # Generated tokens the ranks have.
    num_output_tokens: int
    # The block table the ranks have (a copy).
    block_table: list[int]


class StepEncoder:
    """The driver's record of what the ranks know, and the diff of each step against it."""

    def __init__(self) -> None:
        self._requests: dict[str, _SentRequest] = {}
        self._seqs: dict[str, _SentSeq] = {}
        self._free_handles: list[int] = []  # a heap: the smallest handles pickle shortest
        self._num_handles = 0
        self._to_forget: list[str] = []  # requests the next message makes the ranks forget

    @property
    def num_known_seqs(self) -> int:
        return len(self._seqs)

    def encode(self, scheduler_output: SchedulerOutput,
               live_request_ids: Container[str]) -> StepMessage:
        """The step as a diff; `live_request_ids` holds every request still unfinished."""
        finished = self._to_forget + self._forget(
            [rid for rid in self._requests if rid not in live_request_ids])
        self._to_forget = []
        extras = {name: getattr(scheduler_output, name) for name in _EXTRA_FIELDS
                  if _is_set(getattr(scheduler_output, name))}
        msg = StepMessage(finished, [], [], [], [], [], [], [], [], [], [],
                          scheduler_output.blocks_to_swap_out,
                          scheduler_output.blocks_to_swap_in, scheduler_output.blocks_to_copy,
                          extras)
        for i, item in enumerate(scheduler_output.scheduled):
            sent_request = self._requests.get(item.request_id)
            if sent_request is not None and sent_request.prompt_view is not item.prompt_token_ids:
                # The id of a request that ended since the last step, reused by a new one.
                msg.finished_request_ids.extend(self._forget([item.request_id]))
                sent_request = None
            if sent_request is None:
                sent_request = _SentRequest(item.prompt_token_ids, [])
                self._requests[item.request_id] = sent_request
                msg.new_requests.append(NewRequestData(
                    item.request_id, list(item.prompt_token_ids), item.sampling_params))
            seq = self._seqs.get(item.seq_id)
            outputs = item.output_token_ids
            if seq is None:
                seq = _SentSeq(self._take_handle(), len(outputs), list(item.block_table))
                self._seqs[item.seq_id] = seq
                sent_request.seq_ids.append(item.seq_id)
                msg.new_seqs.append(NewSeqData(seq.handle, item.request_id, item.seq_index,
                                               list(outputs), seq.block_table))
                msg.num_new_token_ids.append(0)
            else:
                new_tokens = outputs[seq.num_output_tokens:]
                msg.num_new_token_ids.append(len(new_tokens))
                msg.new_token_ids.extend(new_tokens)
                seq.num_output_tokens = len(outputs)
                table = item.block_table
                if table != seq.block_table:
                    kept = _common_prefix_len(seq.block_table, table)
                    msg.block_table_updates.append((seq.handle, kept, list(table[kept:])))
                    seq.block_table = list(table)
            msg.handles.append(seq.handle)
            msg.num_scheduled_tokens.append(item.num_tokens)
            if not item.sample:
                msg.partial_chunks.append((i, item.start_position))
            if item.min_tokens_stop_ids:
                msg.min_tokens_stop_ids.append((i, list(item.min_tokens_stop_ids)))
            if item.spec_token_ids:
                msg.speculated.append((i, list(item.spec_token_ids),
                                       [list(ids) for ids in item.spec_min_tokens_stop_ids]))
        msg.handles = _compact(msg.handles)
        msg.num_scheduled_tokens = _compact(msg.num_scheduled_tokens)
        msg.num_new_token_ids = _compact(msg.num_new_token_ids)
        return msg

    def forget_all(self) -> None:
        """Starts afresh after a message that was encoded but never sent (its caller was
        interrupted): the next message makes the ranks forget every request this encoder
        knows, and sends each again in full when next scheduled."""
        self._to_forget += list(self._requests)
        self._requests.clear()
        self._seqs.clear()
        self._free_handles.clear()
        self._num_handles = 0

    def _take_handle(self) -> int:
        if self._free_handles:
            return heapq.heappop(self._free_handles)
        self._num_handles += 1
        return self._num_handles - 1

    def _forget(self, request_ids: list[str]) -> list[str]:
        for request_id in request_ids:
            for seq_id in self._requests.pop(request_id).seq_ids:
                heapq.heappush(self._free_handles, self._seqs.pop(seq_id).handle)
        return request_ids


def _common_prefix_len(a: list[int], b: Sequence[int]) -> int:
    n = len(a)
    if len(b) >= n and b[:n] == a:
        return n  # the table grew: the common case
    kept = 0
    for x, y in zip(a, b):
        if x != y:
            break
        kept += 1
    return kept


class _RankRequest:
    __slots__ = ("handles", "prompt_token_ids", "request_id", "sampling_params")

    def __init__(self, data: NewRequestData) -> None:
        self.request_id = data.request_id
        self.prompt_token_ids = data.prompt_token_ids
        self.sampling_params = data.sampling_params
        self.handles: list[int] = []


class _RankSeq:
    __slots__ = ("block_table", "output_token_ids", "request", "seq_id", "seq_index")

    def __init__(self, request: _RankRequest, data: NewSeqData) -> None:
        self.request = request
        self.seq_index = data.seq_index
        self.seq_id = f"{data.request_id}#{data.seq_index}"
        self.output_token_ids = data.output_token_ids
        self.block_table = data.block_table


class StepDecoder:
    """A rank's copy of the sequences it runs, updated by each StepMessage."""

    def __init__(self) -> None:
        self._requests: dict[str, _RankRequest] = {}
        self._seqs: dict[int, _RankSeq] = {}

    @property
    def num_known_seqs(self) -> int:
        return len(self._seqs)

    def decode(self, msg: StepMessage) -> SchedulerOutput:
        for request_id in msg.finished_request_ids:
            # NOTE: after StepEncoder.forget_all, the list may name requests never sent here.
            request = self._requests.pop(request_id, None)
            for handle in request.handles if request is not None else ():
                del self._seqs[handle]
        for data in msg.new_requests:
            self._requests[data.request_id] = _RankRequest(data)
        for seq_data in msg.new_seqs:
            request = self._requests[seq_data.request_id]
            request.handles.append(seq_data.handle)
            self._seqs[seq_data.handle] = _RankSeq(request, seq_data)
        for handle, kept, appended in msg.block_table_updates:
            table = self._seqs[handle].block_table
            del table[kept:]
            table.extend(appended)
        partial = dict(msg.partial_chunks)
        min_tokens = dict(msg.min_tokens_stop_ids)
        speculated = {i: (ids, stops) for i, ids, stops in msg.speculated}
        scheduled = []
        offset = 0
        for i, (handle, num_tokens, num_new) in enumerate(
                zip(msg.handles, msg.num_scheduled_tokens, msg.num_new_token_ids)):
            seq = self._seqs[handle]
            outputs = seq.output_token_ids
            if num_new:
                outputs.extend(msg.new_token_ids[offset : offset + num_new])
                offset += num_new
            prompt = seq.request.prompt_token_ids
            spec_ids, spec_stops = speculated.get(i, ([], []))
            num_known = num_tokens - len(spec_ids)  # the proposals are not outputs yet
            start = partial.get(i)
            sample = start is None
            if sample:
                start = len(prompt) + len(outputs) - num_known
            token_ids = _token_slice(prompt, outputs, start, start + num_known)
            scheduled.append(ScheduledRequest(
                request_id=seq.request.request_id,
                seq_index=seq.seq_index,
                seq_id=seq.seq_id,
                token_ids=token_ids + spec_ids if spec_ids else token_ids,
                start_position=start,
                block_table=seq.block_table,
                sample=sample,
                sampling_params=seq.request.sampling_params,
                prompt_token_ids=prompt,
                output_token_ids=outputs,
                min_tokens_stop_ids=min_tokens.get(i, []),
                spec_token_ids=spec_ids,
                spec_min_tokens_stop_ids=spec_stops,
            ))
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(msg.num_scheduled_tokens),
            blocks_to_swap_out=msg.blocks_to_swap_out,
            blocks_to_swap_in=msg.blocks_to_swap_in,
            blocks_to_copy=msg.blocks_to_copy,
            **msg.extras,
        )


def _token_slice(prompt: list[int], outputs: list[int], start: int, end: int) -> list[int]:
    """prompt + outputs, [start, end), without building the concatenation.
    E.g. prompt [5, 6, 7], outputs [8, 9]: (2, 4) -> [7, 8]."""
    num_prompt = len(prompt)
    if start >= num_prompt:
        return outputs[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return prompt[start:end]
    return prompt[start:] + outputs[: end - num_prompt]


# ---- the reply: rank 0's sampled tokens, in the order of the rows that sample ---------------

SampledRow = tuple[int, Any, Any, Any]  # token_id, logprob, rank, top_logprobs
# ModelRunnerOutput's fields besides `sampled`, which travel as they are.
_REPLY_EXTRA_FIELDS = [f.name for f in fields(ModelRunnerOutput) if f.name != "sampled"]


def encode_runner_output(scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
                         ) -> tuple[list[SampledRow], dict[str, Any]]:
    sampled = runner_output.sampled
    rows = []
    for item in scheduler_output.scheduled:
        if item.sample:
            t = sampled[item.seq_id]
            rows.append((t.token_id, t.logprob, t.rank, t.top_logprobs))
    return rows, {name: getattr(runner_output, name) for name in _REPLY_EXTRA_FIELDS}


def decode_runner_output(scheduler_output: SchedulerOutput,
                         reply: tuple[list[SampledRow], dict[str, Any]]) -> ModelRunnerOutput:
    rows, extras = reply
    items = [item for item in scheduler_output.scheduled if item.sample]
    assert len(items) == len(rows), (len(items), len(rows))
    return ModelRunnerOutput(sampled={
        item.seq_id: SampledToken(token_id, logprob, rank, top)
        for item, (token_id, logprob, rank, top) in zip(items, rows)
    }, **extras)
