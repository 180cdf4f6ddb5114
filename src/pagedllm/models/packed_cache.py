"""Packed weights cached on disk, so that a second start reads them instead of packing again.

One file per model directory and packing (`cache_root()/packed_weights/`), keyed as the
converted model is, by what the packed bytes depend on: the model's files (name, size and
modification time of its config and safetensors), its architecture and layers (names,
shapes, dtypes), the tensor-parallel rank, the native build (its sources, compiler flags, CPU
features and torch version: ops/cpu_extension.build_directory) and this packing code. A start
with another key packs afresh and replaces the file.

The file is models/cache_file.py's (CacheFile: used only whole and checked, written
atomically, read into one buffer in 2 MB pages whose views the packing then is). On a hit the
loader reads no checkpoint tensor that the file replaces (`map_into`, before the weights are
read: the linear layers' weights are checked for shape only).

A loader may choose another cache for its model before the weights are read (`register`:
models/gguf_cache.py for a GGUF kept quantized); pack_weights then uses that one.

PAGEDLLM_PACKED_WEIGHT_CACHE=0 turns the cache off; PAGEDLLM_PACKED_WEIGHT_CACHE_DIR moves it.
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
from pagedllm.layers.quantization.dense import UnquantizedLinearMethod
from pagedllm.models.cache_file import (  # noqa: F401 - re-exported: the settings' names
    CACHE_DIR_ENV,
    CACHE_ENV,
    CacheFile,
    Group,
    cache_dir,
    cache_enabled,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TIED_HEAD = "tied_lm_head"
# What pack_linear_layers packs with (its defaults); part of the key.
BATCH_HINT, BATCH_INVARIANT = 64, True
# The sources whose logic decides the packed bytes (the native ones are in the build key).
_CODE = ("layers/packed.py", "layers/quantization/dense.py", "models/packed_cache.py",
         "models/cache_file.py", "models/cache_layout.py")

# Models that map_into checked before their weights were read: True where their layers hold the
# file's packing, False where the file was not usable.
_mapped: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
# Caches a loader chose for its model before the weights were read (register).
_registered: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def model_dir_of(model: nn.Module) -> Path | None:
    """The Hugging Face directory the model's weights came from (its config's path), or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name)
    return path.resolve() if name and (path / "config.json").is_file() else None


