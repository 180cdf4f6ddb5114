"""The int8 linear method (quantization="int8"): a dense checkpoint's weights quantized at
load to symmetric int8 with a float scale per output channel and group of inputs (each scale
the one with the least squared error among max |group| / 127 and 15 clipped ones), then
multiplied with activations quantized per row, by activation bits (ACTIVATION_BITS_ENV):
- 8 (the default): groups of 16, weights packed at load into the W8A8 GEMM's panels
  (ops/csrc/int8_gemm.cpp), activations int8 with a scale per the same 16 inputs: VPDPBUSD,
  faster than bf16;
- 16: groups of 64, weights kept as rows for the quantized kernel (ops/csrc/quant_int8.cpp,
  quant_dot.cpp), activations in blocks of 32 as 16-bit integers (two int8 planes: twice the
  integer dot products, slower than bf16).
Before rounding, a Llama-family model is smoothed (int8_calibration.py, SMOOTHING_ENV): per
projection, power-of-two scales moved from the activations into the weights where they cut
the quantized output's error on a shipped calibration text (Paradise Lost, Book I; 512 tokens,
about 4 s of the load on the busy 2 cores, on one thread).

NOTE: a scale per whole output channel (vLLM's int8 layout) rounds SmolLM2's weights too
coarsely for 97% top-1 agreement: 95.6% against the fp32 model in an fp64 emulation with exact
activations (2,048 tokens of the shipped text), where groups of 64 inputs keep 97.4% (32:
97.6%) for 1/16 byte more per weight. In the engine against bf16 (benchmarks/quality.py, the
shipped text, 24,576 tokens; bf16 itself agrees with fp32 on 98.0%), top-1 agreement and
perplexity change:

    scheme                      unsmoothed         smoothed
    8-bit act., groups of 16    96.23%  +0.15%*    97.15%  +0.20%   (the default: meets 97%/2%)
    16-bit act., groups of 64   96.61%  +0.18%     97.15%  +0.06%
    8-bit act., groups of 32    95.58%  +0.36%     96.65%  +0.31%
    8-bit act., groups of 64    94.56%  +0.70%     96.12%  +0.27%*
    8-bit act., groups of 32, half the weights (by the calibration) in groups of 16:
                                                   96.87%  +0.28%

(* 12,288 tokens; there, 8-bit groups of 32 went 95.34% -> 96.49%, 96.51% with alphas
0.5/0.75/0.9, and 16-bit groups of 64 96.47% -> 96.99%; unsmoothed 16-bit groups of 32 96.73%,
8-bit groups of 16 96.23%. Smoothed 16-bit groups of 32, 24,576 tokens: 97.12%, +0.18%.) Smoothing gains 1.1-1.6 points with 8-bit activations and 0.5 with
16-bit (its weights-side effect, as AWQ's scales). With groups of 32, W8A8 stays short of 97%
whatever the calibration keeps more precise (12,288 tokens, smoothed, 96.49% with none kept;
SENSITIVE_ENV): 16-bit activations on 10% of the weights 96.47%, the dense weight on 15% 96.61%
and on 30% 96.95%; groups of 16 everywhere give 97.02% there (97.15% on 24,576), so the
default is W8A8 in groups of 16: its GEMM runs at ~0.82x the groups of 32 (SmolLM2's shapes,
one thread), still past bf16. Tried and dropped: the scale search weighted by each
input's mean square activation (fp32 emulation, 4,096 tokens: no gain over smoothing alone);
GPTQ's error-compensated rounding (int8_rounding.round_to_int8; -25% output error on a
synthetic layer) costs ~20 s per SmolLM2 layer in torch on these cores, too slow for a load.

The LM head stays dense; a tied one may go on int8 with its top logits rescored exactly
(int8_lm_head.py, PAGEDLLM_INT8_LM_HEAD).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.dense import UnquantizedLinearMethod
from pagedllm.layers.quantization.int8_lm_head import (
    lm_head_group_size,
    rescore_logits,
    untie_lm_head,
)
from pagedllm.ops import cpu_ops

logger = logging.getLogger(__name__)

# The activations' precision (PAGEDLLM_INT8_ACTIVATION_BITS overrides it): 8 packs the weights
# into the W8A8 GEMM's panels and quantizes activations to int8 with a scale per group of
# inputs (ops/csrc/int8_gemm.cpp): faster than bf16; 16 keeps the weights as rows for the
# quantized kernel's 16-bit activations (ops/csrc/quant_dot.cpp): slower than bf16 (see NOTE).
ACTIVATION_BITS_ENV = "PAGEDLLM_INT8_ACTIVATION_BITS"
DEFAULT_ACTIVATION_BITS = 8
# Inputs per weight scale (and per activation scale with 8 bits), by activation bits;
# PAGEDLLM_INT8_GROUP_SIZE overrides it (a multiple of 16 dividing each layer's inputs padded
# to 64; e.g. 32 with 8 bits: fewer scale steps per dot product, lower agreement).
GROUP_SIZES = {16: 64, 8: 16}
GROUP_SIZE_ENV = "PAGEDLLM_INT8_GROUP_SIZE"
# SmoothQuant's alphas searched per projection along with no smoothing
# (layers/quantization/int8_calibration.py), by activation bits (see NOTE; empty: none);
# PAGEDLLM_INT8_SMOOTHING overrides them (comma-separated numbers in [0, 1], or "off").
SMOOTHING_ALPHAS: dict[int, tuple[float, ...]] = {16: (0.5, 0.75), 8: (0.5, 0.75)}
SMOOTHING_ENV = "PAGEDLLM_INT8_SMOOTHING"
# "0": the first alpha on every projection, without the search (a hook for tests).
SMOOTHING_SEARCH_ENV = "PAGEDLLM_INT8_SMOOTHING_SEARCH"
# With 8-bit activations, the most sensitive projections may be kept more precise:
# PAGEDLLM_INT8_SENSITIVE = KIND=SHARE, KIND one of int8_calibration.SENSITIVE_KINDS (a16:
# 16-bit activations, w16: 16-bit weights, g16: groups of 16, dense: the model's dtype, which
# takes the model off the native decoder stack), SHARE in [0, 1] the weights (elements) kept
# so, chosen where that precision cuts the quantized output's relative error on the
# calibration text most per weight (int8_calibration.choose_sensitive). Empty or "off": none.
SENSITIVE = ""
SENSITIVE_ENV = "PAGEDLLM_INT8_SENSITIVE"


class Int8LinearMethod(LinearMethodBase):
    """Loads the dense weight as the dense method does, then keeps int8 weights and scales:
    rows for 16-bit activations, the W8A8 GEMM's panels for 8-bit ones."""

    def __init__(self, activation_bits: int = DEFAULT_ACTIVATION_BITS,
                 group_size: int | None = None, panels: bool | None = None,
                 weight_bits: int = 8, logits: bool = False) -> None:
        if activation_bits not in GROUP_SIZES:
            raise ValueError(f"int8 activation bits must be 8 or 16, got {activation_bits}")
        self.activation_bits = activation_bits
        self.group_size = GROUP_SIZES[activation_bits] if group_size is None else group_size
        # The W8A8 GEMM's panels (always with 8 bits; with 16, the projections a W8A8 model
        # keeps at 16 bits: the same GEMM on two activation planes) or rows (quant_dot.cpp).
        self.panels = activation_bits == 8 if panels is None else panels
        # 16: each weight as q1 * s1 + q2 * s2 (the residual rounded again; two planes of
        # the panels, ops/csrc/int8_gemm.h), for the projections a W8A8 model keeps precise.
        self.weight_bits = weight_bits
        # The LM head's: the output in fp32 whatever the activations' dtype.
        self.logits = logits

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        UnquantizedLinearMethod().create_weights(
            layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
            params_dtype, **extra_weight_attrs)
        layer.int8_weight = layer.int8_scales = layer.int8_bias = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        ops = cpu_ops()
        weight = layer.weight.detach()
        if ops is None:  # no kernels: the same rounding in torch, multiplied in float
            layer.int8_dequantized = int8_round_trip(weight.float(),
                                                     self.group_size).to(weight.dtype)
        else:
            if self.weight_bits == 16:
                layer.int8_weight, layer.int8_scales = panels_of_16_bit_weights(
                    weight, self.group_size)
            else:
                pack = ops.pack_int8_panels if self.panels else ops.pack_int8_weight
                layer.int8_weight, layer.int8_scales = pack(weight, self.group_size)
            if self.panels and self.activation_bits == 16:
                layer.int8_scales = panels_for_16_bits(layer.int8_scales)
        bias = layer.rank_bias()
        layer.int8_bias = None if bias is None else bias.detach().float().contiguous()
        layer.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.int8_weight is None:
            b = None if bias is None else bias.to(x.dtype)
            out = F.linear(x, layer.int8_dequantized.to(x.dtype), b)
            return out.float() if self.logits else out
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype not in (torch.float32, torch.bfloat16) or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        out = torch.empty(x2.shape[0], layer.int8_weight.shape[0],
                          dtype=torch.float32 if self.logits else x2.dtype)
        use_bias = bias is not None and layer.int8_bias is not None
        cpu_ops().int8_linear(out, x2, layer.int8_weight, layer.int8_scales,
                              layer.int8_bias if use_bias else torch.empty(0))
        if self.logits and getattr(layer, "exact_rows", None) is not None:
            rescore_logits(out, x2, layer.exact_rows)
        out = out.reshape(*shape[:-1], out.shape[1])
        return out if self.logits else out.to(x.dtype)


