"""Incremental detokenization equals a full decode, across multi-byte characters and stops."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from pagedllm.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a test.",
    "Ünïcödé façade — naïve café ☕ 日本語のテキスト 🚀🚀 emoji",
    "  leading spaces\nand\ttabs\n\n",
    "def f(x):\n    return x ** 2  # 平方",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Some prompt:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt, [], False, True)
    streamed = ""
    for token_id in ids:
        assert detok.add_token(token_id) is None
        streamed += detok.take_delta(finished=False)
        assert "\ufffd" not in streamed
    streamed += detok.take_delta(finished=True)
    assert streamed == tokenizer.decode(ids) == detok.output_text(finished=True)


@pytest.mark.parametrize("stop", ["日本", "s a t", "🚀", "x ** 2", "\n\n"])
def test_stop_string_split_across_tokens_is_never_streamed(tokenizer, stop):
    text = next(t for t in TEXTS if stop in t)
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], [stop], False, True)
    streamed, found = "", None
    for token_id in ids:
        found = detok.add_token(token_id)
        streamed += detok.take_delta(finished=found is not None)
        if found:
            break
    assert found == stop
    assert streamed == text[: text.index(stop)]


def test_tokenizers_overriding_decode_keep_their_decode(tokenizer):
    # The fast path calls the tokenizers library directly only where the class's decode is
    # transformers' generic one; a class of its own (Whisper, CodeGen, remote code) is called.
    class Shouting(type(tokenizer)):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()

    shouting = copy.copy(tokenizer)
    shouting.__class__ = Shouting
    ids = tokenizer.encode("quiet words")
    detok = IncrementalDetokenizer(shouting, [], [], False, True)
    for token_id in ids:
        detok.add_token(token_id)
    assert detok.output_text(finished=True) == "QUIET WORDS"
    plain = IncrementalDetokenizer(tokenizer, [], [], False, True)
    for token_id in ids:
        plain.add_token(token_id)
    assert plain.output_text(finished=True) == "quiet words"
