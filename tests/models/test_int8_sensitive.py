"""int8's sensitive projections (PAGEDLLM_INT8_SENSITIVE, layers/quantization/int8.py): with
8-bit activations, the calibration keeps the projections where more precision cuts the
quantized output's error most (int8_calibration.choose_sensitive) as 16-bit activations
(a16), 16-bit weights (w16) or groups of 16 (g16), on the W8A8 GEMM's panels; through LLM on a
tiny random Llama each keeps a request's bits alone as in a batch, and top-1 agreement."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.int8 import (
    ACTIVATION_BITS_ENV,
    SENSITIVE_ENV,
    Int8Config,
    Int8LinearMethod,
)
from pagedllm.layers.quantization.int8_calibration import choose_sensitive
from pagedllm.ops import cpu_ops
from tests.models.test_quantized import model_of

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the W8A8 GEMM needs the ops")


def test_choose_sensitive_takes_the_largest_gain_per_weight() -> None:
    sensitivity = [(None, 4.0, 100), (None, 3.0, 50), (None, 0.0, 10), (None, 6.0, 300),
                   (None, 1.0, 25), (None, -1.0, 5)]
    # Gains per weight: 0.04, 0.06, 0, 0.02, 0.04, < 0; 490 weights in all.
    assert choose_sensitive(sensitivity, 0.0) == []
    assert choose_sensitive(sensitivity, 0.11) == [1]  # 53.9 weights: only the 50 fit
    # 0.3: 147 weights: 50, then 100 does not fit (ties keep the earlier first), then 25.
    assert choose_sensitive(sensitivity, 0.3) == [1, 4]
    assert choose_sensitive(sensitivity, 0.4) == [0, 1, 4]
    assert choose_sensitive(sensitivity, 1.0) == [0, 1, 3, 4]  # never one without a gain
    assert choose_sensitive(list(sensitivity), 0.4) == choose_sensitive(sensitivity, 0.4)


def test_sensitive_setting(monkeypatch) -> None:
    monkeypatch.setenv(SENSITIVE_ENV, "w16=0.25")
    config = Int8Config(activation_bits=8)
    assert (config.sensitive_kind, config.sensitive_share) == ("w16", 0.25)
    assert Int8Config(activation_bits=16).sensitive_share == 0.0  # 8-bit activations only
    monkeypatch.setenv(SENSITIVE_ENV, "off")
    assert Int8Config(activation_bits=8).sensitive_share == 0.0
    for bad in ("w16", "w32=0.5", "g16=2", "a16=half"):
        monkeypatch.setenv(SENSITIVE_ENV, bad)
        with pytest.raises(ValueError, match=SENSITIVE_ENV):
            Int8Config(activation_bits=8)


@pytest.mark.parametrize("kind", ["a16", "w16", "g16"])
def test_sensitive_projections_keep_batch_invariance(tiny_llama_factory, monkeypatch,
                                                     kind) -> None:
    """Half the weights kept as `kind` (their own layout, the rest W8A8 panels of 32): a
    greedy request's tokens and logprobs bit for bit the same alone and in a ragged batch."""
    monkeypatch.setenv(ACTIVATION_BITS_ENV, "8")
    monkeypatch.setenv("PAGEDLLM_INT8_GROUP_SIZE", "32")
    monkeypatch.setenv(SENSITIVE_ENV, f"{kind}=0.5")
    model_dir = tiny_llama_factory(num_kv_heads=2, seed=3)
    llm = LLM(str(model_dir), quantization="int8", dtype="bfloat16", num_kv_blocks=128)
    methods = [m.linear_method for m in model_of(llm).modules()
               if isinstance(getattr(m, "linear_method", None), Int8LinearMethod)]
    kinds = {(m.weight_bits, m.activation_bits, m.group_size) for m in methods}
    expected = {"a16": (8, 16, 32), "w16": (16, 8, 32), "g16": (8, 8, 16)}[kind]
    assert kinds == {(8, 8, 32), expected}, kinds
    dims = {"a16": 4, "w16": 4, "g16": 3}[kind]
    assert all(m.int8_scales.dim() == (dims if (m.linear_method.weight_bits,
                                                m.linear_method.activation_bits,
                                                m.linear_method.group_size) == expected else 3)
               for m in model_of(llm).modules() if getattr(m, "int8_weight", None) is not None)
    rng = random.Random(0)
    target = [rng.randrange(3, 500) for _ in range(40)]
    others = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 70))] for _ in range(7)]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": target}], params, use_tqdm=False)[0].outputs[0]
    batch = [{"prompt_token_ids": p} for p in others[:3] + [target] + others[3:]]
    mixed = llm.generate(batch, params, use_tqdm=False)[3].outputs[0]
    assert mixed.token_ids == alone.token_ids
    assert mixed.logprobs == alone.logprobs

