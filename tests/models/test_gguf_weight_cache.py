"""The GGUF path's weight cache (models/gguf_cache.py): a warm start with quantization="auto"
reads the runs, blocks and norms it wrote instead of the GGUF, with the same bytes and tokens;
a changed GGUF or a damaged file is read and packed again (never used) and the file rewritten;
two processes starting at once on one cache both serve the right tokens and leave a whole file.

The tiny GGUF mixes Q8_0 (the embedding and its tied head: one copy of the blocks), Q4_1, Q4_0
and Q5_1 (no kernel: a float part, packed dense) so that every kind of run is cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization import gguf as gguf_method
from pagedllm.models import gguf_loader
from pagedllm.models.packed_cache import CACHE_DIR_ENV, CACHE_ENV
from tests.models.test_quantized import write_tiny_llama_gguf
from tests.worker.test_packed_weight_cache import (
    _flip_payload_byte,
    _truncate,
    check_damage_is_rebuilt,
    only_file,
)

TYPES = {"ffn_gate": "Q4_1", "ffn_up": "Q4_1", "attn_v": "Q4_0", "ffn_down": "Q5_1"}
PROMPTS = [{"prompt_token_ids": ids} for ids in ([5, 17, 301, 42, 9], list(range(3, 40)))]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """A tiny GGUF (seed 0: test_quantized's, whose conversion it shares)."""
    path = tmp_path_factory.mktemp("gguf") / "seed0.gguf"
    write_tiny_llama_gguf(path, TYPES, seed=0)
    return path


@pytest.fixture
def model_file(gguf_file, tmp_path) -> Path:
    """A copy of the GGUF that a test may change."""
    return Path(shutil.copy(gguf_file, tmp_path / "tiny.gguf"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def processed(monkeypatch) -> list[int]:
    """Counts the GGUF layers processed (runs built from the file's blocks, not the cache)."""
    calls = []
    original = gguf_method.GGUFLinearMethod.process_weights_after_loading

    def counting(self, layer):
        calls.append(1)
        original(self, layer)

    monkeypatch.setattr(gguf_method.GGUFLinearMethod, "process_weights_after_loading", counting)
    return calls


def start(model_file: Path) -> LLM:
    return LLM(str(model_file), quantization="auto", num_kv_blocks=32, block_size=8)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def state(llm: LLM) -> list[tuple[str, torch.Tensor]]:
    """Every byte the quantized model runs on: runs, embedding blocks, parameters."""
    model = llm.llm_engine.worker.model
    out = []
    for name, module in model.named_modules():
        for i, run in enumerate(getattr(module, "gguf_runs", [])):
            out.append((f"{name}.run{i}", torch.tensor([run.start, run.size,
                                                        run.ggml_type or -1])))
            for attr in ("weight", "bias"):
                if getattr(run, attr) is not None:
                    out.append((f"{name}.run{i}.{attr}", getattr(run, attr)))
            if run.packed is not None:
                for attr, t in run.packed.cache_state()[1].items():
                    out.append((f"{name}.run{i}.packed.{attr}", t))
        if isinstance(module, gguf_method.GGUFEmbedding):
            fmt = gguf_method.stored_format(module.blocks, module.ggml_type)
            out += [(f"{name}.blocks", module.blocks), (f"{name}.format", torch.tensor(fmt))]
    return out + [(name, p.detach()) for name, p in model.named_parameters()
                  if p.numel() > 1]


def assert_same_state(a: LLM, b: LLM) -> None:
    sa, sb = state(a), state(b)
    assert [n for n, _ in sa] == [n for n, _ in sb]
    for (name, x), (_, y) in zip(sa, sb):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_a_warm_start_reads_the_cache_not_the_gguf(model_file, cache_dir, processed,
                                                   monkeypatch):
    cold = start(model_file)
    assert processed, "the first start processes the GGUF's layers"
    only_file(cache_dir)
    processed.clear()

    def no_read(*args, **kwargs):
        raise AssertionError("a warm start read the GGUF's tensors")

    monkeypatch.setattr(gguf_loader, "gguf_weights", no_read)
    warm = start(model_file)
    assert not processed, "the warm start processed the layers again"
    assert not gguf_loader._parsed  # the architecture check's index is not kept
    model = warm.llm_engine.worker.model
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, gguf_method.GGUFEmbedding)
    (head_run,) = model.lm_head.gguf_runs
    assert head_run.weight.data_ptr() == embedding.blocks.data_ptr()  # one copy, tied
    assert any(run.packed is not None for m in model.modules()
               for run in getattr(m, "gguf_runs", []))  # Q5_1's float part
    assert_same_state(cold, warm)
    assert tokens(warm) == tokens(cold)


def test_the_cache_can_be_turned_off(model_file, cache_dir, processed, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "0")
    start(model_file)
    processed.clear()
    start(model_file)
    assert processed and not cache_dir.exists()


def test_a_touched_gguf_is_read_again(model_file, cache_dir, processed):
    # The key holds the file's size and modification time (as the dense cache's does): a file
    # written again is read again, whatever it holds.
    start(model_file)
    stale = only_file(cache_dir)
    os.utime(model_file, ns=(stale.stat().st_mtime_ns + 10**9,) * 2)
    processed.clear()
    start(model_file)
    assert processed, "a rewritten GGUF was served from the old cache"
    assert only_file(cache_dir) != stale  # replaced, not added beside it


@pytest.mark.slow  # converts a second GGUF (transformers: half a minute here)
def test_a_changed_gguf_is_read_again(model_file, cache_dir, processed, monkeypatch, tmp_path):
    start(model_file)
    stale = only_file(cache_dir)
    other = tmp_path / "seed1.gguf"
    write_tiny_llama_gguf(other, TYPES, seed=1)  # other weights, same name and size
    shutil.copy(other, model_file)
    os.utime(model_file, ns=(stale.stat().st_mtime_ns + 10**9,) * 2)
    processed.clear()
    changed = start(model_file)
    assert processed, "a changed GGUF was served from the old cache"
    assert only_file(cache_dir) != stale
    monkeypatch.setenv(CACHE_ENV, "0")
    assert tokens(changed) == tokens(start(model_file))


def _header(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()
    return data, int.from_bytes(data[8:16], "little")


def _other_key(path: Path) -> None:
    """A whole file whose key names another GGUF size (as one written for the model before it
    changed): the key check alone must refuse it."""
    data, header_len = _header(path)
    size = json.loads(data[16:16 + header_len])["key"]["file"][0]
    old = f'"file": [{size},'.encode()
    new = f'"file": [{str(size)[:-1]}{(size + 1) % 10},'.encode()
    assert data.count(old) == 1 and len(new) == len(old)
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("damage", [_flip_payload_byte, _truncate, _other_key])
def test_a_damaged_file_is_detected_and_rebuilt(model_file, cache_dir, processed, damage,
                                                caplog):
    check_damage_is_rebuilt(lambda: start(model_file), tokens, cache_dir, processed, damage,
                            caplog)


# Two processes start on one empty cache at once; each then rewrites the file and reads it back
# while the other does the same. Both must serve the same tokens, and every read find a whole
# file.
RACER = r"""
import json, sys
from pagedllm import LLM, SamplingParams
from pagedllm.models.packed_cache import PackedWeightCache
llm = LLM(sys.argv[1], quantization="auto", num_kv_blocks=32, block_size=8)
prompts = [{"prompt_token_ids": ids} for ids in ([5, 17, 301, 42, 9], list(range(3, 40)))]
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
model = llm.llm_engine.worker.model
cache = PackedWeightCache.for_model(model)
for _ in range(int(sys.argv[2])):
    assert cache.store(model)
    assert cache._read_groups()
print("TOKENS " + json.dumps(out))
"""


def test_two_processes_starting_at_once_serve_the_same_tokens(model_file, cache_dir,
                                                              processed, monkeypatch):
    env = {**os.environ, CACHE_DIR_ENV: str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(model_file), "5"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        line = next(ln for ln in out.splitlines() if ln.startswith("TOKENS "))
        outs.append(json.loads(line[len("TOKENS "):]))
    only_file(cache_dir)  # no temporary files left behind
    warm = start(model_file)
    assert not processed, "the file the two left was not usable"
    monkeypatch.setenv(CACHE_ENV, "0")
    want = tokens(start(model_file))
    assert outs == [want, want] and tokens(warm) == want


def test_a_dense_start_of_the_same_gguf_keeps_its_own_file(model_file, cache_dir):
    start(model_file)
    LLM(str(model_file), quantization="none", num_kv_blocks=32, block_size=8)
    kinds = []
    for path in cache_dir.iterdir():
        data, header_len = _header(path)
        kinds.append(json.loads(data[16:16 + header_len])["key"].get("kind", "dense"))
    assert sorted(kinds) == ["dense", "gguf"]


def test_the_header_block_sizes_are_the_gguf_packages():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for ggml_type, sizes in gguf_loader._BLOCK_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)] == sizes, ggml_type


IMPORTS_CHILD = r"""
import json, sys
from pagedllm import LLM
LLM(sys.argv[1], quantization="auto", num_kv_blocks=16, block_size=8)
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_a_warm_start_imports_neither_transformers_nor_the_gguf_package(model_file, cache_dir):
    # transformers costs about a second of a start, the gguf package 0.1 s; a warm start reads
    # the config and tokenizer from their records and the weights from the cache.
    start(model_file)  # writes the records and the cache
    result = subprocess.run([sys.executable, "-c", IMPORTS_CHILD, str(model_file)],
                            env=dict(os.environ), capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("MODULES "))
    modules = set(json.loads(line[len("MODULES "):]))
    assert "torch" in modules and not {"transformers", "gguf"} & modules, \
        sorted({"transformers", "gguf"} & modules)
