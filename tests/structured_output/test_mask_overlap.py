"""The step's bitmask filled on the scheduler's mask thread beside the forward pass: the batch
fill equals the row-by-row one, a pending bitmask pickles as its array (what the mp and ray
executors send), and the overlapped engine samples the tokens of a synchronous fill, in process
and through the `mp` executor; llguidance's token tables built at engine start serve later
compiles."""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pagedllm import LLM
from pagedllm.core import grammar_mask
from pagedllm.core.grammar_mask import GrammarMaskBuilder, PendingGrammarBitmask
from pagedllm.core.interface import SchedulerOutput
from pagedllm.executor.step_message import StepDecoder, StepEncoder
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output import llguidance_backend
from pagedllm.structured_output.backend import make_backend
from pagedllm.structured_output.manager import (
    OVERLAP_ENV,
    EosOnlyGrammar,
    grammar_mask_overlap,
)

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                 "maxItems": 2},
    },
    "required": ["id", "kind", "tags"],
    "additionalProperties": False,
}


def test_batch_fill_equals_row_by_row(manager, tokenizer):
    """Grammars at the start, inside a string, inside a number, finished, refused (error
    state) and one that failed to compile, on rows with unconstrained ones between them."""
    template = manager.compile(StructuredOutputsParams(json=SCHEMA)).result(timeout=60)
    texts = ["", '{"id":1', '{"id":12,"kind":"b","tags":["ab', '{"id":7,"kind":"a","tags":[]}']
    grammars = []
    for text in texts:
        grammar = template.copy()
        assert grammar.accept_tokens(tokenizer.encode(text))
        grammars.append(grammar)
    assert grammars[3].accept_tokens([tokenizer.eos_token_id]) and grammars[3].is_terminated()
    refused = template.copy()
    assert not refused.accept_tokens(tokenizer.encode("nope"))
    grammars.append(refused)
    grammars.append(EosOnlyGrammar(VOCAB, tokenizer.eos_token_id))
    rows = [(2 * i + 1, grammar) for i, grammar in enumerate(grammars)]  # even rows: free

    bitmask = grammar_mask.fill_grammar_bitmask(2 * len(grammars) + 1, rows)
    expected = np.full_like(bitmask, -1)
    for row, grammar in rows:
        grammar.fill_bitmask(expected, row)
    assert np.array_equal(bitmask, expected)
    assert (bitmask[0::2] == -1).all()
    allowed = [np.unpackbits(bitmask[row].view(np.uint8), bitorder="little").sum()
               for row, _ in rows]
    assert allowed[0] < 10 and allowed[2] > 100  # "{" alone; the letters of a tag
    assert allowed[3:] == [1, 1, 1]  # EOS alone


def test_a_pending_bitmask_pickles_and_travels_as_its_array(manager):
    """What the mp and ray executors do with a step: encode, pickle, unpickle, decode."""
    grammar = manager.compile(StructuredOutputsParams(json=SCHEMA)).result(timeout=60).copy()
    with grammar_mask.ThreadPoolExecutor(1) as pool:
        future = pool.submit(grammar_mask.fill_grammar_bitmask, 3, [(1, grammar)])
        out = SchedulerOutput(scheduled=[], num_batched_tokens=0)
        out.grammar_bitmask = PendingGrammarBitmask(future)
        expected = future.result()

    assert np.array_equal(pickle.loads(pickle.dumps(PendingGrammarBitmask(future))), expected)
    message = StepEncoder().encode(out, live_request_ids=())
    wire = pickle.loads(pickle.dumps(message.to_wire(), protocol=pickle.HIGHEST_PROTOCOL))
    decoded = StepDecoder().decode(type(message).from_wire(wire))
    assert isinstance(decoded.grammar_bitmask, np.ndarray)
    assert np.array_equal(decoded.grammar_bitmask, expected)
    # Read in process, it waits for the fill and keeps the array.
    assert np.array_equal(out.grammar_bitmask, expected)
    assert isinstance(out._grammar_bitmask, np.ndarray)


# ---- through the engine (a tiny random model: fast) -------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=VOCAB)