class Int8Config(QuantizationConfig):
    """Every linear layer but the LM head on int8 weights (a tied head too with
    PAGEDLLM_INT8_LM_HEAD: int8_lm_head.untie_lm_head), with activations of
    `activation_bits` (default: PAGEDLLM_INT8_ACTIVATION_BITS, else DEFAULT_ACTIVATION_BITS)
    and `group_size` inputs per scale (default: PAGEDLLM_INT8_GROUP_SIZE, else GROUP_SIZES')."""

    def __init__(self, activation_bits: int | None = None, group_size: int | None = None,
                 smoothing_alphas: tuple[float, ...] | None = None,
                 sensitive: str | None = None) -> None:
        if activation_bits is None:
            activation_bits = int(os.environ.get(ACTIVATION_BITS_ENV, DEFAULT_ACTIVATION_BITS))
        if activation_bits not in GROUP_SIZES:
            raise ValueError(f"{ACTIVATION_BITS_ENV} must be 8 or 16, got {activation_bits}")
        if group_size is None and os.environ.get(GROUP_SIZE_ENV):
            group_size = int(os.environ[GROUP_SIZE_ENV])
        self.activation_bits = activation_bits
        self.group_size = group_size
        if smoothing_alphas is None:
            smoothing_alphas = _smoothing_from_env(SMOOTHING_ALPHAS[activation_bits])
        self.smoothing_alphas = tuple(smoothing_alphas)
        if sensitive is None:
            sensitive = os.environ.get(SENSITIVE_ENV, SENSITIVE)
        self.sensitive_kind, self.sensitive_share = _sensitive(sensitive)
        if activation_bits != 8:
            self.sensitive_kind, self.sensitive_share = None, 0.0
        self.lm_head_group = lm_head_group_size()

    @property
    def smoothing_search(self) -> bool:
        """Whether each projection's smoothing is searched among the alphas and none (False:
        the first alpha everywhere)."""
        return os.environ.get(SMOOTHING_SEARCH_ENV, "1") != "0"

    def calibrate(self, model: nn.Module, model_dir: Path) -> None:
        """Before the layers are quantized (the loaded model in its dtype): gives a tied model
        its int8 LM head (untie_lm_head), then smooths the model's activations into its
        weights (int8_calibration.py) where alphas are set and the kernels are built."""
        if self.lm_head_group is not None:
            untie_lm_head(model, Int8LinearMethod(8, self.lm_head_group, logits=True))
        if not (self.smoothing_alphas or self.sensitive_share) or cpu_ops() is None:
            return
        from pagedllm.layers.quantization.int8_calibration import (
            SmoothingSearch,
            calibrate,
            choose_sensitive,
        )

        group_size = self.group_size or GROUP_SIZES[self.activation_bits]
        search = SmoothingSearch(self.smoothing_alphas, self.activation_bits, group_size,
                                 self.smoothing_search,
                                 sensitive=self.sensitive_kind if self.sensitive_share else None)
        if not calibrate(model, model_dir, search) or not self.sensitive_share:
            return
        kept = choose_sensitive(search.sensitivity, self.sensitive_share)
        kind = self.sensitive_kind
        for i in kept:
            layer = search.sensitivity[i][0]
            if kind == "dense":
                layer.linear_method = UnquantizedLinearMethod()
            elif kind == "g16":
                layer.linear_method = Int8LinearMethod(8, 16)
            elif kind == "w16":
                layer.linear_method = Int8LinearMethod(8, group_size, weight_bits=16)
            else:
                layer.linear_method = Int8LinearMethod(16, group_size, panels=True)
        logger.info("int8: %d of %d projections kept as %s (%.1f%% of the weights)",
                    len(kept), len(search.sensitivity), kind,
                    100 * sum(search.sensitivity[i][2] for i in kept)
                    / max(1, sum(n for _, _, n in search.sensitivity)))

    def get_name(self) -> str:
        return "int8"

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if prefix.endswith("lm_head"):  # untied: dense (a tied one: untie_lm_head)
            return None
        return Int8LinearMethod(self.activation_bits, self.group_size)


