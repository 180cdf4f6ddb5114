"""Native CPU ops (C++/OpenMP): the PagedAttention kernel, fused layer ops, the small-batch
linear kernel and the sampler's reductions; `native_ops` picks them per call."""

from pagedllm.ops.cpu_extension import cpu_ops, cpu_ops_error
from pagedllm.ops.native import NATIVE_DTYPES, native_ops

__all__ = ["NATIVE_DTYPES", "cpu_ops", "cpu_ops_error", "native_ops"]