def _dense_layers(model: nn.Module) -> list[tuple[str, LinearBase]] | None:
    """The linear layers in module order, or None where one is not dense (quantized)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearBase)]
    if any(not isinstance(m.linear_method, UnquantizedLinearMethod) for _, m in layers):
        return None
    return layers


def cache_key(model: nn.Module, model_dir: Path, dtype: torch.dtype | None = None) -> dict | None:
    """What the packed bytes depend on (see the module docstring), or None where the model's
    packing is not cached (a quantized layer, another device). `dtype`: the one the weights
    will have once loaded (build_model casts them last), where they do not have it yet."""
    layers = _dense_layers(model)
    if layers is None or any(m.weight.device.type != "cpu" for _, m in layers):
        return None

    def dtype_of(t: torch.Tensor) -> str:
        return str(dtype if dtype is not None and t.is_floating_point() else t.dtype)

    from pagedllm import __version__
    from pagedllm.distributed import get_tp_group
    from pagedllm.ops.cpu_extension import build_directory

    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json")))
    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256(b"".join((package / name).read_bytes() for name in _CODE))
    embedding = model.get_input_embeddings().weight
    tp = get_tp_group()
    return {
        "format": FORMAT_VERSION,
        "version": __version__,
        "code": code.hexdigest()[:16],
        "native_build": build_directory().name,
        "torch": torch.__version__,
        "model_dir": str(model_dir),
        "files": files,
        "architecture": type(model).__name__,
        "tp": [tp.rank, tp.world_size],
        "batch": [BATCH_HINT, BATCH_INVARIANT],
        # Shapes as built (the weight itself is emptied once packed).
        "layers": [[name, [sum(m.output_partition_sizes), m.input_size_per_partition],
                    dtype_of(m.weight), m.rank_bias() is not None, bool(m.gates_swiglu)]
                   for name, m in layers],
        "tied_head": None if model.lm_head is not None
        else [list(embedding.shape), dtype_of(embedding)],
    }


class PackedWeightCache(CacheFile):
    """The cache file of one dense model's packing: `load` fills the model from it, `store`
    writes it after packing."""

    def __init__(self, key: dict) -> None:
        super().__init__(key, [key["model_dir"], key["tp"], key["tied_head"],
                               sorted({layer[2] for layer in key["layers"]})])

    @classmethod
    def for_model(cls, model: nn.Module, dtype: torch.dtype | None = None
                  ) -> CacheFile | None:
        """The model's cache, or None where it has none (turned off, no model directory,
        quantized layers); `dtype` as in cache_key. A loader that chose another cache for
        the model before its weights were read (register) gets that one."""
        if not cache_enabled():
            return None
        chosen = _registered.get(model)
        if chosen is not None:
            return chosen
        model_dir = model_dir_of(model)
        if model_dir is None:
            return None
        try:
            key = cache_key(model, model_dir, dtype)
        except OSError as exc:
            logger.info("packed weights not cached: %s", exc)
            return None
        return None if key is None else cls(key)

    # ---- reading -----------------------------------------------------------------------

    def map_into(self, model: nn.Module) -> list[LinearBase] | None:
        """Before the weights are read: gives every linear layer (and a tied head) its packing
        from the file, read and checked whole, and returns those layers, whose weights the
        loader then need not read; None (nothing changed) where the file is missing, stale or
        damaged, which is then logged."""
        weights = self._usable(model)
        _mapped[model] = weights is not None
        if weights is None:
            return None
        layers = self._give(model, weights)
        return [layer for _, layer in layers]

    def load(self, model: nn.Module) -> int | None:
        """Gives every linear layer (and a tied head) its packed weight from the file; the
        number of packed weights, or None (nothing changed) where the file is missing, stale or
        damaged, which is then logged. After map_into, counts what it gave (or answers None
        at once where it found no usable file)."""
        mapped = _mapped.pop(model, None)
        if mapped is False:
            return None
        if mapped:
            return len(_packed_layers(model))
        weights = self._usable(model)
        if weights is None:
            return None
        self._give(model, weights)
        return len(weights)

    def _usable(self, model: nn.Module) -> dict[str, PackedWeight] | None:
        """The file's packing where the file exists, is whole and holds the model's layers."""
        groups = self.read_groups()
        if groups is None:
            return None
        try:
            weights = self._weights(groups)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            self.refuse(exc)
            return None
        layers = _dense_layers(model) or []
        names = [name for name, _ in layers] + ([TIED_HEAD] if model.lm_head is None else [])
        if sorted(weights) != sorted(names):
            logger.warning("the packed-weight cache %s holds other layers: packing again",
                           self.path)
            return None
        return weights

    @staticmethod
    def _weights(groups: list[Group]) -> dict[str, PackedWeight]:
        weights = {}
        for name, meta, tensors in groups:
            if "plain_bias" in tensors:  # copied out (the plain biases)
                tensors["plain_bias"] = tensors["plain_bias"].clone()
            weights[name] = PackedWeight.from_cache_state(meta, tensors)
        return weights

    @staticmethod
    def _give(model: nn.Module, weights: dict[str, PackedWeight]) -> list[tuple[str, LinearBase]]:
        layers = _dense_layers(model) or []
        for name, layer in layers:
            layer.batch_hint, layer.batch_invariant = BATCH_HINT, BATCH_INVARIANT
            layer.packed = weights[name]
            # The packed copy replaces the plain weight, as the dense method does.
            layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
        if model.lm_head is None:
            model.tied_lm_head = weights[TIED_HEAD]
        return layers

    def _read(self) -> dict[str, PackedWeight]:
        """The file's packing, checked whole (raises where it is not usable)."""
        return self._weights(self._read_groups())

    # ---- writing -----------------------------------------------------------------------

    def store(self, model: nn.Module) -> bool:
        """Writes the model's packed weights (atomically); False where some weight is not
        cacheable (oneDNN's layout, an unpacked layer) or the write failed."""
        layers = _dense_layers(model) or []
        packed = [(name, layer.packed) for name, layer in layers]
        if model.lm_head is None:
            packed.append((TIED_HEAD, model.tied_lm_head))
        states = [(name, None if w is None else w.cache_state()) for name, w in packed]
        if not states or any(state is None for _, state in states):
            return False
        return self.write_groups([(name, meta, tensors) for name, (meta, tensors) in states])


def register(model: nn.Module, cache: object) -> None:
    """Makes `cache` (with PackedWeightCache's load/store) the one pack_weights uses for
    `model`: a loader's choice made before the weights were read (models/gguf_cache.py)."""
    _registered[model] = cache


def _packed_layers(model: nn.Module) -> list[tuple[str, PackedWeight]]:
    """The packing map_into gave the model, by cache entry name."""
    packed = [(name, layer.packed) for name, layer in _dense_layers(model) or []]
    return packed + ([(TIED_HEAD, model.tied_lm_head)] if model.lm_head is None else [])
