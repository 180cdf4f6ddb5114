"""The GGUF path's ready-to-run weights cached on disk, so that a warm start with the GGUF kept
quantized reads one file instead of the GGUF's blocks and repacking them into panels.

The file is models/cache_file.py's (CacheFile: the same directory, header, checksum,
atomic replace and PAGEDLLM_PACKED_WEIGHT_CACHE switch as the dense packing's). It holds the model as the loader and
pack_weights left it: each GGUF linear layer's runs (layers/quantization/gguf.py: the panel
bytes and their format, a float part's packing or plain weight, the fp32 bias), each GGUF token
embedding's blocks (a tied head's panels are those bytes: written once, given to both), and
every other parameter (norms, biases, a float embedding) in the model's dtype.

Keyed by what those bytes depend on: the GGUF file (resolved path, size and modification
time), the model class and its parameters and GGUF layers (names, shapes, dtypes), the dtype,
the tensor-parallel rank, the native build (sources, flags, CPU features, torch version) and
the code that makes the bytes (this module, the GGUF loader and method, the dense packing).
A file with another key, damaged or truncated is never used: the GGUF is read and packed again
and the file rewritten.

A hit reads nothing of the GGUF beyond its header (the architecture check), and skips the
layers' processing (pack_weights finds this cache through packed_cache.register).
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from pathlib import Path

import torch
from torch import nn

from pagedllm.layers.linear import LinearBase
from pagedllm.layers.packed import PackedWeight
from pagedllm.layers.quantization.gguf import GGUFEmbedding, GGUFLinearMethod, _Run, stored_format
from pagedllm.models.cache_file import CacheFile, Group, cache_enabled
from pagedllm.models.cache_layout import gguf_slot
from pagedllm.models.packed_cache import BATCH_HINT, BATCH_INVARIANT, register
from pagedllm.ops import cpu_ops

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The sources whose logic decides the cached bytes (the native ones are in the build key).
_CODE = ("layers/quantization/gguf.py", "models/gguf_loader.py", "models/gguf_cache.py",
         "models/packed_cache.py", "models/cache_file.py", "models/cache_layout.py",
         "layers/packed.py",
         "layers/quantization/dense.py")
_PARAMS = "params"

# Models that map_into filled from the file (True) or found no usable file for (False).
_mapped: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _gguf_layers(model: nn.Module) -> list[tuple[str, LinearBase]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LinearBase) and isinstance(m.linear_method, GGUFLinearMethod)]


def _embeddings(model: nn.Module) -> list[tuple[str, GGUFEmbedding]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GGUFEmbedding)]


def _plain_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the loader fills with values: all but the GGUF modules' placeholder
    weights (their bytes live in the runs and blocks)."""
    holders = {id(m) for _, m in _gguf_layers(model) + _embeddings(model)}
    out = []
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not (leaf == "weight" and id(module) in holders):
                out.append((f"{module_name}.{leaf}" if module_name else leaf, param))
    # A parameter two modules share (a tied table) once, by its first name.
    seen: set[int] = set()
    return [(n, p) for n, p in out if not (id(p) in seen or seen.add(id(p)))]


def cache_key(model: nn.Module, gguf_path: Path, dtype: torch.dtype) -> dict:
    """What the cached bytes depend on (module docstring); `dtype`: the one the model's float
    weights have once loaded."""
    from pagedllm import __version__
    from pagedllm.distributed import get_tp_group
    from pagedllm.ops.cpu_extension import build_directory

    def dtype_of(t: torch.Tensor) -> str:
        return str(dtype if t.is_floating_point() else t.dtype)

    stat = gguf_path.stat()
    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256(b"".join((package / name).read_bytes() for name in _CODE))
    tp = get_tp_group()
    return {
        "format": FORMAT_VERSION,
        "kind": "gguf",
        "version": __version__,
        "code": code.hexdigest()[:16],
        "native_build": build_directory().name,
        "torch": torch.__version__,
        "model_file": str(gguf_path.resolve()),
        "file": [stat.st_size, stat.st_mtime_ns],
        "architecture": type(model).__name__,
        "dtype": str(dtype),
        "tp": [tp.rank, tp.world_size],
        "batch": [BATCH_HINT, BATCH_INVARIANT],
        "params": [[name, list(p.shape), dtype_of(p)] for name, p in _plain_params(model)],
        "gguf_layers": [[name, list(m.output_partition_sizes), m.input_size_per_partition]
                        for name, m in _gguf_layers(model)],
        "embeddings": [[name, m.num_embeddings, m.embedding_dim]
                       for name, m in _embeddings(model)],
    }


