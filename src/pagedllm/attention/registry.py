"""Attention backends by name, imported lazily.

A backend is named here as a "module:Class" string, so that one whose library (say,
flash-attn) is missing costs nothing until it is chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.attention.backend import AttentionBackend

# The fused C++ kernel; it falls back to the torch_paged reference per call where it does not
# apply (non-CPU tensors, fp16) or could not be built.
DEFAULT_ATTENTION_BACKEND = "cpu_paged"

# backend name -> "module:Class" of its AttentionBackend subclass
_ATTENTION_BACKENDS: dict[str, str] = {
    "torch_paged": "pagedllm.attention.torch_paged:TorchPagedAttention",
    "cpu_paged": "pagedllm.attention.cpu_paged:CpuPagedAttention",
}


def available_attention_backends() -> list[str]:
    """Names accepted by `get_attention_backend`, sorted."""
    return sorted(_ATTENTION_BACKENDS)


def get_attention_backend(name: str) -> type[AttentionBackend]:
    """Imports and returns the backend class registered under `name`.

    Raises:
        ValueError: if `name` is not registered; the message lists the known names.
    """
    from pagedllm.attention.backend import AttentionBackend

    target = _ATTENTION_BACKENDS.get(name)
    if target is None:
        raise ValueError(
            f"Unknown attention backend {name!r}. Known backends: "
            f"{', '.join(available_attention_backends())} (default: {DEFAULT_ATTENTION_BACKEND})."
        )
    module_name, _, class_name = target.partition(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(backend_cls, type) and issubclass(backend_cls, AttentionBackend), target
    assert backend_cls.name == name, (backend_cls.name, name)
    return backend_cls
