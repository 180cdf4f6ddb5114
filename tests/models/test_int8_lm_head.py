"""int8's tied LM head (PAGEDLLM_INT8_LM_HEAD): an int8 copy of the embedding on the W8A8 GEMM
(fp32 logits), its top logits rescored exactly from the dense table the lookups keep; an
untied head and "dense" keep the head as it was."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.int8 import Int8Config, Int8LinearMethod
from pagedllm.layers.quantization.int8_lm_head import LM_HEAD_ENV, RESCORE_MARGIN, rescore_logits
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead
from pagedllm.ops import cpu_ops
from tests.models.test_quantized import model_of

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the W8A8 GEMM needs the ops")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_head_is_an_int8_copy(tiny_llama_factory, monkeypatch, dtype) -> None:
    monkeypatch.setenv(LM_HEAD_ENV, "32")
    model_dir = tiny_llama_factory(num_kv_heads=2, tie_word_embeddings=True, seed=4)
    dense = LLM(str(model_dir), dtype=dtype, quantization="none", num_kv_blocks=32)
    table = model_of(dense).get_input_embeddings().weight.detach().clone()
    del dense
    llm = LLM(str(model_dir), dtype=dtype, quantization="int8", num_kv_blocks=32)
    model = model_of(llm)
    head = model.lm_head
    assert isinstance(head, ParallelLMHead) and model.tied_lm_head is None
    assert isinstance(head.linear_method, Int8LinearMethod) and head.linear_method.logits
    group = 32
    assert head.int8_scales.dim() == 3 and head.int8_scales.shape[1] == 64 // group
    assert head.weight.numel() == 0  # the dense copy freed once packed
    # The lookups read the checkpoint's table, unchanged; the head its rounding.
    assert torch.equal(model.get_input_embeddings().weight, table)
    panels, scales = cpu_ops().pack_int8_panels(table, group)
    assert torch.equal(head.int8_weight, panels) and torch.equal(head.int8_scales, scales)
    assert head.exact_rows is model.get_input_embeddings().weight  # no third copy
    hidden = torch.randn(5, table.shape[1]).to(table.dtype)
    logits = model.compute_logits(hidden)
    expected = torch.empty(5, table.shape[0])
    cpu_ops().int8_linear(expected, hidden, panels, scales, torch.empty(0))
    rescore_logits(expected, hidden, table)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    exact = hidden.double() @ table.double().T
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def test_rescoring_is_exact_near_the_top() -> None:
    """W8A8 logits within the margin of a row's largest become the dense products (within
    fp32 rounding), the rest stay; the top token is the dense one where the W8A8 head's is
    not."""
    torch.manual_seed(0)
    table = (torch.randn(3000, 96) * 0.1).bfloat16()
    hidden = torch.randn(40, 96).bfloat16()
    panels, scales = cpu_ops().pack_int8_panels(table, 32)
    logits = torch.empty(40, 3000)
    cpu_ops().int8_linear(logits, hidden, panels, scales, torch.empty(0))
    before = logits.clone()
    exact = (hidden.double() @ table.double().T).float()
    rescore_logits(logits, hidden, table, margin=0.3)
    near = before >= before.amax(-1, keepdim=True) - 0.3
    assert torch.allclose(logits[near], exact[near], rtol=1e-6, atol=1e-6)
    assert torch.equal(logits[~near], before[~near])
    assert (before.argmax(-1) != exact.argmax(-1)).any()  # some rows the W8A8 head flips
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # A row's logits are its own: the same alone as in the batch.
    alone = before[7:8].clone()
    rescore_logits(alone, hidden[7:8], table, margin=0.3)
    assert torch.equal(alone[0], logits[7])
    assert RESCORE_MARGIN > 0



@pytest.mark.parametrize(("dtype", "k"), [(torch.bfloat16, 96), (torch.float32, 100)])
def test_native_rescoring_matches_the_formula(dtype, k) -> None:
    """The native pass (ops int8_rescore_logits) rescores exactly the logits within the margin
    of their row's largest, to the fp64 sum of the fp32 products, whatever K (a tail past the
    16-lane vectors) and the hidden rows' stride; the others stay."""
    torch.manual_seed(1)
    table = (torch.randn(1000, k) * 0.2).to(dtype)
    hidden = torch.randn(9, 2 * k).to(dtype)[:, :k]  # rows strided
    logits = torch.randn(9, 1000) * 3
    before = logits.clone()
    cpu_ops().int8_rescore_logits(logits, hidden, table, 2.5)
    near = before >= before.amax(-1, keepdim=True) - 2.5
    assert near.sum() > 9
    exact = (hidden.float()[:, None, :] * table.float()[None]).double().sum(-1).float()
    assert torch.allclose(logits[near], exact[near], rtol=1e-6, atol=1e-6)
    assert torch.equal(logits[~near], before[~near])
    alone = before[4:5].clone()
    cpu_ops().int8_rescore_logits(alone, hidden[4:5], table, 2.5)
    assert torch.equal(alone[0], logits[4])

def test_int8_head_request_alone_equals_in_a_batch(tiny_llama_factory, monkeypatch) -> None:
    """Greedy tokens and logprobs through the tied int8 head: the same alone and among others
    (the head's row count changing every step)."""
    monkeypatch.setenv(LM_HEAD_ENV, "32")
    model_dir = tiny_llama_factory(num_kv_heads=2, tie_word_embeddings=True, seed=4)
    rng = random.Random(1)
    target = [rng.randrange(3, 500) for _ in range(40)]
    others = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 60))] for _ in range(7)]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    llm = LLM(str(model_dir), dtype="bfloat16", quantization="int8", num_kv_blocks=96)
    assert isinstance(model_of(llm).lm_head.linear_method, Int8LinearMethod)
    alone = llm.generate([{"prompt_token_ids": target}], params, use_tqdm=False)[0].outputs[0]
    batch = [{"prompt_token_ids": p} for p in others[:3] + [target] + others[3:]]
    mixed = llm.generate(batch, params, use_tqdm=False)[3].outputs[0]
    assert mixed.token_ids == alone.token_ids
    assert mixed.logprobs == alone.logprobs


@pytest.mark.parametrize(("tied", "setting"), [(True, None), (True, "dense"), (False, "32")])
def test_dense_heads(tiny_llama_factory, monkeypatch, tied, setting) -> None:
    """A tied head by default and with the "dense" setting, and an untied one whatever the
    setting, stay as without int8."""
    if setting is None:
        monkeypatch.delenv(LM_HEAD_ENV, raising=False)
    else:
        monkeypatch.setenv(LM_HEAD_ENV, setting)
    model_dir = tiny_llama_factory(num_kv_heads=2, tie_word_embeddings=tied, seed=4)
    model = model_of(LLM(str(model_dir), dtype="float32", quantization="int8",
                         num_kv_blocks=16))
    if tied:
        assert model.lm_head is None and model.tied_lm_head is not None
    else:
        assert not isinstance(model.lm_head.linear_method, Int8LinearMethod)
        assert model.lm_head.packed is not None


def test_head_setting_checked(monkeypatch) -> None:
    monkeypatch.setenv(LM_HEAD_ENV, "24")
    with pytest.raises(ValueError, match=LM_HEAD_ENV):
        Int8Config()
    monkeypatch.setenv(LM_HEAD_ENV, "64")
    assert Int8Config().lm_head_group == 64
    monkeypatch.setenv(LM_HEAD_ENV, "dense")
    assert Int8Config().lm_head_group is None
    monkeypatch.delenv(LM_HEAD_ENV)
    assert Int8Config().lm_head_group is None  # LM_HEAD: dense
