"""A GGUF file's tensors for the quantized path, named as the Hugging Face checkpoint names them.

Tensors of a type the quantized kernels take (layers/quantization/gguf.py: Q8_0, Q4_0, Q4_1,
Q4_K, Q5_K, Q6_K) come as their raw blocks, uint8 [rows, bytes per row], tagged with the
attribute `ggml_type`; 1-D tensors (norms) and weights of any other type are dequantized to
float32 by the gguf package, with one warning per type for weights. The config and the
tokenizer still come from the converted directory (models/default_model.py).

llama.cpp's converter permutes the rows of attn_q and attn_k (its rotary layout); they are put
back here, block rows as they are, so the model sees Hugging Face's order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from pagedllm.layers.quantization.gguf import KERNEL_TYPES

logger = logging.getLogger(__name__)

# The architectures whose tensors this loader names (general.architecture).
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp adds that the model computes itself.
_SKIPPED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the model does not take."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, leaf = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"
    return None


# The reader the architecture check parsed, kept for the weight pass that follows it in one
# load: parsing a file's metadata (its tokenizer's ~50k strings, element by element) takes
# seconds. One slot, taken by the next gguf_weights of the same file, so no reader (and no
# mapping of the file) outlives the load.
_parsed: dict[tuple[Path, int, int], object] = {}


def _file_key(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return (path.resolve(), stat.st_size, stat.st_mtime_ns)


def _reader(path: Path, keep: bool):
    from gguf import GGUFReader

    key = _file_key(path)
    reader = _parsed.pop(key, None) or GGUFReader(path)
    _parsed.clear()
    if keep:
        _parsed[key] = reader
    return reader


def gguf_architecture(path: Path) -> str:
    field = _reader(path, keep=True).fields.get("general.architecture")
    return field.contents() if field is not None else "unknown"


def _unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (per head: pairs interleaved -> two halves)."""
    shape = rows.shape
    return (rows.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:])
            .transpose(1, 2).reshape(shape))


def gguf_weights(path: Path, config: PretrainedConfig,
                 float_names: tuple[str, ...] = ("token_embd.weight",), tied_head: bool = False,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for each tensor of the file, as the module docstring says.

    Args:
        float_names: GGUF tensors dequantized whatever their type (the token embedding looks
            its rows up in float).
        tied_head: also hand token_embd's blocks over as lm_head.weight (a model whose tied
            LM head runs on the stored type), when the file has no output.weight.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = _reader(path, keep=False)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else "unknown"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: the quantized GGUF path supports the "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} architecture, not {arch!r}; "
                         f"load it with quantization='none'")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    warned: set[str] = set()
    names = {t.name for t in reader.tensors}
    tensors = list(reader.tensors)
    if tied_head and "output.weight" not in names:
        tensors += [t for t in reader.tensors if t.name == "token_embd.weight"]
    embedding: torch.Tensor | None = None  # token_embd's blocks, shared with a tied head
    for index, tensor in enumerate(tensors):
        as_head = index >= len(reader.tensors)  # the tied head's copy of token_embd
        name = "lm_head.weight" if as_head else hf_name(tensor.name)
        if as_head and embedding is not None:
            yield name, embedding
            continue
        if name is None:
            if tensor.name in _SKIPPED:
                continue
            raise ValueError(f"{path.name}: tensor {tensor.name!r} has no place in a "
                             f"{arch} model")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        is_matrix = len(tensor.shape) == 2
        if is_matrix and int(qtype) in KERNEL_TYPES and (as_head or tensor.name not in float_names):
            data = torch.from_numpy(np.array(tensor.data))  # a copy: the file is read-only
            data.ggml_type = int(qtype)
        else:
            if is_matrix and int(qtype) not in KERNEL_TYPES and qtype.name not in warned:
                warned.add(qtype.name)
                logger.warning("%s: no quantized kernel for %s weights; dequantizing them to "
                               "float at load", path.name, qtype.name)
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 first
            values = dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
            data = torch.from_numpy(values.reshape(shape).copy())
        if tensor.name.endswith("attn_q.weight"):
            data = _keep_type(_unpermute_rows(data, num_heads), data)
        elif tensor.name.endswith("attn_k.weight"):
            data = _keep_type(_unpermute_rows(data, num_kv_heads), data)
        if tensor.name == "token_embd.weight" and hasattr(data, "ggml_type"):
            embedding = data
        yield name, data


def _keep_type(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    new = new.contiguous()
    if hasattr(old, "ggml_type"):
        new.ggml_type = old.ggml_type
    return new
