"""The native decoder stack's quantized path under tensor parallelism: at
tensor_parallel_size=2 each rank runs its int8 shards through the stack (the o and down
projections' partial sums all-reduced inside the call), and greedy tokens and logprobs equal
the per-module path's on the same ranks (the same kernels on the same shards)."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.models.llama_stack import QUANTIZED


def stack_path(worker) -> int | None:
    stack = worker.model.native_stack
    return None if stack is None else stack.linear_path(1)


def drop_stack(worker) -> None:
    worker.model.native_stack = None


@pytest.mark.slow
def test_int8_stack_on_each_rank_matches_the_module_path(tiny_llama_factory):
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, attention_bias=True,
                                   mlp_bias=True, seed=3)
    llm = LLM(str(model_dir), tensor_parallel_size=2, quantization="int8", dtype="float32",
              num_kv_blocks=64, block_size=8)
    try:
        executor = llm.llm_engine.model_executor
        assert executor.collective_rpc(stack_path) == [QUANTIZED, QUANTIZED]
        rng = random.Random(4)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))]}
                   for _ in range(6)]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)

        def run():
            return [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                    for o in llm.generate(prompts, params, use_tqdm=False)]

        with_stack = run()
        executor.collective_rpc(drop_stack)
        assert executor.collective_rpc(stack_path) == [None, None]
        assert run() == with_stack
    finally:
        llm.shutdown()
