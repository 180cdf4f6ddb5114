"""SamplingParams: vLLM defaults, normalisation, and a ValueError naming the field for bad input."""

from __future__ import annotations

import math

import pytest

from pagedllm.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of) == (1, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.max_tokens, p.min_tokens, p.logprobs) == (False, 16, 0, None)
    assert p.include_stop_str_in_output is False
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.logit_bias is None
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 2, "temperature": 0.0}, "n"),
        ({"n": 1.0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, 2.0]}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 1.0}, "logprobs"),
        ({"logit_bias": {3: math.inf}}, "logit_bias"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"3": 1.0}}, "logit_bias"),
        ({"logit_bias": [(3, 1.0)]}, "logit_bias"),
    ],
)
def test_invalid_value_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"top_k": -5}, "top_k must be -1, 0 or >= 1"),
        ({"n": 3, "best_of": 2}, "best_of must be None or an int >= n (3), got 2"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
    ],
)
def test_messages_give_allowed_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_valid_edges_accepted() -> None:
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, top_p=1.0, min_p=1.0, top_k=1)
    SamplingParams(max_tokens=None, min_tokens=1000)  # no upper bound without max_tokens
    SamplingParams(max_tokens=1, min_tokens=1, logprobs=0, seed=-7, best_of=1)
    SamplingParams(n=2, best_of=5, temperature=0.7)


def test_normalisation() -> None:
    p = SamplingParams(stop="###", stop_token_ids=(2, 3), top_k=-1, logit_bias={5: 1})
    assert p.stop == ["###"]
    assert p.stop_token_ids == [2, 3]
    assert p.top_k == 0  # -1 and 0 both mean "off"; stored as 0
    assert p.logit_bias == {5: 1.0} and isinstance(p.logit_bias[5], float)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_greedy_threshold_and_filter_reset() -> None:
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=3)
    assert greedy.is_greedy and greedy.sampling_type == SamplingType.GREEDY
    assert (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert SamplingParams(seed=1).sampling_type == SamplingType.RANDOM_SEED


def test_verify_token_ids() -> None:
    SamplingParams(stop_token_ids=[9], logit_bias={0: 1.0}).verify_token_ids(vocab_size=10)
    with pytest.raises(ValueError, match=r"\[10, 12\].*size 10"):
        SamplingParams(stop_token_ids=[12], logit_bias={10: 1.0}).verify_token_ids(10)