def panels_for_16_bits(scales: torch.Tensor) -> torch.Tensor:
    """pack_int8_panels' scales [panels, groups, 32] -> [panels, groups, 2, 32] (255 * ws, ws),
    with which the W8A8 GEMM takes 16-bit activations (ops/csrc/int8_gemm.h)."""
    return torch.stack((scales * 255, scales), dim=2).contiguous()


def panels_of_16_bit_weights(weight: torch.Tensor,
                             group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> the W8A8 GEMM's 16-bit weights (ops/csrc/int8_gemm.h): q1 and s1 as
    pack_int8_weight rounds the weight, q2 and s2 as it rounds what is left (the weight less
    q1 * s1); bytes [N, 2 Kp] (per group, q1's inputs then q2's) in panels, scales [panels,
    groups, 2, 32]."""
    from pagedllm.layers.quantization.int8_rounding import int8_panels

    ops = cpu_ops()
    n, k = weight.shape
    rows, s1 = ops.pack_int8_weight(weight, group_size)
    kp = rows.shape[1]
    groups = kp // group_size
    q1 = (rows.to(torch.int16) - 128).view(n, groups, group_size)
    padded = F.pad(weight.float(), (0, kp - k)).view(n, groups, group_size)
    residual = (padded - q1.float() * s1[:, :, None]).view(n, kp)
    rows2, s2 = ops.pack_int8_weight(residual, group_size)
    q2 = (rows2.to(torch.int16) - 128).view(n, groups, group_size)
    q = torch.stack((q1, q2), 2).reshape(n, 2 * kp).to(torch.int8)
    panels, scales = int8_panels(q, torch.stack((s1, s2), 2).reshape(n, 2 * groups))
    return panels, scales.view(scales.shape[0], groups, 2, -1).contiguous()


def _sensitive(value: str) -> tuple[str | None, float]:
    """SENSITIVE_ENV's KIND=SHARE -> (kind, share); (None, 0.0) where empty or off."""
    from pagedllm.layers.quantization.int8_calibration import SENSITIVE_KINDS

    value = value.strip().lower()
    if value in ("", "off", "none"):
        return None, 0.0
    kind, _, share = value.partition("=")
    try:
        fraction = float(share)
    except ValueError:
        fraction = -1.0
    if kind not in SENSITIVE_KINDS or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{SENSITIVE_ENV} must be KIND=SHARE with KIND one of "
                         f"{', '.join(SENSITIVE_KINDS)} and SHARE in [0, 1], or off; got "
                         f"{value!r}")
    return kind, fraction


