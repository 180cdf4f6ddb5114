"""Engine configuration: user-facing arguments, checked once with errors that say what to change.

Imports no torch at module level, so the command line builds its flags from it quickly."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pagedllm.core.scheduler import PREEMPTION_MODES
from pagedllm.executor.abstract import DISTRIBUTED_EXECUTOR_BACKENDS
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.validation import is_int, is_number

if TYPE_CHECKING:
    import torch

# dtype names -> torch dtype names (None: decided by the device).
_DTYPES = {
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
# Weight quantization (vLLM's `quantization`): "gguf" only names a .gguf model's own types.
QUANTIZATIONS = ("auto", "none", "int8", "gguf")
# KV cache element types (vLLM's `kv_cache_dtype`): auto is the model's dtype; int8 stores each
# K/V value as an int8 with an fp32 scale per (token, kv head); fp8 (= fp8_e5m2, vLLM's CPU
# format) as an e5m2 byte. Both about half of bf16's bytes; int8 is the more accurate (on the
# shipped SmolLM2: perplexity +0.3% against e5m2's +4.5%; docs/benchmarks.md).
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e5m2")
# The attention backends that read an 8-bit cache (attention/torch_paged.py, cpu_paged.py).
FP8_KV_BACKENDS = ("cpu_paged", "torch_paged")


def setting(default: Any, help: str, choices: Sequence[str] | None = None,
            flag: bool = True, aliases: Sequence[str] = ()) -> Any:
    """A field of EngineConfig: its default, and the help text, choices and short `aliases`
    (vLLM's, such as -tp) its `--flag` shows (`flag=False`: a keyword of `LLM` without a
    command-line flag)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag,
                                            "aliases": tuple(aliases)})


