"""The fused argmax + logsumexp op against torch, and the sampler with and without it."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.ops import cpu_ops, cpu_ops_error
from pagedllm.sample import logprobs as logprobs_module
from pagedllm.sample.logprobs import argmax_logsumexp
from pagedllm.sample.sampler import Sampler, SamplingBatch
from pagedllm.sampling_params import SamplingParams


@pytest.fixture(autouse=True)
def _need_ops() -> None:
    if cpu_ops() is None:
        pytest.skip(f"CPU ops unavailable: {cpu_ops_error()}")


def _check(logits: torch.Tensor) -> None:
    argmax, lse = cpu_ops().argmax_logsumexp(logits)
    assert argmax.dtype == torch.int64 and lse.dtype == torch.float32
    assert argmax.tolist() == logits.argmax(dim=-1).tolist()
    argmax_only, no_lse = cpu_ops().argmax_logsumexp(logits, False)
    assert argmax_only.tolist() == argmax.tolist() and no_lse.numel() == 0
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 100, 49152, 50257])
def test_random_rows_match_torch(vocab):
    torch.manual_seed(vocab)
    _check(torch.randn(5, vocab) * 8)


def test_ties_take_the_first_maximum():
    logits = torch.zeros(3, 37)
    logits[0, [4, 20]] = 5.0
    logits[1, [36, 35]] = 2.0
    _check(logits)
    assert cpu_ops().argmax_logsumexp(logits)[0].tolist() == [4, 35, 0]


@pytest.mark.parametrize("vocab", [5, 16, 37, 100, 49152])
def test_many_ties_take_the_first_maximum(vocab):
    """The maximum repeats across SIMD lanes, within one lane and in the scalar tail."""
    torch.manual_seed(vocab)
    logits = torch.randint(0, 3, (8, vocab)).float()
    logits[0, :] = 1.0
    logits[1, [vocab - 1, vocab // 2]] = 9.0
    _check(logits)


def test_inf_and_nan_rows_follow_torch():
    logits = torch.randn(5, 33)
    logits[0, :] = -math.inf                 # lse -inf, argmax 0
    logits[1, 10] = math.inf                 # lse inf
    logits[2, [3, 17]] = math.nan            # first NaN wins, lse NaN
    logits[3, :20] = -math.inf               # masked prefix
    logits[4, 32] = math.nan                 # NaN in the scalar tail
    _check(logits)


def test_rows_of_a_wider_tensor_and_no_rows():
    wide = torch.randn(4, 130)
    _check(wide[:, :100])  # row stride 130, last dim contiguous
    argmax, lse = cpu_ops().argmax_logsumexp(torch.empty(0, 16))
    assert argmax.shape == (0,) and lse.shape == (0,)


def test_bad_inputs_are_refused():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops().argmax_logsumexp(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ops().argmax_logsumexp(torch.randn(8, 2).t())
    # The Python wrapper takes the torch path for what the op does not take.
    argmax, lse = argmax_logsumexp(torch.randn(8, 3).t())
    assert argmax.shape == (3,) and lse.shape == (3,)


def test_sampler_gives_the_same_tokens_and_logprobs_without_the_op(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 4
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)] * 3
    # Random rows that rank samples (best_of > n) need the chosen token's logprob.
    ranked = [SamplingParams(temperature=1.0, seed=i, best_of=2) for i in range(6)]
    expected = torch.log_softmax(logits, -1)
    for params in (greedy, ranked):
        batch = SamplingBatch(params=params, prompt_token_ids=[[1]] * 6,
                              output_token_ids=[[]] * 6, min_tokens_stop_ids=[[]] * 6)
        fused = Sampler()(logits, batch)
        with monkeypatch.context() as patch:
            patch.setattr(logprobs_module, "native_ops", lambda *t: None)
            reference = Sampler()(logits, batch)
        assert fused.sampled_token_ids == reference.sampled_token_ids
        for row, (p, logprob) in enumerate(zip(params, fused.sampled_logprobs)):
            assert (logprob is None) == (not p.needs_sampled_logprobs)
            if logprob is not None:
                token = fused.sampled_token_ids[row]
                assert logprob == pytest.approx(reference.sampled_logprobs[row], abs=1e-5)
                assert logprob == pytest.approx(expected[row, token].item(), abs=1e-5)
    assert Sampler()(logits, SamplingBatch(
        params=greedy, prompt_token_ids=[[1]] * 6, output_token_ids=[[]] * 6,
        min_tokens_stop_ids=[[]] * 6)).sampled_token_ids == logits.argmax(dim=-1).tolist()