"""A safetensors tensor that is read only when used, and then only the part that is used.

Under tensor parallelism each rank needs a shard of most tensors (rows of q/k/v and gate/up,
columns of o_proj and down_proj, a range of the vocabulary). The loader hands the layers'
`weight_loader`s a `CheckpointTensor` instead of the whole tensor: its `narrow`, `t`,
`split` and `[a:b]` only record which part is wanted, and the first torch operation on it
(`param.copy_(loaded)` in the layers) reads exactly that part from the file through
safetensors' `get_slice`, as vLLM's loaders do. Any other use (a tensor method this class does
not define, a torch function taking it) reads the recorded part and goes on with a plain
tensor, so loaders written for whole tensors keep working and read what they use. Python
operators (`*`, `+`) are not forwarded: call `materialize()` first.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointTensor:
    """A view (ranges per stored dimension, maybe transposed) of one tensor of an open
    safetensors file; `reads[name]` counts the elements read from it.

    Args:
        source: the file's `safe_open` handle (open while the view is used).
        name: the tensor's name in the file.
        reads: where materializations add the elements they read, by tensor name.
    """

    def __init__(self, source: Any, name: str, reads: Counter,
                 ranges: tuple[tuple[int, int], ...] | None = None,
                 transposed: bool = False) -> None:
        self._source, self._name, self._reads = source, name, reads
        self._slice = source.get_slice(name)
        if ranges is None:
            ranges = tuple((0, n) for n in self._slice.get_shape())
        self._ranges, self._transposed = ranges, transposed

    def _view(self, ranges: tuple[tuple[int, int], ...], transposed: bool) -> CheckpointTensor:
        view = object.__new__(CheckpointTensor)
        view._source, view._name, view._reads = self._source, self._name, self._reads
        view._slice, view._ranges, view._transposed = self._slice, ranges, transposed
        return view

    def _stored_dim(self, dim: int) -> int:
        ndim = len(self._ranges)
        if not -ndim <= dim < ndim:
            raise IndexError(f"dimension {dim} out of range for a {ndim}-d tensor")
        dim %= ndim
        return ndim - 1 - dim if self._transposed else dim

    # ---- what a tensor answers without reading -------------------------------------------

    @property
    def shape(self) -> torch.Size:
        sizes = [stop - start for start, stop in self._ranges]
        return torch.Size(reversed(sizes) if self._transposed else sizes)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self._ranges)

    @property
    def ndim(self) -> int:
        return len(self._ranges)

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._slice.get_dtype()]

    # ---- views: record the part, read nothing ----------------------------------------------

    def narrow(self, dim: int, start: int, length: int) -> CheckpointTensor:
        stored = self._stored_dim(dim)
        begin, stop = self._ranges[stored]
        if start < 0 or length < 0 or begin + start + length > stop:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside "
                             f"{tuple(self.shape)}")
        ranges = list(self._ranges)
        ranges[stored] = (begin + start, begin + start + length)
        return self._view(tuple(ranges), self._transposed)

    def t(self) -> CheckpointTensor:
        if self.ndim > 2:
            raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, got {self.ndim}")
        return self._view(self._ranges, not self._transposed and self.ndim == 2)

    def split(self, split_size: int | list[int], dim: int = 0) -> tuple[CheckpointTensor, ...]:
        total = self.shape[dim]
        if isinstance(split_size, int):
            sizes = [min(split_size, total - start) for start in range(0, total, split_size)]
        else:
            sizes = list(split_size)
            if sum(sizes) != total:
                raise RuntimeError(f"split sizes {sizes} do not add up to {total}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(self.narrow(dim, start, size) for start, size in zip(starts, sizes))

    def __getitem__(self, key: Any) -> CheckpointTensor | torch.Tensor:
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) > self.ndim or not all(isinstance(k, slice) and k.step in (None, 1)
                                            for k in keys):
            return self.materialize()[key]  # anything but plain ranges: read, then index
        view = self
        for dim, k in enumerate(keys):
            start, stop, _ = k.indices(self.shape[dim])
            view = view.narrow(dim, start, max(stop - start, 0))
        return view

    # ---- reading ---------------------------------------------------------------------------

    def materialize(self) -> torch.Tensor:
        """Reads the viewed part from the file (a new tensor that owns its memory)."""
        if self._ranges:
            tensor = self._slice[tuple(slice(start, stop) for start, stop in self._ranges)]
        else:
            tensor = self._source.get_tensor(self._name)
        self._reads[self._name] += tensor.numel()
        return tensor.t() if self._transposed else tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (copy, pickle): never read the file for these
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return (f"CheckpointTensor({self._name!r}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype})")


def _materialized(value: Any) -> Any:
    if isinstance(value, CheckpointTensor):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialized(v) for k, v in value.items()}
    return value
