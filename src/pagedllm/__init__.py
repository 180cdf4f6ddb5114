"""pagedllm: high-throughput LLM serving with a paged KV cache.

Names are imported lazily, so `pagedllm.core` (pure Python) loads without torch. A name's
first import (torch and the engine, for LLM) runs with garbage collection paused and freezes
what it left (pagedllm/gc_freeze.py: `importing`).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedllm.entrypoints.llm",
    "LLMEngine": "pagedllm.engine.llm_engine",
    "EngineStats": "pagedllm.engine.llm_engine",
    "EngineConfig": "pagedllm.config",
    "SamplingParams": "pagedllm.sampling_params",
    "StructuredOutputsParams": "pagedllm.sampling_params",
    "BeamSearchParams": "pagedllm.core.beam_search",
    "RequestOutput": "pagedllm.outputs",
    "CompletionOutput": "pagedllm.outputs",
    "Logprob": "pagedllm.outputs",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig
    from pagedllm.core.beam_search import BeamSearchParams
    from pagedllm.engine.llm_engine import EngineStats, LLMEngine
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
    from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        if module not in sys.modules:
            from pagedllm import gc_freeze

            with gc_freeze.importing():
                importlib.import_module(module)
        return getattr(sys.modules[module], name)
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
