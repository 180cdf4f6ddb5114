"""A GGUF file's tensors for the quantized path, named as the Hugging Face checkpoint names them.

Tensors of a type the quantized kernels take (layers/quantization/gguf.py: Q8_0, Q4_0, Q4_1,
Q4_K, Q5_K, Q6_K) come as their raw blocks, uint8 [rows, bytes per row], tagged with the
attribute `ggml_type`; 1-D tensors (norms) and weights of any other type are dequantized to
float32 by the gguf package, with one warning per type for weights. The config and the
tokenizer still come from the converted directory (models/default_model.py).

Per architecture (ARCHITECTURES): llama.cpp's Llama converter permutes the rows of attn_q and
attn_k (its rotary layout); they are put back here, block rows as they are, so the model sees
Hugging Face's order. Its Gemma 2/3 converters permute nothing but store every RMSNorm weight
as 1 + w (Gemma's norms multiply by 1 + w); the 1 is taken off here, as transformers' GGUF
loader does, so both paths give the model the same norm weights.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.layers.quantization.gguf import KERNEL_TYPES

if TYPE_CHECKING:  # NOTE: transformers costs about a second of a start to import
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp wrote one architecture's tensors: the per-layer names (blk.N.<part>)
    and its conventions."""

    layer_names: dict[str, str]
    permutes_qk: bool  # attn_q/attn_k rows in llama.cpp's rotary order
    norms_plus_one: bool  # RMSNorm weights stored as 1 + w


