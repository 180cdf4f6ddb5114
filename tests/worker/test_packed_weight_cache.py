"""The packed-weight cache (models/packed_cache.py): a second start reads the packing it wrote
instead of packing again, with the same bytes and tokens, and reads none of the checkpoint's
tensors that the packing replaces; a changed model or a damaged file is
packed again (never used) and the file rewritten; two processes writing and reading the same
file at once always find a whole one."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.layers import packed as packed_module
from pagedllm.models.packed_cache import CACHE_DIR_ENV, CACHE_ENV, PackedWeightCache

PROMPTS = [{"prompt_token_ids": ids} for ids in ([5, 17, 301, 42, 9], list(range(3, 40)))]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def model_dir(tiny_llama_factory, tmp_path) -> Path:
    """A copy of a tiny Llama that a test may change."""
    return Path(shutil.copytree(tiny_llama_factory(num_heads=4, num_kv_heads=2),
                                tmp_path / "model"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def packings(monkeypatch) -> list[int]:
    """Counts the weights packed afresh (PackedWeight built by packing, not from the cache)."""
    calls = []
    original = packed_module.PackedWeight.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(packed_module.PackedWeight, "__init__", counting)
    return calls


def start(model_dir: Path, dtype: str = "bfloat16") -> LLM:
    return LLM(str(model_dir), num_kv_blocks=32, block_size=8, dtype=dtype)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def packed_bytes(llm: LLM) -> list[torch.Tensor]:
    out = []
    for weight in llm.llm_engine.worker.model.packed_weights():
        for name in ("panels", "dot_panels", "amx_panels", "plain", "plain_bias"):
            tensor = getattr(weight, name)
            if tensor is not None:
                out.append(tensor.contiguous().view(-1).view(torch.uint8).clone())
    return out


def only_file(cache_dir: Path) -> Path:
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin", files
    return files[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_second_start_reads_the_packing_it_wrote(model_dir, cache_dir, packings, dtype):
    first = start(model_dir, dtype)
    assert packings, "the first start packs"
    only_file(cache_dir)
    packings.clear()
    second = start(model_dir, dtype)
    assert not packings, "the second start packed again"
    a, b = packed_bytes(first), packed_bytes(second)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert tokens(second) == tokens(first)


@pytest.mark.parametrize("tied", [False, True])
def test_a_hit_reads_no_weight_the_packing_replaces(tiny_llama_factory, tmp_path, cache_dir,
                                                    packings, tied):
    # Tied: the head packs the embedding, which lookups still read; biases are read too.
    settings = {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                "num_kv_heads": 1} if tied else {"num_kv_heads": 2}
    model_dir = Path(shutil.copytree(tiny_llama_factory(num_heads=4, **settings),
                                     tmp_path / "model"))
    first = start(model_dir)
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    # The first start reads every element once.
    assert first.llm_engine.worker.model.checkpoint_reads == sizes
    packings.clear()
    second = start(model_dir)
    assert not packings
    replaced = {name for name in sizes if name.endswith("proj.weight") or name == "lm_head.weight"}
    assert replaced and any(name.startswith("lm_head") for name in replaced) != tied
    # The rest (embedding, norms) is read as before; nothing of the replaced weights.
    assert second.llm_engine.worker.model.checkpoint_reads == {
        name: n for name, n in sizes.items() if name not in replaced}
    assert tokens(second) == tokens(first)


def test_a_config_that_no_longer_matches_the_weights_is_still_refused(model_dir, cache_dir):
    start(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] += 8
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does the config match the weights"):
        start(model_dir)


def test_each_dtype_keeps_its_own_file(model_dir, cache_dir, packings):
    start(model_dir, "bfloat16")
    start(model_dir, "float32")
    assert len(list(cache_dir.iterdir())) == 2
    packings.clear()
    start(model_dir, "bfloat16")
    start(model_dir, "float32")
    assert not packings


def test_the_cache_can_be_turned_off(model_dir, cache_dir, packings, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "0")
    start(model_dir)
    assert packings and not cache_dir.exists()


def test_a_changed_model_is_packed_again(model_dir, cache_dir, packings, monkeypatch):
    start(model_dir)
    stale = only_file(cache_dir)
    weights_file = model_dir / "model.safetensors"
    weights = load_file(weights_file)
    name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
    weights[name] = -weights[name]
    save_file(weights, weights_file, metadata={"format": "pt"})
    packings.clear()
    changed = start(model_dir)
    assert packings, "a changed model was served from the old packing"
    assert only_file(cache_dir) != stale  # replaced, not added beside it
    monkeypatch.setenv(CACHE_ENV, "0")
    assert tokens(changed) == tokens(start(model_dir))


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20:40] = b"}" * 20
    path.write_bytes(bytes(data))


def check_damage_is_rebuilt(start_engine: Callable[[], LLM], run: Callable[[LLM], object],
                            cache_dir: Path, built: list[int], damage: Callable[[Path], None],
                            caplog) -> None:
    """A cache file damaged by `damage` is refused with a warning and built again (`built`
    counts the processing a hit skips): the same output, and the next start hits the
    rewritten file. Shared by the dense and the GGUF caches' tests."""
    fresh = run(start_engine())
    damage(only_file(cache_dir))
    built.clear()
    with caplog.at_level(logging.WARNING, logger="pagedllm.models"):
        rebuilt = start_engine()
    assert built, "a damaged file was used"
    assert "is not usable" in caplog.text
    assert run(rebuilt) == fresh
    built.clear()
    start_engine()  # the rewritten file is whole again
    assert not built


