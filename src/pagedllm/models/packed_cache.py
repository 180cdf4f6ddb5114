"""Packed weights cached on disk, so that a second start reads them instead of packing again.

One file per model directory and packing (`cache_root()/packed_weights/`), keyed as the
converted model is, by what the packed bytes depend on: the model's files (name, size and
modification time of its config and safetensors), its architecture and layers (names,
shapes, dtypes), the tensor-parallel rank, the native build (its sources, compiler flags, CPU
features and torch version: ops/cpu_extension.build_directory) and this packing code. A start
with another key packs afresh and replaces the file.

A file is used only whole and checked: its header must carry this start's key, its size must
match, and the wrapping 64-bit sum of its payload's words must be the one recorded (a torn,
truncated or bit-flipped file fails it); otherwise the weights are packed again and the file
rewritten. Writers write a temporary file beside it and rename it into place (atomic on one
file system), so two processes starting at once each read either no file or a whole one.

On a hit the loader reads no checkpoint tensor that the file replaces (`map_into`, before the
weights are read: the linear layers' weights are checked for shape only). The payload is read
(one read, no mapping) into a single buffer in 2 MB pages (host_memory.huge_page_buffer) and
checked there, and the packing is views of that buffer: decode steps stream every weight, and
2 MB pages serve them faster than 4 KB ones. Reading costs 0.06 s for the shipped model's
269 MB where a private mapping of the file, summed and copied out, cost 0.9 s (2026-12-07).

PAGEDLLM_PACKED_WEIGHT_CACHE=0 turns the cache off; PAGEDLLM_PACKED_WEIGHT_CACHE_DIR moves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from pagedllm.layers.linear import LinearBase
from pagedllm.layers.packed import PackedWeight
from pagedllm.layers.quantization.dense import UnquantizedLinearMethod
from pagedllm.paths import cache_root

logger = logging.getLogger(__name__)

CACHE_ENV = "PAGEDLLM_PACKED_WEIGHT_CACHE"
CACHE_DIR_ENV = "PAGEDLLM_PACKED_WEIGHT_CACHE_DIR"
MAGIC = b"PGLLMPW1"
ALIGN = 64
FORMAT_VERSION = 1
TIED_HEAD = "tied_lm_head"
# What pack_linear_layers packs with (its defaults); part of the key.
BATCH_HINT, BATCH_INVARIANT = 64, True
# The sources whose logic decides the packed bytes (the native ones are in the build key).
_CODE = ("layers/packed.py", "layers/quantization/dense.py", "models/packed_cache.py")
_MASK = (1 << 64) - 1

# Models that map_into checked before their weights were read: True where their layers hold the
# file's packing, False where the file was not usable.
_mapped: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
# Caches a loader chose for its model before the weights were read (register).
_registered: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """$PAGEDLLM_PACKED_WEIGHT_CACHE_DIR, else `packed_weights` in pagedllm's cache folder."""
    return Path(os.environ.get(CACHE_DIR_ENV) or cache_root() / "packed_weights")


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


def cache_path(key: dict, slot: list) -> Path:
    """`<slot digest>-<key digest>.bin`: the slot is the model with the settings a user may
    switch between (dtypes, rank), so that a new file replaces only its own slot's old ones
    (the model or code changed), never another dtype's."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    where = hashlib.sha256(json.dumps(slot).encode()).hexdigest()
    return cache_dir() / f"{where[:12]}-{digest[:24]}.bin"


def _word_sum(data: torch.Tensor) -> int:
    """The wrapping sum of a uint8 tensor's little-endian 64-bit words (zero-padded)."""
    whole = data.numel() // 8 * 8
    total = int(data[:whole].view(torch.int64).sum()) if whole else 0
    tail = bytes(data[whole:].tolist())
    return (total + int.from_bytes(tail.ljust(8, b"\0"), "little", signed=True)) & _MASK


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# A group of the file: (name, settings as JSON, tensors by name).
Group = tuple[str, dict, dict[str, torch.Tensor]]


