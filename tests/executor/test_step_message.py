"""The step message, in this process: every step of an in-process engine goes through
StepEncoder -> pickle -> StepDecoder, must come out equal to the scheduler's SchedulerOutput,
and is what the worker runs. Random settings under memory pressure (swap and recompute
preemption, prefix caching, chunked prefill, n / best_of, beam search, min_tokens), reused
request ids and aborts; and the message's size per decode step at batch 64."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.core.interface import SchedulerOutput
from pagedllm.executor.step_message import StepDecoder, StepEncoder, StepMessage

MAX_STEPS = 1500


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


class RoundTrip:
    """Routes an LLM's steps through the message; records (batch, bytes, tokens) per step."""

    def __init__(self, llm: LLM) -> None:
        self.encoder = StepEncoder()
        self.decoder = StepDecoder()
        self.steps: list[tuple[int, int, int]] = []
        executor = llm.llm_engine.model_executor
        run = executor.execute_model

        def execute_model(scheduler_output: SchedulerOutput, live_request_ids=()):
            message = self.encoder.encode(scheduler_output, live_request_ids)
            # As MultiprocExecutor sends it (with its 1-byte kind).
            payload = pickle.dumps((0, message.to_wire()), protocol=pickle.HIGHEST_PROTOCOL)
            decoded = self.decoder.decode(StepMessage.from_wire(pickle.loads(payload)[1]))
            assert_same_step(decoded, scheduler_output)
            self.steps.append((len(scheduler_output.scheduled), len(payload),
                               scheduler_output.num_batched_tokens))
            return run(decoded, live_request_ids)

        executor.execute_model = execute_model


def assert_same_step(got: SchedulerOutput, want: SchedulerOutput) -> None:
    assert len(got.scheduled) == len(want.scheduled)
    for g, w in zip(got.scheduled, want.scheduled):
        for f in dataclasses.fields(w):
            a, b = getattr(g, f.name), getattr(w, f.name)
            if f.name in ("block_table", "prompt_token_ids", "output_token_ids"):
                a, b = list(a), list(b)
            assert a == b, (w.seq_id, f.name, a, b)
    # Every other field, whatever SchedulerOutput holds (preemptions are the driver's only).
    for f in dataclasses.fields(want):
        if f.name not in ("scheduled", "preempted_request_ids"):
            a, b = getattr(got, f.name), getattr(want, f.name)
            assert a is b or (a is not None and b is not None and _equal(a, b)), f.name


def _equal(a, b) -> bool:
    equal = a == b
    return bool(equal.all()) if hasattr(equal, "all") else bool(equal)  # numpy arrays too


def draw_case(rng: random.Random) -> tuple[dict, list]:
    block_size = rng.choice([4, 8])
    mode = rng.choice(["recompute", "swap"])
    settings = {
        "num_kv_blocks": rng.randint(10, 20), "block_size": block_size, "preemption_mode": mode,
        "swap_space": rng.choice([0.0002, 0.01]) if mode == "swap" else 0.0,
        "enable_prefix_caching": rng.random() < 0.5, "max_num_seqs": rng.choice([4, 256]),
        "max_num_batched_tokens": rng.choice([8, 32, 2048]),
    }
    shared = [rng.randrange(3, 512) for _ in range(2 * block_size)]
    requests = []
    for _ in range(rng.randint(4, 8)):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(1, 3 * block_size))]
        if rng.random() < 0.4:
            prompt = shared + prompt  # a prefix-cache hit when caching is on
        max_tokens = rng.randint(1, 3 * block_size)
        if rng.random() < 0.2:
            params = BeamSearchParams(beam_width=rng.randint(2, 3), max_tokens=max_tokens,
                                      ignore_eos=True)
        else:
            n = rng.randint(1, 3)
            params = SamplingParams(temperature=1.0 if n > 1 else rng.choice([0.0, 1.0]),
                                    seed=rng.randint(0, 99), n=n, max_tokens=max_tokens,
                                    min_tokens=rng.choice([0, 0, max_tokens]),
                                    ignore_eos=rng.random() < 0.5)
        requests.append(({"prompt_token_ids": prompt}, params))
    return settings, requests