@pytest.mark.parametrize("damage", [_flip_payload_byte, _truncate, _garble_header])
def test_a_damaged_file_is_detected_and_rebuilt(model_dir, cache_dir, packings, damage,
                                                caplog, monkeypatch):
    check_damage_is_rebuilt(lambda: start(model_dir), tokens, cache_dir, packings, damage,
                            caplog)


# Each of two processes starts the engine, then writes the cache file and reads it back many
# times while the other does the same: every read must find a whole file with its checksum.
WRITER = r"""
import sys
from pagedllm import LLM
from pagedllm.models.packed_cache import PackedWeightCache
model = LLM(sys.argv[1], num_kv_blocks=32, block_size=8, dtype="bfloat16").llm_engine.worker.model
cache = PackedWeightCache.for_model(model)
for _ in range(int(sys.argv[2])):
    assert cache.store(model)
    assert len(cache._read()) == len(model.packed_weights())
print("ok")
"""


def test_two_processes_writing_at_once_leave_a_whole_file(model_dir, cache_dir, packings):
    env = {**os.environ, CACHE_DIR_ENV: str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(model_dir), "30"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "ok", err[-3000:]
    only_file(cache_dir)  # no temporary files left behind
    start(model_dir)
    assert not packings


def test_a_quantized_model_is_not_cached(model_dir, cache_dir):
    llm = LLM(str(model_dir), num_kv_blocks=32, block_size=8, quantization="int8")
    assert PackedWeightCache.for_model(llm.llm_engine.worker.model) is None
    assert not cache_dir.exists()


def _rank_reads(worker) -> dict[str, int]:
    return dict(worker.model.checkpoint_reads)


@pytest.mark.slow
def test_tensor_parallel_ranks_read_only_what_their_packing_does_not_replace(model_dir,
                                                                             cache_dir):
    # Each rank has its own file (the rank is in the key) and on a hit reads only its shard of
    # the tensors the packing does not replace.
    settings = {"num_kv_blocks": 32, "block_size": 8, "dtype": "float32",
                "tensor_parallel_size": 2}
    first = LLM(str(model_dir), **settings)
    want = tokens(first)
    first.shutdown()
    assert len(list(cache_dir.iterdir())) == 2
    second = LLM(str(model_dir), **settings)
    try:
        assert tokens(second) == want
        for reads in second.llm_engine.model_executor.collective_rpc(_rank_reads):
            assert reads and not any(name.endswith("proj.weight") or name == "lm_head.weight"
                                     for name in reads), sorted(reads)
    finally:
        second.shutdown()
