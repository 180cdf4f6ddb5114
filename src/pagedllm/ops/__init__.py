"""Native CPU ops (C++/OpenMP): the PagedAttention kernel and the fused layer ops."""

from pagedllm.ops.cpu_extension import cpu_ops, cpu_ops_error

__all__ = ["cpu_ops", "cpu_ops_error"]
