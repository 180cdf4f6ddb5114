"""int8's smoothing (layers/quantization/int8_calibration.py) through LLM on a tiny random
Llama: folded alone (no quantization) it leaves the model's outputs bit for bit as they were,
in fp32 and bf16, and it is applied where it claims."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization import int8_calibration
from pagedllm.layers.quantization.int8 import SMOOTHING_ENV, Int8Config
from pagedllm.models import loader
from tests.hf_reference import ragged_prompts, token_prompts
from tests.models.test_quantized import model_of


class SmoothedDense(Int8Config):
    """int8's calibration (smoothing) with every layer left dense: the smoothing alone, with
    its first alpha everywhere (no search)."""

    smoothing_search = False  # the property's override

    def get_linear_method(self, layer, prefix):
        return None


def norm_weights(llm: LLM) -> list[torch.Tensor]:
    return [layer.input_layernorm.weight.detach().clone() for layer in model_of(llm).layers]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smoothing_alone_leaves_outputs_exact(tiny_llama_factory, monkeypatch, dtype) -> None:
    """Power-of-two scales folded into the norms, v's and up's rows: the same logprobs bit for
    bit as the unsmoothed model (GQA: 4 query heads on 2 KV heads; biases on v and up)."""
    monkeypatch.setenv("PAGEDLLM_PACKED_WEIGHT_CACHE", "0")  # smoothed packings are not cached
    model_dir = tiny_llama_factory(num_kv_heads=2, attention_bias=True, mlp_bias=True, seed=7)
    prompts = token_prompts(ragged_prompts(6, seed=3, max_len=50))
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=3,
                            ignore_eos=True)
    kwargs = {"dtype": dtype, "num_kv_blocks": 64}
    dense = LLM(str(model_dir), quantization="none", **kwargs)
    expected = dense.generate(prompts, params, use_tqdm=False)
    dense_norms = norm_weights(dense)
    del dense

    monkeypatch.setattr(loader, "_quant_config",
                        lambda *args: SmoothedDense(activation_bits=8, smoothing_alphas=(0.5,)))
    smoothed = LLM(str(model_dir), quantization="int8", **kwargs)
    changed = [not torch.equal(a, b) for a, b in zip(dense_norms, norm_weights(smoothed))]
    assert all(changed)  # the scales were folded in (none is all ones on this model)
    got = smoothed.generate(prompts, params, use_tqdm=False)
    for want, out in zip(expected, got):
        assert out.prompt_logprobs == want.prompt_logprobs
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert out.outputs[0].logprobs == want.outputs[0].logprobs


def test_smoothing_scales_are_powers_of_two() -> None:
    act = torch.tensor([0.0, 1.0, 3.0, 100.0, 1e-3])
    weight = torch.tensor([[0.5, 0.0, -2.0, 0.1, 1.0], [0.25, 0.0, 1.0, -0.3, 0.0]])
    s = int8_calibration.smoothing_scale(act, weight, 0.5, shared=False)
    assert s[0] == 1 and s[1] == 1  # a dead channel or column keeps its scale
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    # sqrt(max|x| / max|w|) to the nearest power of two: sqrt(3 / 2) -> 1, sqrt(100 / 0.3) -> 16
    assert s[2] == 1 and s[3] == 16 and s[4] == 1 / 32


def test_smoothing_setting(monkeypatch) -> None:
    monkeypatch.setenv(SMOOTHING_ENV, "off")
    assert Int8Config(activation_bits=8).smoothing_alphas == ()
    monkeypatch.setenv(SMOOTHING_ENV, "0.7")
    assert Int8Config(activation_bits=16).smoothing_alphas == (0.7,)
    monkeypatch.setenv(SMOOTHING_ENV, "0.5,0.8")
    assert Int8Config(activation_bits=8).smoothing_alphas == (0.5, 0.8)
    for bad in ("2", "half"):
        monkeypatch.setenv(SMOOTHING_ENV, bad)
        with pytest.raises(ValueError, match=SMOOTHING_ENV):
            Int8Config(activation_bits=8)


def test_int8_loads_with_a_context_shorter_than_the_calibration_window(
        tiny_llama_factory) -> None:
    """Calibration runs the model over windows no longer than its positions: int8 on a model
    of 256 positions (CALIBRATION_WINDOW is 512) loads and generates (it raised 'position 300
    out of range' from the rotary table)."""
    assert int8_calibration.CALIBRATION_WINDOW > 256
    model_dir = tiny_llama_factory(num_kv_heads=2, max_position_embeddings=256, seed=4)
    llm = LLM(str(model_dir), quantization="int8", num_kv_blocks=32)
    out = llm.generate([{"prompt_token_ids": [5, 17, 300, 42]}],
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4
