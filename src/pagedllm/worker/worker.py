"""The worker: builds the model and its KV cache on one device and executes steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pagedllm.attention import DEFAULT_ATTENTION_BACKEND, get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed import get_tensor_model_parallel_world_size
from pagedllm.models.loader import build_model
from pagedllm.profiler import StepProfiler
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.draft_model import DraftModel, PairedKVCacheSpec
from pagedllm.worker.cache_engine import (
    CacheEngine,
    KVCacheSpec,
    check_host_memory,
    choose_num_blocks,
)
from pagedllm.worker.host_memory import HugePageArena, keep_freed_buffers
from pagedllm.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Worker:
    """Owns everything that lives on the device; the engine talks to it through execute_model."""

    def __init__(
        self,
        config: EngineConfig,
        hf_config: PretrainedConfig,
        model_dir: Path,
        max_model_len: int,
        profiler: StepProfiler | None = None,
    ) -> None:
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        total_num_heads = hf_config.num_attention_heads
        total_num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or total_num_heads
        head_size = (getattr(hf_config, "head_dim", None)
                     or hf_config.hidden_size // total_num_heads)
        # This rank's heads (check_tensor_parallel_heads refused sizes that do not split them):
        # a KV head is replicated where the ranks outnumber them.
        tp_size = get_tensor_model_parallel_world_size()
        num_heads = total_num_heads // tp_size
        num_kv_heads = max(1, total_num_kv_heads // tp_size)
        backend_cls = get_attention_backend(config.attention_backend or DEFAULT_ATTENTION_BACKEND)
        backend = backend_cls(
            num_heads, num_kv_heads, head_size, head_size**-0.5, config.block_size
        )
        self.model = build_model(hf_config, model_dir, backend, max_model_len, dtype, self.device,
                                 config.quantization, config.model)
        if self.device.type == "cpu":
            self.model.pack_weights(allocate=HugePageArena().empty)
        spec = KVCacheSpec(
            num_layers=hf_config.num_hidden_layers,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_size=config.block_size,
            dtype=config.kv_cache_torch_dtype,
        )
        # Speculation by a draft model: its KV blocks have the target's ids (one pool of block
        # ids, two models' tensors), so the pool is sized by both models' bytes per block.
        spec_config = SpeculativeConfig.from_dict(config.speculative_config)
        self.draft = None
        if spec_config is not None and spec_config.method == "draft_model":
            self.draft = DraftModel(spec_config, config, max_model_len, self.device, config.seed)
            spec = PairedKVCacheSpec(**{f.name: getattr(spec, f.name)
                                        for f in dataclasses.fields(KVCacheSpec)},
                                     draft=self.draft.cache_spec)
        # The memory settings are for the whole engine: the block count is the whole model's
        # (all heads) within them, and each rank holds that many blocks of its own heads.
        whole = dataclasses.replace(spec, num_kv_heads=total_num_kv_heads)
        num_blocks = choose_num_blocks(
            whole, config.num_kv_blocks, config.kv_cache_memory_bytes, self.device
        )
        num_cpu_blocks = int(config.swap_space * 2**30) // whole.bytes_per_block
        check_host_memory(spec, num_blocks, num_cpu_blocks, self.device)
        target_spec = KVCacheSpec(**{f.name: getattr(spec, f.name)
                                     for f in dataclasses.fields(KVCacheSpec)})
        self.cache_engine = CacheEngine(target_spec, num_blocks, backend, self.device,
                                        num_cpu_blocks)
        if self.draft is not None:
            self.draft.allocate_cache(num_blocks, num_cpu_blocks)
        self.profiler = profiler or StepProfiler()
        self.runner = ModelRunner(
            self.model, self.cache_engine.kv_caches, config.block_size, self.device, config.seed,
            self.profiler, self.draft,
        )
        if self.device.type == "cpu":
            # After the weights and the pool: only per-step buffers are reused from the heap.
            keep_freed_buffers()

    @property
    def num_kv_blocks(self) -> int:
        return self.cache_engine.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cache_engine.num_cpu_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # Block moves first, in the contract's order, so the forward sees them done.
        with self.profiler.section("block copy/swap"):
            for cache in (self.cache_engine, self.draft):
                if cache is not None:  # the draft's pools move with the target's
                    cache.swap_out(scheduler_output.blocks_to_swap_out)
                    cache.swap_in(scheduler_output.blocks_to_swap_in)
                    cache.copy(scheduler_output.blocks_to_copy)
        return self.runner.execute_model(scheduler_output)