class CacheFile:
    """One cache file of named groups of tensors with their settings: read whole and checked
    (key, size, checksum; see the module docstring) into one buffer in 2 MB pages, written
    atomically. `key`: what the bytes depend on; `slot`: see cache_path."""

    def __init__(self, key: dict, slot: list) -> None:
        self.key = json.loads(json.dumps(key))  # as the header reads back (lists, not tuples)
        self.path = cache_path(self.key, slot)

    def read_groups(self) -> list[Group] | None:
        """The file's groups, as views of one buffer in 2 MB pages holding its payload; None
        where the file is missing, or damaged or another key's (then logged)."""
        if not self.path.is_file():
            return None
        try:
            return self._read_groups()
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            logger.warning("the packed-weight cache %s is not usable (%s): packing again",
                           self.path, exc)
            return None

    def _read_groups(self) -> list[Group]:
        from pagedllm.worker.host_memory import huge_page_buffer

        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise ValueError("not a packed-weight file")
            (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
            header = json.loads(f.read(header_len))
            if header.get("key") != self.key:
                raise ValueError("written for another model or packing")
            offset, size = header["payload_offset"], header["payload_bytes"]
            if os.fstat(f.fileno()).st_size != offset + size:
                raise ValueError("truncated or overlong")
            payload = huge_page_buffer(size)
            f.seek(offset)
            if size and f.readinto(memoryview(payload.numpy())) != size:
                raise ValueError("truncated while read")
        if _word_sum(payload) != header["checksum"]:
            raise ValueError("checksum mismatch")
        groups = []
        for entry in header["entries"]:
            tensors = {}
            for name, (dtype, shape, at, nbytes) in entry["tensors"].items():
                dtype = getattr(torch, dtype)
                if math.prod(shape) * dtype.itemsize != nbytes or at + nbytes > size:
                    raise ValueError(f"{entry['name']}.{name}: size mismatch")
                tensors[name] = payload[at:at + nbytes].view(dtype).view(tuple(shape))
            groups.append((entry["name"], entry["meta"], tensors))
        return groups  # the buffer lives as long as the views into it

    def write_groups(self, groups: list[Group]) -> bool:
        """Writes the groups (atomically) and removes this slot's older files; False where the
        write failed (logged)."""
        entries, blobs, at, checksum = [], [], 0, 0
        for name, meta, tensors in groups:
            described = {}
            for attr, tensor in tensors.items():
                data = _as_bytes(tensor)
                described[attr] = [str(tensor.dtype).removeprefix("torch."),
                                   list(tensor.shape), at, data.numel()]
                checksum = (checksum + _word_sum(data)) & _MASK
                blobs.append((at, data))
                at = _aligned(at + data.numel())
            entries.append({"name": name, "meta": meta, "tensors": described})
        header = {"key": self.key, "entries": entries, "payload_bytes": at,
                  "checksum": checksum, "payload_offset": 0}
        # The payload starts at the first aligned offset after the header (whose length
        # depends on that offset's digits: fixed at 16 of them).
        header["payload_offset"] = 10**15
        header_len = len(json.dumps(header).encode())
        header["payload_offset"] = _aligned(len(MAGIC) + 8 + header_len)
        encoded = json.dumps(header).encode().ljust(header_len)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp",
                                       dir=self.path.parent)
        except OSError as exc:
            logger.warning("packed weights not cached in %s: %s", self.path, exc)
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", header_len) + encoded)
                for offset, data in blobs:
                    f.seek(header["payload_offset"] + offset)
                    f.write(memoryview(data.numpy()))
                f.truncate(header["payload_offset"] + at)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("packed weights not cached in %s: %s", self.path, exc)
            Path(tmp).unlink(missing_ok=True)
            return False
        self._remove_stale()
        return True

    def _remove_stale(self) -> None:
        """Deletes this slot's older files (another key) and files of models that are gone;
        temporary files over an hour old (a writer that died)."""
        prefix = self.path.name.split("-")[0] + "-"
        for other in self.path.parent.iterdir():
            try:
                if other.name.endswith(".tmp"):
                    if time.time() - other.stat().st_mtime > 3600:
                        other.unlink()
                elif other != self.path and other.suffix == ".bin" and (
                        other.name.startswith(prefix) or not _model_exists(other)):
                    other.unlink()
            except OSError:
                pass  # another process removed or replaced it meanwhile


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
            logger.warning("the packed-weight cache %s is not usable (%s): packing again",
                           self.path, exc)
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


def _model_exists(path: Path) -> bool:
    """Whether the model a cache file was written for (its key's model_dir or model_file) is
    still there; True where the file is unreadable (being written?): leave it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
            key = json.loads(f.read(header_len))["key"]
            model = key.get("model_dir") or key["model_file"]
    except (OSError, ValueError, KeyError, struct.error):
        return True
    return Path(model).exists()


def _packed_layers(model: nn.Module) -> list[tuple[str, PackedWeight]]:
    """The packing map_into gave the model, by cache entry name."""
    packed = [(name, layer.packed) for name, layer in _dense_layers(model) or []]
    return packed + ([(TIED_HEAD, model.tied_lm_head)] if model.lm_head is None else [])