class GGUFWeightCache(CacheFile):
    """The cache file of one GGUF model's processed weights: map_into fills the model from it
    before its weights are read; pack_weights then calls load (a count: nothing left to
    process) or, on a miss, store after processing."""

    def __init__(self, key: dict) -> None:
        super().__init__(key, gguf_slot(key["model_file"], key["tp"], key["dtype"]))

    @classmethod
    def for_model(cls, model: nn.Module, gguf_path: Path, dtype: torch.dtype
                  ) -> GGUFWeightCache | None:
        """The cache of `model` (built, its weights not read yet) loaded from `gguf_path`,
        registered for its pack_weights; None where it has none (turned off, no native ops)."""
        if not cache_enabled() or cpu_ops() is None:
            return None
        try:
            cache = cls(cache_key(model, gguf_path, dtype))
        except OSError as exc:
            logger.info("GGUF weights not cached: %s", exc)
            return None
        register(model, cache)
        return cache

    # ---- reading -----------------------------------------------------------------------

    def map_into(self, model: nn.Module) -> bool:
        """Fills the model's GGUF layers, embeddings and parameters from the file, read and
        checked whole; False (nothing changed) where it is missing, stale or damaged (then
        logged)."""
        groups = self.read_groups()
        filled = False
        if groups is not None:
            try:
                self._give(model, {name: (meta, tensors) for name, meta, tensors in groups})
                filled = True
            except (KeyError, RuntimeError, TypeError, ValueError) as exc:
                self.refuse(exc)
        _mapped[model] = filled
        return filled

    def load(self, model: nn.Module) -> int | None:
        """After map_into: the number of layers it gave their runs, or None where it found no
        usable file (pack_weights then processes the layers and calls store)."""
        if not _mapped.pop(model, False):
            return None
        return len(_gguf_layers(model))

    def _give(self, model: nn.Module, groups: dict[str, tuple[dict, dict]]) -> None:
        """Checks that the file holds every part of the model, then gives them."""
        layers, embeddings = _gguf_layers(model), _embeddings(model)
        params = _plain_params(model)
        names = {_PARAMS} | {f"layer:{n}" for n, _ in layers} | {f"embedding:{n}"
                                                                 for n, _ in embeddings}
        if set(groups) != names or set(groups[_PARAMS][1]) != {n for n, _ in params}:
            raise ValueError("it holds other layers")

        def tensor(ref: list[str]) -> torch.Tensor:  # [group, name]: shared bytes
            return groups[ref[0]][1][ref[1]]

        runs_of = {}
        for name, _ in layers:
            meta, tensors = groups[f"layer:{name}"]
            runs = []
            for i, (start, size, ggml_type, weight_ref, packed_meta) in enumerate(meta["runs"]):
                packed = None
                if packed_meta is not None:
                    parts = {attr.split(".", 1)[1]: t for attr, t in tensors.items()
                             if attr.startswith(f"p{i}.")}
                    if "plain_bias" in parts:
                        parts["plain_bias"] = parts["plain_bias"].clone()
                    packed = PackedWeight.from_cache_state(packed_meta, parts)
                weight = tensor(weight_ref) if weight_ref is not None else tensors.get(f"w{i}")
                runs.append(_Run(start, size, ggml_type, weight, tensors.get(f"b{i}"), packed))
            runs_of[name] = runs
        values = groups[_PARAMS][1]
        for name, param in params:
            if values[name].shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(values[name].shape)} in the file")
        # Every part found: give them (nothing changed before this point).
        for name, layer in layers:
            layer.batch_hint, layer.batch_invariant = BATCH_HINT, BATCH_INVARIANT
            layer.gguf_runs, layer.gguf_parts = runs_of[name], []
        for name, embedding in embeddings:
            meta, tensors = groups[f"embedding:{name}"]
            # NOTE: the format itself (a panel format where a tied head repacked the blocks):
            # the file's buffer records none on its storage (gguf.stored_format).
            embedding.blocks, embedding.ggml_type = tensors["blocks"], meta["format"]
        for name, param in params:
            param.data = values[name]

    # ---- writing -----------------------------------------------------------------------

    def store(self, model: nn.Module) -> bool:
        """Writes the model's processed GGUF weights (atomically); False where a part is not
        cacheable (a float part in oneDNN's layout) or the write failed."""
        groups: list[Group] = []
        written: dict[tuple, list[str]] = {}  # (address, bytes, shape, dtype) -> [group, name]

        def shared(t: torch.Tensor, group: str, name: str) -> list[str] | None:
            at = (t.data_ptr(), t.nbytes, tuple(t.shape), t.dtype)
            if at in written:
                return written[at]
            written[at] = [group, name]
            return None

        for name, embedding in _embeddings(model):
            group = f"embedding:{name}"
            shared(embedding.blocks, group, "blocks")
            groups.append((group, {"format": stored_format(embedding.blocks,
                                                           embedding.ggml_type)},
                           {"blocks": embedding.blocks}))
        for name, layer in _gguf_layers(model):
            group, runs, tensors = f"layer:{name}", [], {}
            for i, run in enumerate(layer.gguf_runs):
                packed_meta, weight_ref = None, None
                if run.packed is not None:
                    state = run.packed.cache_state()
                    if state is None:
                        return False
                    packed_meta = state[0]
                    tensors.update({f"p{i}.{attr}": t for attr, t in state[1].items()})
                if run.weight is not None:
                    weight_ref = shared(run.weight, group, f"w{i}")
                    if weight_ref is None:
                        tensors[f"w{i}"] = run.weight
                if run.bias is not None:
                    tensors[f"b{i}"] = run.bias
                runs.append([run.start, run.size, run.ggml_type, weight_ref, packed_meta])
            groups.append((group, {"runs": runs}, tensors))
        groups.append((_PARAMS, {}, {name: p.detach() for name, p in _plain_params(model)}))
        return self.write_groups(groups)
