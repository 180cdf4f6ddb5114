"""What `pagedllm serve` does between the engine's load and its first answer (issue 30): the
event loop's and the prompt worker's tokenizers use the engine's Rust tokenizer (no build of
their own), and the engine's modules are imported under gc_freeze.importing (frozen, so the collection at ready
does not traverse them)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedllm import gc_freeze
from pagedllm.entrypoints.openai import api_server
from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer
from pagedllm.models.hf_fast import FAST_ENV, RECORD_DIR_ENV, load_tokenizer
from pagedllm.tokenizer import FastTokenizer

TEXT = "Hello, world! naïve 🙂 <|im_start|>user"


@pytest.fixture(autouse=True)
def records(tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(FAST_ENV, raising=False)


def test_the_servers_tokenizers_share_the_engines_rust_tokenizer(smollm2_dir):
    load_tokenizer(smollm2_dir)  # the first start records it
    engine_tokenizer = load_tokenizer(smollm2_dir)
    assert isinstance(engine_tokenizer, FastTokenizer) and not engine_tokenizer.delegates
    ids = engine_tokenizer.encode(TEXT)

    tokenizer = api_server.server_tokenizer(engine_tokenizer, smollm2_dir)
    prompts = PromptTokenizer(tokenizer)
    try:
        for other in (tokenizer, prompts.tokenizer):
            assert isinstance(other, FastTokenizer) and other is not engine_tokenizer
            assert other.backend_tokenizer is engine_tokenizer.backend_tokenizer  # none built
            assert other.encode(TEXT) == ids
            assert other.decode(ids) == engine_tokenizer.decode(ids)
            assert other.convert_ids_to_tokens(ids) == engine_tokenizer.convert_ids_to_tokens(ids)
            assert len(other) == len(engine_tokenizer)
    finally:
        prompts.shutdown()


def test_threads_use_the_shared_rust_tokenizer_at_once(smollm2_dir):
    """Encodes (the GIL released) on one thread while others decode and map ids: every call
    FastTokenizer makes of its Rust tokenizer takes it shared, so none is refused."""
    load_tokenizer(smollm2_dir)
    engine_tokenizer = load_tokenizer(smollm2_dir)
    long_text = TEXT * 2000
    expected = engine_tokenizer.encode(long_text)
    ids = expected[:200]
    text, tokens = engine_tokenizer.decode(ids), engine_tokenizer.convert_ids_to_tokens(ids)
    users = [engine_tokenizer.sharing_backend() for _ in range(3)]

    def encode(tokenizer) -> bool:
        return all(tokenizer.encode(long_text) == expected for _ in range(5))

    def decode(tokenizer) -> bool:
        return all(tokenizer.decode(ids) == text and tokenizer.convert_ids_to_tokens(ids) == tokens
                   for _ in range(300))

    with ThreadPoolExecutor(4) as pool:
        done = [pool.submit(encode, users[0]), pool.submit(decode, users[1]),
                pool.submit(decode, users[2]), pool.submit(decode, engine_tokenizer)]
        assert all(f.result() for f in done)


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
