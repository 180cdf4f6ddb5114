"""kv_cache_dtype="int8"/"fp8": the setting, the pool's size and the block moves of 8-bit caches."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.torch_paged import FP8_KV_DTYPE, INT8_KV_DTYPE, TorchPagedAttention
from pagedllm.config import EngineConfig
from pagedllm.worker.cache_engine import CacheEngine, KVCacheSpec, choose_num_blocks


def spec(dtype: torch.dtype) -> KVCacheSpec:
    return KVCacheSpec(num_layers=2, num_kv_heads=3, head_size=64, block_size=16, dtype=dtype)


def test_setting_names_the_allowed_values() -> None:
    assert EngineConfig().kv_cache_dtype == "auto"
    assert EngineConfig(dtype="bfloat16").kv_cache_torch_dtype == torch.bfloat16
    for name in ("fp8", "fp8_e5m2"):
        assert EngineConfig(kv_cache_dtype=name).kv_cache_torch_dtype == FP8_KV_DTYPE
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_torch_dtype == INT8_KV_DTYPE
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, fp8, "
                                         "fp8_e5m2"):
        EngineConfig(kv_cache_dtype="fp8_e4m3")


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_8bit_refuses_a_backend_that_cannot_read_it(name: str) -> None:
    with pytest.raises(ValueError, match="needs one of the attention backends cpu_paged, "
                                         "torch_paged"):
        EngineConfig(kv_cache_dtype=name, attention_backend="flash_attn")
    EngineConfig(kv_cache_dtype=name, attention_backend="torch_paged")


def test_pool_is_sized_by_the_smaller_bytes() -> None:
    bf16 = spec(torch.bfloat16).bytes_per_block
    assert spec(FP8_KV_DTYPE).bytes_per_block * 2 == bf16
    assert spec(INT8_KV_DTYPE).bytes_per_block == bf16 // 2 * 68 // 64  # + a scale per row
    cpu = torch.device("cpu")
    assert choose_num_blocks(spec(torch.bfloat16), None, 100 * bf16, cpu) == 100
    assert choose_num_blocks(spec(FP8_KV_DTYPE), None, 100 * bf16, cpu) == 200
    assert choose_num_blocks(spec(INT8_KV_DTYPE), None, 100 * bf16, cpu) == 188


@pytest.mark.parametrize("kind", [INT8_KV_DTYPE, FP8_KV_DTYPE], ids=["int8", "fp8"])
def test_copy_and_swap_carry_the_bytes(kind: torch.dtype) -> None:
    s = spec(kind)
    backend = TorchPagedAttention(3, 3, 64, 0.125, 16)
    engine = CacheEngine(s, num_blocks=6, backend=backend, device=torch.device("cpu"),
                         num_cpu_blocks=4)
    assert all(c.dtype == kind for c in engine.kv_caches + engine.cpu_caches)
    assert engine.kv_caches[0].shape[-1] == (68 if kind == INT8_KV_DTYPE else 64)
    gen = torch.Generator().manual_seed(0)
    for cache in engine.kv_caches:
        cache.view(torch.uint8).copy_(torch.randint(0, 256, cache.shape, generator=gen,
                                                    dtype=torch.uint8))
    before = [c.view(torch.uint8).clone() for c in engine.kv_caches]
    engine.copy([(1, 4)])  # copy-on-write
    engine.swap_out([(2, 0), (4, 3)])
    engine.swap_in([(0, 5), (3, 0)])
    for layer, cache in enumerate(engine.kv_caches):
        got, old = cache.view(torch.uint8), before[layer]
        assert torch.equal(got[:, 4], old[:, 1])
        assert torch.equal(engine.cpu_caches[layer].view(torch.uint8)[:, 0], old[:, 2])
        assert torch.equal(got[:, 5], old[:, 2])
        assert torch.equal(got[:, 0], old[:, 1])  # block 4 held block 1's bytes when swapped
        assert torch.equal(got[:, 1:4], old[:, 1:4])