_LLAMA_LAYER_NAMES = {
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
# Gemma 2's four norms per layer (llama.cpp's ffn_norm is the pre-MLP one here).
_GEMMA2_LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# The architectures whose tensors this loader names (general.architecture).
ARCHITECTURES = {
    "llama": GGUFArchitecture(_LLAMA_LAYER_NAMES, permutes_qk=True, norms_plus_one=False),
    "gemma2": GGUFArchitecture(_GEMMA2_LAYER_NAMES, permutes_qk=False, norms_plus_one=True),
    "gemma3": GGUFArchitecture({**_GEMMA2_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                                "attn_k_norm": "self_attn.k_norm"},
                               permutes_qk=False, norms_plus_one=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp adds that the model computes itself.
_SKIPPED = ("rope_freqs.weight",)


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the model does not take."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    layer_names = ARCHITECTURES[architecture].layer_names
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in layer_names:
        layer, part, leaf = match.groups()
        return f"model.layers.{layer}.{layer_names[part]}.{leaf}"
    return None


# GGUF metadata value types (the format's gguf_type): scalars by struct format, and the two
# that hold others.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# The metadata the loader reads; the rest (the tokenizer's ~50k strings, ...) is skipped.
_KEPT_KEYS = ("general.architecture", "general.alignment")
# GGML types the gguf package reads as plain numbers (shape in elements); others are blocks.
_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                27: np.int64, 28: np.float64}


class UnsupportedGGUF(ValueError):
    """A file GGUFIndex does not read (not GGUF v2/v3 little-endian); the gguf package may."""


@dataclass
class GGUFTensorInfo:
    """One tensor, as the gguf package's ReaderTensor gives it: `shape` lists ne0 first, and
    `data` is a read-only view of the file (elements for plain types, else uint8 [..., rows,
    bytes per row])."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFIndex:
    """The architecture and the tensors of a GGUF file (v2/v3, little-endian), read from its
    header without the gguf package's reader, which parses every metadata value element by
    element (the tokenizer's ~50k strings: seconds of a start). The file stays mapped while a
    tensor's `data` is referenced."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file
                raise UnsupportedGGUF(f"{path.name}: not a GGUF file") from None
        try:
            self._parse(mapped, path.name)
        except struct.error:
            raise UnsupportedGGUF(f"{path.name}: truncated GGUF header") from None

    def _parse(self, buf: mmap.mmap, name: str) -> None:
        if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise UnsupportedGGUF(f"{name}: not a little-endian GGUF v2/v3 file")
        num_tensors, num_fields = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        fields: dict[str, object] = {}
        for _ in range(num_fields):
            key, pos = _read_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            if key in _KEPT_KEYS and value_type in (_STRING, *_SCALARS):
                fields[key], pos = _read_value(buf, pos + 4, value_type)
            else:
                pos = _skip_value(buf, pos + 4, value_type)
        infos = []
        for _ in range(num_tensors):
            tensor_name, pos = _read_string(buf, pos)
            (num_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            tensor_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            infos.append((tensor_name, dims, tensor_type, offset))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        architecture = fields.get("general.architecture")
        self.architecture = architecture if isinstance(architecture, str) else "unknown"
        self.tensors = [_tensor_info(buf, data_start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError(f"{name}: a tensor name appears twice")


def _read_string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise struct.error("string past the end")
    return bytes(buf[pos + 8:end]).decode("utf-8"), end


def _read_value(buf, pos: int, value_type: int) -> tuple[object, int]:
    if value_type == _STRING:
        return _read_string(buf, pos)
    fmt = "<" + _SCALARS[value_type]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def _skip_value(buf, pos: int, value_type: int) -> int:
    if value_type in _SCALARS:
        return pos + struct.calcsize(_SCALARS[value_type])
    if value_type == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if value_type != _ARRAY:
        raise UnsupportedGGUF(f"unknown GGUF metadata type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _SCALARS:
        return pos + count * struct.calcsize(_SCALARS[item_type])
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        if item_type == _STRING:
            pos += 8 + unpack(buf, pos)[0]
        else:
            pos = _skip_value(buf, pos, item_type)
    if pos > len(buf):
        raise struct.error("array past the end")
    return pos


# (values per block, bytes per block) of the common GGML types, as the gguf package's
# GGML_QUANT_SIZES gives them: the header is read without importing that package (0.1 s of a
# start that then reads its weights from models/gguf_cache.py), which is asked for the others.
_BLOCK_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
                8: (32, 34), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
                14: (256, 210), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
                30: (1, 2)}


def _block_size(name: str, tensor_type: int) -> tuple[int, int]:
    if tensor_type in _BLOCK_SIZES:
        return _BLOCK_SIZES[tensor_type]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        raise UnsupportedGGUF(f"tensor {name!r} has an unknown GGML type {tensor_type}") from None


def _tensor_info(buf, data_start: int, name: str, dims: tuple[int, ...], tensor_type: int,
                 offset: int) -> GGUFTensorInfo:
    block, type_size = _block_size(name, tensor_type)
    shape = tuple(reversed(dims))  # rows first
    num_elements = math.prod(dims)
    if tensor_type in _PLAIN_TYPES:
        dtype, count = _PLAIN_TYPES[tensor_type], num_elements
    else:
        if shape[-1] % block:
            raise UnsupportedGGUF(f"tensor {name!r}: rows of {shape[-1]} values do not fill "
                                  f"blocks of {block}")
        dtype, count = np.uint8, num_elements * type_size // block
        shape = (*shape[:-1], shape[-1] // block * type_size)
    start = data_start + offset
    if start + count * np.dtype(dtype).itemsize > len(buf):
        raise UnsupportedGGUF(f"tensor {name!r} lies past the end of the file")
    data = np.frombuffer(buf, dtype=dtype, count=count, offset=start).reshape(shape)
    return GGUFTensorInfo(name, tensor_type, dims, data)


# The index the architecture check read, kept for the weight pass that follows it in one load.
# One slot, taken by the next gguf_weights of the same file, so no index (and no mapping of the
# file) outlives the load.
_parsed: dict[tuple[Path, int, int], GGUFIndex] = {}


def _file_key(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return (path.resolve(), stat.st_size, stat.st_mtime_ns)


def _read_index(path: Path) -> GGUFIndex:
    """GGUFIndex(path), or the same read by the gguf package where the file is one that
    GGUFIndex does not read (a big-endian or v1 file)."""
    try:
        return GGUFIndex(path)
    except UnsupportedGGUF:
        from gguf import GGUFReader

    reader = GGUFReader(path)
    index = GGUFIndex.__new__(GGUFIndex)
    field = reader.fields.get("general.architecture")
    index.architecture = field.contents() if field is not None else "unknown"
    index.tensors = [GGUFTensorInfo(t.name, int(t.tensor_type), tuple(int(n) for n in t.shape),
                                    t.data) for t in reader.tensors]
    return index


def _reader(path: Path, keep: bool) -> GGUFIndex:
    key = _file_key(path)
    reader = _parsed.pop(key, None) or _read_index(path)
    _parsed.clear()
    if keep:
        _parsed[key] = reader
    return reader


def gguf_architecture(path: Path) -> str:
    return _reader(path, keep=True).architecture


# The tensors whose inputs tensor parallelism splits over the ranks (row-parallel layers).
_ROW_PARALLEL = (".attn_output.weight", ".ffn_down.weight")


def rank_split_error(path: Path, tp_size: int) -> str | None:
    """Why `tp_size` ranks cannot each take whole blocks of the file's row-parallel layers
    (each rank multiplies its share of their inputs), or None where every share is whole."""
    if tp_size == 1:
        return None
    for info in _reader(path, keep=True).tensors:
        if not info.name.endswith(_ROW_PARALLEL) or info.tensor_type in _PLAIN_TYPES:
            continue
        block, _ = _block_size(info.name, info.tensor_type)
        per_rank = info.shape[0] // tp_size
        if per_rank % block:
            from gguf import GGMLQuantizationType

            return (f"{info.name}: {per_rank} inputs per rank split "
                    f"{GGMLQuantizationType(info.tensor_type).name}'s blocks of {block}")
    return None


def forget_index() -> None:
    """Drops the index gguf_architecture kept, where no weight pass follows (the weights came
    from models/gguf_cache.py)."""
    _parsed.clear()


def _unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (per head: pairs interleaved -> two halves), in
    one copy (of the file's mapped bytes, for the blocks)."""
    shape = rows.shape
    permuted = rows.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2)
    return np.array(permuted, order="C").reshape(shape)


# Types without a kernel whose values a kernel type holds exactly: GGML id -> kernel type id.
_WIDENED = {6: 8}  # Q5_0 -> Q8_0


def q5_0_as_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q5_0 blocks (uint8 [rows, blocks * 22]) as Q8_0 blocks (uint8 [rows, blocks * 34]) of
    the same values: a Q5_0 value is d * (q - 16) with q 5 bits, so each block keeps its fp16
    scale d and its values become the int8 q - 16. llama.cpp writes Q5_0 where a Q4_K_M
    tensor's rows are not a multiple of 256 values (Gemma 3 270M's hidden size, 640)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 22)
    high = blocks[..., 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32) & 1
    qs = blocks[..., 6:]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
    widened = np.empty((*blocks.shape[:2], 34), dtype=np.uint8)
    widened[..., :2] = blocks[..., :2]
    widened[..., 2:] = ((low | high.astype(np.int16) << 4) - 16).astype(np.int8).view(np.uint8)
    return widened.reshape(rows, -1)


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
    arch = reader.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: the quantized GGUF path supports the "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} architecture, not {arch!r}; "
                         f"load it with quantization='none'")
    conventions = ARCHITECTURES[arch]
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
        name = "lm_head.weight" if as_head else hf_name(tensor.name, arch)
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
        heads = (None if not conventions.permutes_qk else
                 num_heads if tensor.name.endswith("attn_q.weight") else
                 num_kv_heads if tensor.name.endswith("attn_k.weight") else None)
        kernel_type = int(qtype) if int(qtype) in KERNEL_TYPES else _WIDENED.get(int(qtype))
        if is_matrix and kernel_type is not None and (as_head or tensor.name not in float_names):
            # A copy either way: the file is mapped read-only.
            blocks = (np.array(tensor.data) if heads is None
                      else _unpermute_rows(tensor.data, heads))
            if kernel_type != int(qtype):
                blocks = q5_0_as_q8_0(blocks)
            data = torch.from_numpy(blocks)
            data.ggml_type = kernel_type
        else:
            if is_matrix and kernel_type is None and qtype.name not in warned:
                warned.add(qtype.name)
                logger.warning("%s: no quantized kernel for %s weights; dequantizing them to "
                               "float at load", path.name, qtype.name)
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 first
            values = dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
            values = values.reshape(shape)
            if conventions.norms_plus_one and not is_matrix and tensor.name.endswith("norm.weight"):
                values = values - 1  # float32, as transformers' GGUF loader subtracts it
            data = torch.from_numpy(values.copy() if heads is None
                                    else _unpermute_rows(values, heads))
        if tensor.name == "token_embd.weight" and hasattr(data, "ggml_type"):
            embedding = data
        yield name, data
