"""The tokenizer a warm start serves without transformers (pagedllm/tokenizer.py, recorded by
models/hf_fast.py): the same ids, text, tokens, special tokens, chat prompts and incremental
text as transformers' tokenizer, on the shipped model and on a tiny WordPiece model (whose
decode cleans up spaces); transformers' object built only when asked for more, and answering
everything from then on."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.models import hf_fast
from pagedllm.models.hf_fast import FAST_ENV, RECORD_DIR_ENV, load_tokenizer
from pagedllm.tokenizer import FastTokenizer, hf_tokenizer, wait_loaded
from tests.models.test_hf_fast import run_probe

TEXTS = ["Hello, world!", "", "  two  spaces ", "don't stop . ok ? it 's", "naïve 🙂 日本語",
         "<|im_start|>user\nhi<|im_end|>", "line\n\nbreaks\r\n\ttabs"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(autouse=True)
def records(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(FAST_ENV, raising=False)
    return tmp_path / "records"


def wordpiece_dir(path: Path) -> Path:
    """A tiny BERT-style tokenizer (lower-casing, WordPiece, [CLS]/[SEP] added): its decode
    cleans up tokenization spaces, which BPE models skip."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "don", "'", "t",
             "stop", ".", "ok", "?", "it", "s", ",", "!", "two", "spaces", "##s", "line",
             "break", "##s", "tab", "na", "##ive"]
    vocab = list(dict.fromkeys(vocab))
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", clean_up_tokenization_spaces=True,
        model_max_length=64)
    tokenizer.save_pretrained(path)
    return path


def answers(tokenizer) -> list:
    out = []
    for text in TEXTS:
        for add in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add)
            out.append((ids, tokenizer.decode(ids), tokenizer.decode(ids, skip_special_tokens=True),
                        tokenizer.convert_ids_to_tokens(ids),
                        tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)))
    return out + [tokenizer.all_special_tokens, tokenizer.all_special_ids,
                  tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                  tokenizer.chat_template, len(tokenizer), tokenizer.vocab_size,
                  tokenizer.model_max_length, tokenizer.name_or_path]


def warm(model_dir: Path):
    load_tokenizer(model_dir)  # the first start: transformers' tokenizer, recorded
    tokenizer = load_tokenizer(model_dir)
    assert isinstance(tokenizer, FastTokenizer) and not tokenizer.delegates
    return tokenizer


@pytest.mark.parametrize("which", ["shipped", "wordpiece"])
def test_it_answers_as_transformers_tokenizer(which, smollm2_dir, tmp_path):
    model_dir = smollm2_dir if which == "shipped" else wordpiece_dir(tmp_path / "wp")
    expected = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    fast = warm(model_dir)
    assert answers(fast) == answers(expected)
    assert fast.get_vocab() == expected.get_vocab()
    assert hf_fast.fast_differences(fast, expected) == []
    assert not fast.delegates
    if which == "wordpiece":  # the clean-up is on, and shows
        assert fast.decode(fast.encode("don't stop . ok ?")) == "[CLS] don't stop. ok? [SEP]"


def test_chat_prompts_are_transformers_own(smollm2_dir):
    expected = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    fast = warm(smollm2_dir)
    for generation in (True, False):
        assert fast.apply_chat_template(CHAT, tokenize=False,
                                        add_generation_prompt=generation) == \
            expected.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation)
    assert fast.delegates  # the template was transformers' to render
    assert answers(fast) == answers(expected)


def test_incremental_text_is_the_same(smollm2_dir):
    expected = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    fast = warm(smollm2_dir)
    prompt = expected.encode("Say:")
    # Multi-byte characters split over byte-level tokens, spaces, and a special token.
    output = expected.encode(" naïve 🙂 日本語, ok!  done") + [expected.eos_token_id]
    for skip in (True, False):
        texts = []
        for tokenizer in (expected, fast):
            detok = IncrementalDetokenizer(tokenizer, prompt, stop=["ok!"],
                                           include_stop_str_in_output=True,
                                           skip_special_tokens=skip)
            steps = [(detok.add_token(t), detok.take_delta(False)) for t in output]
            texts.append((steps, detok.text))
        assert texts[0] == texts[1]