@dataclass
class EngineConfig:
    """Every setting of the engine, with vLLM's names where vLLM has one.

    The one place where a setting, its default, its check and its help text live: `LLM`'s
    keyword arguments and the `--flags` of `pagedllm generate`, `serve` and `bench` are made
    from these fields (`add_cli_args`, `from_cli_args`), so a new setting is one field here
    (and its check in `__post_init__`).
    """

    model: str | None = setting(
        None, "Hugging Face model directory or .gguf file (default: the shipped "
        "SmolLM2-135M-Instruct)")
    dtype: str = setting(
        "auto", "weights, activations and KV cache: float32, bfloat16 or auto (the checkpoint's:"
        " bfloat16 for a bf16/fp16 one, else float32; a GGUF: bfloat16 where the CPU has"
        " AVX512_BF16 or AMX, else float32)",
        choices=("auto", "float32", "bfloat16"))
    # Default "auto" (issue 25): the shipped SmolLM2 GGUF keeps its Q4_1/Q8_0 blocks: 99.99%
    # top-1 against the file dequantized, about 1.9x dense bf16 and llama.cpp on a single
    # stream, a third of the weight memory, a warm start as quick as the dense one (its panels
    # cached on disk: models/gguf_cache.py); but a batch of 64 runs at about 0.84x dense bf16
    # (16-bit activations cost as many dot-product instructions as bf16; 8-bit ones flip
    # near-tie answers): quantization="none" with dtype="bfloat16" for batch-bound serving.
    quantization: str = setting(
        "auto", "weight quantization: none (dequantize to dtype), auto (a .gguf keeps its "
        "quantized types on the integer kernels, a Hugging Face directory stays dense), int8 "
        "(per-channel int8 weights quantized at load), gguf (a .gguf's own types, as auto)",
        choices=QUANTIZATIONS)
    block_size: int = setting(16, "tokens per KV cache block")
    kv_cache_dtype: str = setting(
        "auto", "KV cache element type: auto (the model's dtype), int8 (one byte per value and "
        "an fp32 scale per token and kv head: about half of bf16's memory and bandwidth) or "
        "fp8 / fp8_e5m2 (one e5m2 byte per value, vLLM's CPU format: less accurate)",
        choices=KV_CACHE_DTYPES)
    num_kv_blocks: int | None = setting(
        None, "size of the KV cache in blocks (overrides --kv-cache-memory-bytes)")
    kv_cache_memory_bytes: int | None = setting(
        None, "size of the KV cache in bytes (default: 20% of available memory, at most 4 GiB;"
        " 80% of free GPU memory on CUDA)")
    max_num_seqs: int = setting(256, "most requests running at once")
    max_num_batched_tokens: int = setting(
        2048, "most tokens in one forward pass; longer prompts are prefilled in chunks")
    max_model_len: int | None = setting(
        None, "context length (default: the model's max_position_embeddings)")
    seed: int = setting(0, "seed of the sampler for requests without a seed of their own")
    preemption_mode: str = setting(
        "recompute", "what happens to a request preempted for lack of KV blocks",
        choices=PREEMPTION_MODES)
    swap_space: float = setting(
        0.0, "GiB of host memory for swapped-out KV blocks (0: no swapping; swap then falls "
        "back to recompute)")
    enable_prefix_caching: bool = setting(
        True, "reuse the KV blocks of earlier requests that share a prefix")
    attention_backend: str | None = setting(
        None, "attention backend (see pagedllm.attention.registry; default: the fused CPU "
        "kernel on CPU)")
    device: str = setting("cpu", "torch device: cpu, or cuda[:N]")
    tensor_parallel_size: int = setting(
        1, "ranks that split every layer's heads and columns (Megatron tensor parallelism; "
        "must divide the query heads)", aliases=("-tp",))
    distributed_executor_backend: str | None = setting(
        None, "how ranks run: uni (in the engine's process), mp (one worker process per rank) "
        "or ray (default: uni at one rank, mp above)", choices=DISTRIBUTED_EXECUTOR_BACKENDS)
    speculative_config: dict | None = setting(  # noqa: RUF009 (a field(), default None)
        None, "speculative decoding, vLLM's dict (JSON on the command line), e.g. "
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2}; see spec_decode/config.py')
    profile: bool = setting(
        False, "time each step's parts (pagedllm generate prints the breakdown to stderr); "
        "costs a little per step")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
        """Adds a `--flag` for every setting (vLLM's EngineArgs.add_cli_args), each with its
        default and help; bools take `--x` / `--no-x`. `skip` names fields the caller adds
        its own way."""
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            if f.name in skip or not f.metadata["flag"]:
                continue
            flags = ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
            kind = _flag_type(f)
            help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
            if kind is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                   default=f.default, help=help_text)
            else:
                if f.default is not None:
                    help_text += f" (default: {f.default})"
                group.add_argument(*flags, type=kind, default=f.default, help=help_text,
                                   choices=f.metadata["choices"])

    @classmethod
    def kwargs_from_cli_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The settings among parsed flags, as keyword arguments of EngineConfig or `LLM`."""
        return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model must be a path (str) or None, got {self.model!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        self._verify_quantization()
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
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
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
        if not is_number(self.swap_space) or not 0 <= self.swap_space < math.inf:
            raise ValueError(f"swap_space must be a finite number of GiB >= 0, got "
                             f"{self.swap_space!r}")
        self._verify_device()
        self._verify_parallel()
        self._verify_kv_cache_dtype()
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        SpeculativeConfig.from_dict(self.speculative_config)  # ValueError on a bad setting

    def _verify_device(self) -> None:
        import torch

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

    def _verify_parallel(self) -> None:
        size, backend = self.tensor_parallel_size, self.distributed_executor_backend
        if not is_int(size) or size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)} or None, got "
                             f"{backend!r}")
        if backend == "uni" and size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank in the "
                             f"engine's process, but tensor_parallel_size={size}: use 'mp'")
        if backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("distributed_executor_backend='ray' needs Ray, which is not "
                             "installed: pip install pagedllm[ray]")
        if size > 1 and self.device != "cpu":
            raise ValueError(f"tensor_parallel_size={size} runs on CPU ranks (gloo and shared "
                             f"memory); device={self.device!r} is not supported with it yet: "
                             f"use device='cpu' or tensor_parallel_size=1")

    def _verify_quantization(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                             f"{self.quantization!r}")
        is_gguf = self.model is None or str(self.model).endswith(".gguf")
        if self.quantization == "gguf" and not is_gguf:
            raise ValueError(f"quantization='gguf' needs a .gguf model; for the Hugging Face "
                             f"directory {str(self.model)!r} use one of auto, none, int8")

    def _verify_kv_cache_dtype(self) -> None:
        if self.kv_cache_dtype == "auto":
            return
        if self.device != "cpu":
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is implemented on CPU "
                             f"only; device={self.device!r} takes kv_cache_dtype='auto'")
        if self.attention_backend is not None and self.attention_backend not in FP8_KV_BACKENDS:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs one of the "
                             f"attention backends {', '.join(FP8_KV_BACKENDS)}, got "
                             f"attention_backend={self.attention_backend!r}")

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type: torch_dtype for "auto", int8, or float8_e5m2."""
        import torch

        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        return torch.int8 if self.kv_cache_dtype == "int8" else torch.float8_e5m2

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype; "auto" is float32 here, and the engine resolves it from the checkpoint
        first (models/default_model.auto_dtype)."""
        import torch

        return getattr(torch, _DTYPES[self.dtype] or "float32")


def _json_object(text: str) -> dict:
    """A dict flag's value: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


# The flag types of the settings' annotations (which are strings under `from __future__ import
# annotations`); `X | None` takes X's.
_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": _json_object}


def _flag_type(f: Field) -> type:
    name = str(f.type).replace(" | None", "")
    if name not in _FLAG_TYPES:
        raise TypeError(f"EngineConfig.{f.name}: no command-line type for {f.type!r}")
    return _FLAG_TYPES[name]
