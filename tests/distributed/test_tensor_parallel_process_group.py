"""The native decoder stack under tensor parallelism when the ranks share no memory (Ray
across machines): the stack all-reduces through the process group (gloo) from inside its one
native call. PAGEDLLM_TP_COMM=process_group forces that path on one host. Through the public
API, with `mp` and `ray`: greedy fp32 outputs at size 2 equal size 1 under a ragged batch with
preemption, and each rank's stack ran, calling the process group's all-reduce twice per
layer per call."""

from __future__ import annotations

import os
import sys

import pytest
from test_tensor_parallel import SETTINGS, as_inputs, prompts_of

from pagedllm import LLM, SamplingParams


def stack_collectives(worker) -> tuple[bool, int, int, int]:
    """On a rank: whether its stack has no shared buffer, its calls, the process group
    all-reduces this process ran, its layers."""
    stack = worker.model.native_stack
    pg_comm = sys.modules.get("pagedllm.distributed.pg_comm")
    return (stack is not None and stack.comm is None, 0 if stack is None else stack.num_calls,
            0 if pg_comm is None else pg_comm.num_all_reduces, len(worker.model.layers))


@pytest.fixture(scope="module")
def model_and_tp1(tiny_llama_factory):
    # Its own model (seed): another module's checkpoint-read counts assume a cold packed-weight
    # cache for theirs.
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, seed=11)
    prompts = prompts_of(8, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLM(str(model_dir), **SETTINGS) as one:
        want = [o.outputs[0].token_ids for o in one.generate(as_inputs(prompts), greedy,
                                                              use_tqdm=False)]
    return model_dir, prompts, greedy, want


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_stack_all_reduces_through_the_process_group(backend, model_and_tp1, monkeypatch):
    if backend == "ray":
        ray = pytest.importorskip("ray")
        if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
            pytest.skip("this test starts (and stops) its own local Ray instance")
        # The actors cannot import this module: its function travels by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model_dir, prompts, greedy, want = model_and_tp1
    monkeypatch.setenv("PAGEDLLM_TP_COMM", "process_group")
    with LLM(str(model_dir), tensor_parallel_size=2, distributed_executor_backend=backend,
             **SETTINGS) as two:
        before = two.llm_engine.get_stats()
        got = [o.outputs[0].token_ids for o in two.generate(as_inputs(prompts), greedy,
                                                             use_tqdm=False)]
        assert two.llm_engine.get_stats().num_preemptions > before.num_preemptions
        states = two.llm_engine.model_executor.collective_rpc(stack_collectives)
    assert got == want
    for no_shared_buffer, calls, all_reduces, num_layers in states:
        assert no_shared_buffer and calls > 0
        assert all_reduces == 2 * num_layers * calls


def test_an_unknown_collective_choice_is_refused(model_and_tp1, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_TP_COMM", "carrier_pigeon")
    with pytest.raises(ValueError, match="PAGEDLLM_TP_COMM='carrier_pigeon'.*process_group"):
        LLM(str(model_and_tp1[0]), tensor_parallel_size=2, **SETTINGS)