def workload():
    """8 constrained requests at temperature 1.0 (seeded) among 4 free ones, varied prompts."""
    prompts, params = [], []
    for i in range(12):
        prompts.append({"prompt_token_ids": [(37 * i + 11 * j) % 500 + 3 for j in range(5 + i)]})
        constraint = (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
                      if i % 3 else None)
        # NOTE: compact, the longest object is under 64 tokens: every constrained one ends.
        params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=64,
                                     structured_outputs=constraint))
    return prompts, params


def generate(llm: LLM) -> list[list[int]]:
    prompts, params = workload()
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> LLM:
    # NOTE: without a prefix cache, the second run of the workload starts as the first did.
    return LLM(str(tiny_dir), num_kv_blocks=256, block_size=8, dtype="float32",
               enable_prefix_caching=False)


@pytest.fixture(scope="module")
def synchronous_tokens(tiny):
    """The tokens with each bitmask filled in the scheduler before the step runs (no overlap)."""
    with pytest.MonkeyPatch.context() as patch:
        start = GrammarMaskBuilder.start

        def sync_start(builder, *args):
            pending = start(builder, *args)
            return pending.result() if isinstance(pending, PendingGrammarBitmask) else pending

        patch.setattr(GrammarMaskBuilder, "start", sync_start)
        return generate(tiny)


def test_the_overlap_is_chosen_by_spare_cores_unless_set(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "1")
    assert grammar_mask_overlap()
    monkeypatch.setenv(OVERLAP_ENV, "0")
    assert not grammar_mask_overlap()
    monkeypatch.setenv(OVERLAP_ENV, "auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: len(os.sched_getaffinity(0)))
    assert not grammar_mask_overlap()  # the forward's threads take every core
    monkeypatch.setattr(torch, "get_num_threads", lambda: len(os.sched_getaffinity(0)) - 1)
    assert grammar_mask_overlap()  # a core is left beside them
    monkeypatch.setenv(OVERLAP_ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, 1 or 0"):
        grammar_mask_overlap()


def test_the_overlapped_fill_samples_the_tokens_of_a_synchronous_one(tiny, synchronous_tokens):
    threads = set()
    fill = grammar_mask.fill_grammar_bitmask

    def recording_fill(*args):
        threads.add(threading.current_thread().name.split("_")[0])
        return fill(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grammar_mask, "fill_grammar_bitmask", recording_fill)
        patch.setattr(tiny.llm_engine.scheduler._grammar_masks, "overlap", True)
        tokens = generate(tiny)
    assert threads == {"pagedllm-mask"}
    assert tokens == synchronous_tokens
    assert all(json.loads(tiny.get_tokenizer().decode(t, skip_special_tokens=True))
               for i, t in enumerate(tokens) if i % 3)


@pytest.mark.slow
def test_the_mp_executor_carries_the_bitmask(tiny_dir, synchronous_tokens):
    """The step message carries the finished array to the worker process."""
    llm = LLM(str(tiny_dir), num_kv_blocks=256, block_size=8, dtype="float32",
              enable_prefix_caching=False, distributed_executor_backend="mp")
    try:
        assert generate(llm) == synchronous_tokens
    finally:
        llm.shutdown()


# ---- token tables shared within a process -----------------------------------------------------

def test_tables_built_once_serve_every_backend_of_the_same_files(tokenizer_dir, monkeypatch):
    """Two tokenizers loaded from the same files (two engines) share the tables the first
    backend built; a tokenizer without files gets its own."""
    monkeypatch.setattr(llguidance_backend, "_tables", OrderedDict())
    first = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    second = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    make_backend("guidance", first, VOCAB)._get_ll_tokenizer()
    key = llguidance_backend._tables_key(first, VOCAB)
    assert key is not None and key in llguidance_backend._tables
    backend = make_backend("guidance", second, VOCAB)
    assert backend._get_ll_tokenizer() is llguidance_backend._tables[key]
    assert llguidance_backend._tables_key(second, VOCAB + 64) != key
    second.name_or_path = ""
    assert llguidance_backend._tables_key(second, VOCAB) is None