def run(llm: LLM, requests: list, add_every: int = 2) -> dict[str, list[list[int]]]:
    """Adds the requests one every `add_every` steps (so later ones join running decodes) and
    steps until all finish; returns each accepted request's token lists."""
    engine = llm.llm_engine
    pending = list(enumerate(requests))
    finished: dict[str, list[list[int]]] = {}
    accepted = []
    for step in range(MAX_STEPS):
        if pending and step % add_every == 0:
            index, (prompt, params) = pending.pop(0)
            try:
                engine.add_request(f"r{index}", prompt, params)
                accepted.append(f"r{index}")
            except ValueError:
                pass  # could never fit this cache
        if not pending and not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
    assert sorted(finished) == sorted(accepted)
    return finished


# Seeds whose cases, between them, swap out and in, preempt by recompute, copy on write, chunk
# prefills, hold min_tokens back and run beam searches.
@pytest.mark.parametrize("case", [0, 1, 2, 3, 6, 7])
def test_every_step_decodes_to_the_schedulers_output(tiny_dir, case):
    """Equal inputs make equal outputs: the worker ran the decoded steps, so the engine's
    outputs are those of the plain path (test_scheduler_fuzz checks those)."""
    settings, requests = draw_case(random.Random(2300 + case))
    llm = LLM(str(tiny_dir), **settings)
    trip = RoundTrip(llm)
    run(llm, requests)
    assert trip.steps
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    # One more request: its first message makes both ends forget every finished one.
    run(llm, [({"prompt_token_ids": [7, 8, 9]}, SamplingParams(max_tokens=1))])
    assert trip.encoder.num_known_seqs == trip.decoder.num_known_seqs == 1


def test_a_reused_request_id_and_an_abort_start_afresh(tiny_dir):
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8)
    trip = RoundTrip(llm)
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8, 9]}, greedy)
    engine.add_request("b", {"prompt_token_ids": [11, 12, 13]}, greedy)
    engine.step()
    engine.step()
    engine.abort_request("b")
    while engine.has_unfinished_requests():
        engine.step()
    # "a" ended; the same id comes back with another prompt before any other step.
    engine.add_request("a", {"prompt_token_ids": [40, 41]}, greedy)
    engine.add_request("b", {"prompt_token_ids": [50, 51, 52]}, greedy)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert {o.request_id for o in outputs} <= {"a", "b"}
    assert trip.encoder.num_known_seqs == 2


def test_decode_message_bytes_at_batch_64(tiny_dir):
    """The control message of a decode step at batch 64: one handle, one token count and one
    new token per sequence, plus a block id now and then (the number is in docs/distributed.md).
    """
    llm = LLM(str(tiny_dir), num_kv_blocks=1024, block_size=16)
    trip = RoundTrip(llm)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(20, 120))]}
               for _ in range(64)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                 use_tqdm=False)
    decode = [size for batch, size, tokens in trip.steps if batch == 64 and tokens == 64]
    first = trip.steps[0]
    print(f"\nfirst step: batch {first[0]}, {first[2]} tokens, {first[1]} bytes; decode at "
          f"batch 64: {min(decode)}..{max(decode)} bytes, mean {sum(decode) / len(decode):.0f}")
    assert len(decode) >= 20
    assert max(decode) < 600


def test_a_message_never_sent_is_made_up_for(tiny_dir):
    """A caller interrupted between encoding a step and sending it: `forget_all`, and the
    next message makes the ranks forget everything and sends it all afresh."""
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8)
    trip = RoundTrip(llm)
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8, 9][: 2 + i]} for i in range(3)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"x{i}", prompt, greedy)
    for step in range(4):
        engine.step()
    # The next step is encoded, then dropped as if Ctrl-C came before it was sent.
    trip.encoder.encode(engine.scheduler.schedule(), engine.scheduler.requests)
    trip.encoder.forget_all()
    # (the scheduler re-plans the same tokens next step: nothing was computed)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    plain = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8)
    want = plain.generate(prompts, greedy, use_tqdm=False)
    assert [finished[f"x{i}"] for i in range(3)] == [o.outputs[0].token_ids for o in want]


def test_speculative_rows_travel_with_their_proposals(tiny_dir):
    """Rows that verify n-gram proposals end with them; the ranks must get the proposals (not
    outputs yet) and their min_tokens ids, or they would verify nothing."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "disable_by_batch_size": 64}
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8, speculative_config=spec)
    trip = RoundTrip(llm)
    rng = random.Random(7)
    requests = []
    for i in range(4):
        phrase = [rng.randrange(3, 512) for _ in range(4)]
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                min_tokens=8 if i % 2 else 0)
        requests.append(({"prompt_token_ids": phrase * 4 + phrase[:2]}, params))
    run(llm, requests, add_every=1)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_draft_tokens > 0  # assert_same_step checked those rows
    assert stats.num_free_blocks == stats.num_blocks
