"""What `pagedllm serve` does between the engine's load and its first answer (issue 30): the
event loop's tokenizer is a copy of the engine's whose Rust tokenizer is built on first use, and
the engine's modules are imported under gc_freeze.importing (frozen, so the collection at ready
does not traverse them)."""

from __future__ import annotations

import contextlib

import pytest

from pagedllm import gc_freeze
from pagedllm.entrypoints.openai import api_server
from pagedllm.models.hf_fast import FAST_ENV, RECORD_DIR_ENV, load_tokenizer
from pagedllm.tokenizer import FastTokenizer

TEXT = "Hello, world! naïve 🙂 <|im_start|>user"


@pytest.fixture(autouse=True)
def records(tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(FAST_ENV, raising=False)


def test_the_loops_tokenizer_is_built_on_first_use(smollm2_dir):
    load_tokenizer(smollm2_dir)  # the first start records it
    engine_tokenizer = load_tokenizer(smollm2_dir)
    assert isinstance(engine_tokenizer, FastTokenizer) and not engine_tokenizer.delegates
    ids = engine_tokenizer.encode(TEXT)

    tokenizer = api_server.server_tokenizer(engine_tokenizer, smollm2_dir)
    assert isinstance(tokenizer, FastTokenizer) and tokenizer is not engine_tokenizer
    # Nothing built at start, nor building on a thread.
    assert tokenizer.__dict__["_backend"] is None and "_pending" not in tokenizer.__dict__
    # What the server asks of it before any request (chat templates, special ids) needs no
    # Rust tokenizer either.
    assert tokenizer.eos_token_id == engine_tokenizer.eos_token_id
    assert tokenizer.chat_template == engine_tokenizer.chat_template
    assert tokenizer.__dict__["_backend"] is None
    assert tokenizer.decode(ids) == engine_tokenizer.decode(ids)
    assert tokenizer.convert_ids_to_tokens(ids) == engine_tokenizer.convert_ids_to_tokens(ids)
    assert len(tokenizer) == len(engine_tokenizer)
    assert tokenizer.backend_tokenizer is not engine_tokenizer.backend_tokenizer


def test_a_transformers_tokenizer_is_loaded_again(smollm2_dir, monkeypatch):
    monkeypatch.setenv(FAST_ENV, "0")
    engine_tokenizer = load_tokenizer(smollm2_dir)
    assert not isinstance(engine_tokenizer, FastTokenizer)
    tokenizer = api_server.server_tokenizer(engine_tokenizer, smollm2_dir)
    assert tokenizer is not engine_tokenizer
    assert tokenizer.backend_tokenizer is not engine_tokenizer.backend_tokenizer
    ids = engine_tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == engine_tokenizer.decode(ids)


def test_run_server_imports_the_engine_under_gc_freeze_importing(monkeypatch, tmp_path):
    entered = []

    @contextlib.contextmanager
    def importing():
        entered.append(True)
        yield

    monkeypatch.setattr(gc_freeze, "importing", importing)
    with pytest.raises((ValueError, OSError)):  # the model is refused after the import
        api_server.run_server({"model": str(tmp_path / "missing")}, port=0)
    assert entered == [True]