def _smoothing_from_env(default: tuple[float, ...]) -> tuple[float, ...]:
    value = os.environ.get(SMOOTHING_ENV, "").strip().lower()
    if not value:
        return default
    if value in ("off", "none"):
        return ()
    try:
        alphas = tuple(float(v) for v in value.split(","))
    except ValueError:
        alphas = (-1.0,)
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"{SMOOTHING_ENV} must be comma-separated numbers in [0, 1] or off, "
                         f"got {value!r}")
    return alphas


def int8_round_trip(weight: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """weight [N, K] fp32 through pack_int8_weight's quantization and back: per row (group_size
    0) or group of group_size inputs (of the row zero-padded to a multiple of 64), the scale
    (max |group| / 127 times 1, 0.98, ..., 0.70) with the least squared error."""
    n, k = weight.shape
    if group_size:
        padded = F.pad(weight, (0, -k % 64)).reshape(-1, group_size)
        return int8_round_trip(padded).reshape(n, -1)[:, :k]
    amax = weight.abs().amax(1, keepdim=True)
    best, best_err = weight, None
    for c in range(16):
        scale = amax * (1.0 - 0.02 * c) / 127
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        q = torch.round(weight * inv).clamp(-127, 127) * scale
        err = (weight.double() - q.double()).pow(2).sum(1, keepdim=True)
        if best_err is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
    return best
