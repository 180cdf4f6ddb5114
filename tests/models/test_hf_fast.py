"""Config and tokenizer read from a checked record (models/hf_fast.py): the same values as
AutoConfig and AutoTokenizer for every family pagedllm serves, a changed config read afresh,
and a later start that reads both without importing transformers at all."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from transformers import AutoConfig, AutoTokenizer

from pagedllm.models import hf_fast
from pagedllm.models.hf_fast import FAST_ENV, RECORD_DIR_ENV, load_config, load_tokenizer

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 256}
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2,
                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("MistralConfig", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 32,
                              "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"attn_logit_softcapping": 50.0}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 32}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
}


@pytest.fixture(autouse=True)
def records(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(FAST_ENV, raising=False)
    return tmp_path / "records"


def model_dir(tmp_path: Path, tokenizer_dir: Path, family: str) -> Path:
    name, settings = FAMILIES[family]
    config = getattr(transformers, name)(**{**TINY, **settings})
    config.architectures = [name.replace("TextConfig", "ForCausalLM")
                            .replace("Config", "ForCausalLM")]
    path = tmp_path / family
    config.save_pretrained(path)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, path / file.name)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_recorded_config_answers_as_autoconfig(tmp_path, tokenizer_dir, family):
    path = model_dir(tmp_path, tokenizer_dir, family)
    expected = AutoConfig.from_pretrained(path, local_files_only=True)
    first = load_config(path)  # read the usual way, recorded
    assert type(first) is type(expected)
    again = load_config(path)
    assert type(again).__name__ == type(expected).__name__
    assert hf_fast._differences(expected, again) == []
    # Answered from the record alone: without building transformers' config.
    light = load_config(path)
    assert isinstance(light, hf_fast.RecordedConfig)
    assert hf_fast._differences(expected, light, skip=type(light)._light["others"]) == []
    assert light.__dict__.get(hf_fast._REAL) is None
    assert again.to_dict() == expected.to_dict()
    # The mp executor pickles the config to its workers; a changed value travels too.
    again.pagedllm_probe = 7
    copied = pickle.loads(pickle.dumps(again))
    assert type(copied) is type(again) and copied.pagedllm_probe == 7
    assert hf_fast._differences(again, copied) == []


def test_the_shipped_models_config_and_tokenizer_are_recorded(smollm2_dir):
    first = load_config(smollm2_dir)
    again = load_config(smollm2_dir)
    assert type(again) is not type(first), "not rebuilt from its record"
    assert hf_fast._differences(first, again) == []
    expected = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    load_tokenizer(smollm2_dir)
    fast = load_tokenizer(smollm2_dir)
    assert hf_fast._tokenizer_answers(fast) == hf_fast._tokenizer_answers(expected)


def test_a_changed_config_is_read_afresh(tmp_path, tokenizer_dir):
    path = model_dir(tmp_path, tokenizer_dir, "llama")
    load_config(path)
    assert load_config(path).num_hidden_layers == 2
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"num_hidden_layers": 2',
                                                   '"num_hidden_layers": 3'))
    assert load_config(path).num_hidden_layers == 3


def test_a_damaged_record_is_read_the_usual_way(tmp_path, tokenizer_dir, records):
    path = model_dir(tmp_path, tokenizer_dir, "llama")
    load_config(path)
    load_tokenizer(path)
    (record,) = [p for p in records.iterdir() if not p.name.endswith(".tokenizer.json")]
    record.write_text('{"format": 1, "config": {"class": "LlamaConfig"}, '
                      '"tokenizer_class": "NoSuchTokenizer", '
                      '"tokenizer_fast": {"state": {}, "backend_sha256": "0"}}')
    assert type(load_config(path)) is transformers.LlamaConfig
    assert load_tokenizer(path).encode("hi") == AutoTokenizer.from_pretrained(path).encode("hi")


def test_turned_off_it_reads_the_usual_way(tmp_path, tokenizer_dir, records, monkeypatch):
    monkeypatch.setenv(FAST_ENV, "0")
    path = model_dir(tmp_path, tokenizer_dir, "llama")
    load_config(path)
    assert type(load_config(path)) is transformers.LlamaConfig
    assert not records.exists()


PROBE = r"""
import sys
from pagedllm.models.hf_fast import load_config, load_tokenizer
config, tokenizer = load_config(sys.argv[1]), load_tokenizer(sys.argv[1])
print(config.num_hidden_layers, tokenizer.eos_token_id, tokenizer.encode("Hi there"),
      "transformers.models.llama.configuration_llama" in sys.modules,
      "transformers" in sys.modules)
"""


def run_probe(probe: str, model_dir: Path, records: Path) -> list[str]:
    """`probe` run as a fresh Python process on `model_dir` with `records` as the record
    folder: its printed words."""
    done = subprocess.run([sys.executable, "-c", probe, str(model_dir)],
                          env={**os.environ, RECORD_DIR_ENV: str(records)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_a_recorded_start_skips_the_family_config_module(smollm2_dir, records):
    def run() -> list[str]:
        return run_probe(PROBE, smollm2_dir, records)

    first, second = run(), run()
    assert first[-2:] == ["True", "True"] and second[-2:] == ["False", "False"]
    assert first[:-2] == second[:-2]
