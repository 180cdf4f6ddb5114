"""Linear methods: how a linear layer stores its weight and multiplies by it (see base.py)."""

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    set_weight_attrs,
)
from pagedllm.layers.quantization.dense import UnquantizedLinearMethod

__all__ = ["LinearMethodBase", "QuantizationConfig", "UnquantizedLinearMethod",
           "set_weight_attrs"]