def test_a_change_goes_to_transformers_tokenizer_which_answers_from_then_on(smollm2_dir):
    fast = warm(smollm2_dir)
    fast.add_tokens(["<pagedllm_new>"])
    assert fast.delegates
    ids = fast.encode("a <pagedllm_new> b")
    assert ids == fast.hf_tokenizer.encode("a <pagedllm_new> b")
    new_id = fast.convert_tokens_to_ids("<pagedllm_new>")
    assert new_id in ids and fast.convert_ids_to_tokens(new_id) == "<pagedllm_new>"
    assert len(fast) == len(fast.hf_tokenizer) == fast.vocab_size + 1
    fast.pad_token = "<pagedllm_new>"
    assert fast.pad_token == "<pagedllm_new>" and fast.pad_token_id == new_id
    assert hf_tokenizer(fast) is fast.hf_tokenizer
    assert isinstance(hf_tokenizer(fast), PreTrainedTokenizerFast)


def test_copies_and_pickles_answer_the_same(smollm2_dir):
    fast = warm(smollm2_dir)
    copied = copy.deepcopy(fast)
    assert copied.backend_tokenizer is not fast.backend_tokenizer
    assert answers(copied) == answers(fast)
    assert answers(pickle.loads(pickle.dumps(fast))) == answers(fast)
    fast.add_tokens(["<pagedllm_new>"])
    again = copy.deepcopy(fast)
    assert again.delegates and again.hf_tokenizer is not fast.hf_tokenizer
    assert again.encode("a <pagedllm_new>") == fast.encode("a <pagedllm_new>")


def test_a_damaged_tokenizer_file_is_loaded_the_usual_way(smollm2_dir, records):
    warm(smollm2_dir)
    (side,) = records.glob("*.tokenizer.json")
    side.write_text(side.read_text().replace("<|im_start|>", "<|im_begin|>"))
    tokenizer = load_tokenizer(smollm2_dir)
    assert not isinstance(tokenizer, FastTokenizer)
    expected = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert tokenizer.encode("<|im_start|>hi") == expected.encode("<|im_start|>hi")
    again = load_tokenizer(smollm2_dir)  # recorded again
    assert isinstance(again, FastTokenizer)
    assert again.encode("<|im_start|>hi") == expected.encode("<|im_start|>hi")


PROBE = r"""
import sys
from pagedllm.models.hf_fast import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
ids = tokenizer.encode("Hello, world!")
print(type(tokenizer).__name__, tokenizer.decode(ids), "transformers" in sys.modules)
"""


def test_a_warm_tokenizer_imports_no_transformers(smollm2_dir, records):
    def run() -> list[str]:
        return run_probe(PROBE, smollm2_dir, records)

    assert run() == ["TokenizersBackend", "Hello,", "world!", "True"]
    assert run() == ["FastTokenizer", "Hello,", "world!", "False"]


def test_a_tokenizer_loaded_in_the_background_answers_the_same(smollm2_dir):
    expected = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    warm(smollm2_dir)
    fast = load_tokenizer(smollm2_dir, background=True)
    assert isinstance(fast, FastTokenizer)
    wait_loaded(fast)
    assert answers(fast) == answers(expected) and not fast.delegates


def test_its_methods_can_be_wrapped_on_the_object(smollm2_dir, monkeypatch):
    fast = warm(smollm2_dir)
    real_encode = fast.encode
    seen: list[str] = []
    monkeypatch.setattr(fast, "encode", lambda text, **kw: seen.append(text) or real_encode(text, **kw))
    assert fast.encode("hi") == real_encode("hi") and seen == ["hi"]
    assert not fast.delegates
    monkeypatch.undo()
    assert fast.encode("hi") == real_encode("hi") and seen == ["hi"]
