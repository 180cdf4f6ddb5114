"""Engine configuration: user-facing arguments, checked once with errors that say what to change."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pagedllm.validation import is_int, is_number

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    """Every knob of the engine, with vLLM's names where vLLM has one."""

    # A Hugging Face directory, a .gguf file, or None for the shipped SmolLM2-135M-Instruct.
    model: str | None = None
    # "auto" (float32 on CPU), "float32" or "bfloat16": weights, activations and KV cache.
    dtype: str = "auto"
    # Tokens per KV block.
    block_size: int = 16
    # Size of the KV pool in blocks; overrides kv_cache_memory_bytes.
    num_kv_blocks: int | None = None
    # Size of the KV pool in bytes; None = a slice of free RAM (see worker.cache_engine).
    kv_cache_memory_bytes: int | None = None
    # Most requests running at once.
    max_num_seqs: int = 256
    # Most tokens in one forward pass; longer prompts are prefilled in chunks.
    max_num_batched_tokens: int = 2048
    # Context length; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Seed of the sampler's generator for requests without their own seed.
    seed: int = 0
    # "recompute" or "swap": what happens to a request preempted for lack of blocks.
    preemption_mode: str = "recompute"
    # Host memory for swapped-out blocks, in GiB (0 = no swapping; swap falls back to recompute).
    swap_space: float = 0.0
    # Reuse the KV blocks of earlier requests that share a prefix (automatic prefix caching).
    enable_prefix_caching: bool = True
    # Attention backend name (see pagedllm.attention.registry); None = the default.
    attention_backend: str | None = None
    # "cpu" or another torch device string.
    device: str = "cpu"
    # Time each step's parts (see pagedllm.profiler); costs a little per step.
    profile: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model must be a path (str) or None, got {self.model!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        for name in ("enable_prefix_caching", "profile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        if not is_number(self.swap_space) or not 0 <= self.swap_space < math.inf:
            raise ValueError(f"swap_space must be a finite number of GiB >= 0, got "
                             f"{self.swap_space!r}")
        self._verify_device()
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _verify_device(self) -> None:
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', "
                             f"got {self.device!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', "
                             f"got {self.device!r}") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA device "
                             f"(this torch build: {torch.__version__})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype] or torch.float32
