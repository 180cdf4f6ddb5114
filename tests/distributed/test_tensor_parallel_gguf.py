"""A GGUF whose row-parallel layers' blocks would be split by tensor parallelism: on
quantization="auto" it runs dequantized (as auto does wherever the GGUF kernels cannot run),
on quantization="gguf" it is refused with a clear error naming the tensor and its blocks."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.models import gguf_loader
from pagedllm.ops import cpu_ops
from tests.models.test_quantized import write_tiny_llama_gguf

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the GGUF kernels need the ops")


@pytest.fixture(scope="module")
def split_gguf(tmp_path_factory):
    """ffn_down in Q4_K (256 values a block) with 256 inputs: 128 per rank at size 2."""
    path = tmp_path_factory.mktemp("tp-gguf") / "tiny-llama-q4k-down.gguf"
    write_tiny_llama_gguf(path, {"ffn_down": "Q4_K"}, hidden=256, ffn=256)
    return path


def test_rank_split_error_names_the_split_tensor(split_gguf) -> None:
    assert gguf_loader.rank_split_error(split_gguf, 1) is None
    reason = gguf_loader.rank_split_error(split_gguf, 2)
    assert reason is not None
    assert "ffn_down" in reason and "Q4_K" in reason and "128 inputs per rank" in reason


def test_auto_at_tp2_runs_dequantized_and_gguf_is_refused(split_gguf) -> None:
    kwargs = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 8,
              "tensor_parallel_size": 2}
    prompts = [{"prompt_token_ids": [5, 17, 300, 42, 9, 1000]}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with pytest.raises(ValueError, match="ffn_down.*blocks of 256.*quantization='none'"):
        LLM(str(split_gguf), quantization="gguf", **kwargs)
    outputs = {}
    for quantization in ("auto", "none"):
        llm = LLM(str(split_gguf), quantization=quantization, **kwargs)
        try:
            outputs[quantization] = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0]
        finally:
            llm.shutdown()
    assert len(outputs["auto"].token_ids) == 6
    assert outputs["auto"].token_ids == outputs["none"].token_ids
