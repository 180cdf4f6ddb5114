"""Weights packed once for the CPU kernels, run by the fastest path per call (`PackedWeight`).

The dense linear method (layers/quantization/dense.py) packs every layer's weight into one.

Batch invariance (the default): a row's output must not depend on the other rows of the step
(issue 29: the same request gives the same tokens alone or in any batch), so every row count
takes kernels that sum each output over the inputs in one order: pagedllm's own, never oneDNN
(whose kernels, and so summation orders, change with the row count). Per weight dtype:
- bf16 on CPUs with AMX: the AMX kernel (`ops/csrc/gemm_amx.cpp`, TDPBF16PS in 16-row tiles)
  on the weight packed once into tiles, for every batch; on a 2-core Sapphire Rapids, one
  thread, SmolLM2's projections: 1-64 rows 0.6-0.9x oneDNN's AMX GEMM's time, 256 rows 1.5x.
- bf16 on other CPUs with AVX512_BF16: the bf16 dot-product kernel (`ops/csrc/gemm_bf16.cpp`,
  VDPBF16PS) on the weight packed once in pairs of inputs, for every batch; it beat oneDNN's
  bf16 GEMM at every row count measured on a Zen 4 (1 to 2048 rows; 20% at 64).
- bf16 elsewhere, and fp32: the panel kernels (`ops/csrc/gemm.cpp`) on the weight packed into
  column panels in its own dtype, for every batch: sequential passes over the panels up to 8
  rows, a register-tiled GEMM above, both summing each output over k in order.

With `batch_invariant=False` the paths are chosen per call by the number of rows (tokens in the
step), the fastest each, measured in benchmarks/linear.py (docs/benchmarks.md). On CPUs with
AVX512_BF16 and no AMX, a bf16 weight takes the dot-product kernel for every batch; CPUs with
AMX keep oneDNN (whose AMX GEMM this kernel was not measured against). Elsewhere, three paths:
- up to `stream_max_rows`: pagedllm's weight-streaming kernel (`ops/csrc/gemv.cpp`) over the
  plain weight (bf16 weights on CPUs with a bf16 GEMM only).
- up to `panel_max_rows`: pagedllm's panel kernels (`ops/csrc/gemm.cpp`) on the weight packed
  into column panels in its own dtype: up to 8 rows sequential passes over the panels (a
  layer with so few rows is bound by reading its weight), a register-tiled GEMM above.
- above: oneDNN on a weight reordered into its blocked layout
  (`torch.ops.mkldnn._linear_pointwise`), the fastest for prefill-sized fp32 GEMMs.

On CPUs without a bf16 GEMM (no AVX512_BF16 / AMX), oneDNN takes only fp32 weights and torch's
bf16 matmul is 10-100x slower. There a bf16 weight is never widened and is held once: the
panel kernels take every batch, streaming half the bytes of an fp32 copy and rounding each
output once, which is what a bf16 GEMM (fp32 accumulation) computes up to summation order.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch

from pagedllm.layers.activation import silu_and_mul
from pagedllm.ops import NATIVE_DTYPES, cpu_ops

logger = logging.getLogger(__name__)

# Row-count switch points (benchmarks/linear.py on a 2-core AVX2 machine), for CPUs without
# the dot-product kernel: the streaming kernel up to FEW_ROWS rows for bf16 weights where
# oneDNN has a bf16 GEMM; panels for every bf16 batch otherwise (their few-rows passes read a
# bf16 weight 1.3-1.4x faster than the streaming kernel at 1-4 rows); fp32 weights take panels
# up to FP32_PANEL_MAX_ROWS (1.35x oneDNN at 64 rows, 0.9x at 256) and oneDNN above.
FEW_ROWS = 8
FP32_PANEL_MAX_ROWS = 128  # without batch invariance

# The paths a 2-D batch can take (numbered as `LinearPath` in ops/csrc/decoder_stack.cpp,
# which takes the same choice for whole decoder stacks).
PANELS, STREAMING, ONEDNN, DOT_PANELS, AMX_PANELS = 0, 1, 2, 3, 4


@functools.cache
def amx_kernel_applies(batch_invariant: bool = True) -> bool:
    """Whether bf16 weights take the AMX kernel: AMX CPUs, batch invariant (without it, oneDNN's
    AMX GEMM)."""
    ops = cpu_ops()
    return ops is not None and batch_invariant and ops.has_amx()


@functools.cache
def dot_kernel_applies(batch_invariant: bool = True) -> bool:
    """Whether bf16 weights take the dot-product kernel: AVX512_BF16, where the AMX kernel does
    not (and, without batch invariance, no AMX for oneDNN)."""
    ops = cpu_ops()
    if ops is None or not ops.has_bf16_dot() or amx_kernel_applies(batch_invariant):
        return False
    return batch_invariant or not torch.cpu._is_amx_tile_supported()


@functools.cache
def onednn_has_gemm(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack (and so multiply) weights of `dtype` on this CPU."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


class PackedWeight:
    """A [out, in] weight (and bias) packed for the CPU paths; call it like F.linear(x, w, b).

    With `swiglu` (SwiGLU's [gate | up] projection), the dot-product path packs the weight for
    `swiglu()`, which gates in the GEMM's epilogue; the weight then serves only that call.
    With `batch_invariant` (the default), every row count takes a kernel that sums each output
    in the same order (see the module docstring).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int,
                 swiglu: bool = False, batch_invariant: bool = True) -> None:
        weight = weight.detach()
        self.ops = cpu_ops() if weight.dtype in NATIVE_DTYPES else None
        self.out_features = weight.shape[0]
        self.plain: torch.Tensor | None = None  # for the streaming kernel
        self.panels: torch.Tensor | None = None  # for the panel kernel
        self.dot_panels: torch.Tensor | None = None  # for the bf16 dot-product kernel
        self.amx_panels: torch.Tensor | None = None  # for the AMX kernel
        self.stream_max_rows = 0
        self.panel_max_rows = 0
        self.fuses_swiglu = False  # dot_panels packed for dot_swiglu_linear
        # The kernels' fp32 bias (or empty).
        self.plain_bias = torch.empty(0) if bias is None else bias.detach().float().contiguous()
        native = onednn_has_gemm(weight.dtype)
        bf16 = weight.dtype == torch.bfloat16
        if self.ops is not None and bf16 and amx_kernel_applies(batch_invariant):
            self.amx_panels = self.ops.pack_amx_panels(weight)
        elif self.ops is not None and bf16 and dot_kernel_applies(batch_invariant):
            self.fuses_swiglu = swiglu and weight.shape[0] % 2 == 0
            pack = self.ops.pack_dot_swiglu_panels if self.fuses_swiglu else self.ops.pack_dot_panels
            self.dot_panels = pack(weight)
        elif self.ops is not None and bf16 and (batch_invariant or not native):
            self.panels = self.ops.pack_panels(weight)
            self.panel_max_rows = math.inf
        elif self.ops is not None and weight.dtype == torch.float32:
            self.panels = self.ops.pack_panels(weight)
            self.panel_max_rows = math.inf if batch_invariant else FP32_PANEL_MAX_ROWS
        elif self.ops is not None:
            self.plain = weight.contiguous()
            self.stream_max_rows = FEW_ROWS
        self.onednn_weight: torch.Tensor | None = None
        self.compute_dtype = weight.dtype
        self.bias = None
        if self.panel_max_rows < math.inf and self.dot_panels is None and self.amx_panels is None:
            if not native:  # fp16 without an fp16 GEMM, or no kernels: compute in fp32
                self.compute_dtype = torch.float32
            self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(
                weight.to(self.compute_dtype), batch_hint
            )
            self.bias = None if bias is None else bias.detach().to(self.compute_dtype)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [num_tokens, in] -> [num_tokens, out], in out_dtype (default: x's dtype).

        NOTE: the panel, dot-product and AMX kernels write fp32 from bf16 inputs directly, which
        saves the LM head's logits a full-size conversion per step; the other paths convert
        after.
        """
        if x.dim() == 2 and x.dtype in NATIVE_DTYPES:
            path = self.path(x.shape[0])
            if path == STREAMING:
                return _as_dtype(self.few_rows(x), out_dtype)
            if path == PANELS:
                return self.panel(x, out_dtype)
            if path == DOT_PANELS:
                return self.dot(x, out_dtype)
            if path == AMX_PANELS:
                return self.amx(x, out_dtype)
        if self.onednn_weight is None:  # native kernels only: any shape or dtype, as 2-D rows
            rows = self._native_rows(x)
            want = out_dtype or x.dtype
            kernel = (self.amx if self.amx_panels is not None
                      else self.dot if self.dot_panels is not None else self.panel)
            out = kernel(rows, want if want in NATIVE_DTYPES else None)
            return _as_dtype(out, want).reshape(*x.shape[:-1], -1)
        return _as_dtype(self.onednn(x), out_dtype)

    def _native_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as 2-D rows in a dtype the native kernels take."""
        rows = x.reshape(-1, x.shape[-1])
        return rows if rows.dtype in NATIVE_DTYPES else rows.to(self.compute_dtype)

    def _refuse_if_swiglu(self) -> None:
        if self.fuses_swiglu:  # its panels hold gate and up units interleaved
            raise RuntimeError("this [gate | up] weight is packed for its gated output: "
                               "call swiglu(x), not the plain projection")

    def path(self, rows: int) -> int:
        """The path of a 2-D fp32/bf16 batch of `rows` rows: the row-count switch points."""
        if self.amx_panels is not None:
            return AMX_PANELS
        if self.dot_panels is not None:
            return DOT_PANELS
        if self.plain is not None and rows <= self.stream_max_rows:  # (an empty batch too)
            return STREAMING
        if rows <= self.panel_max_rows:
            return PANELS
        return ONEDNN

    def after_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """This layer over silu(gate) * up of gate_up = [gate | up] (SwiGLU's down projection).

        The panel kernels gate each row while packing it, so the gated activations are never
        written out; the other paths run the separate op first.
        """
        self._refuse_if_swiglu()
        rows = gate_up.shape[0]
        path = self.path(rows)
        if (gate_up.dim() == 2 and gate_up.dtype in NATIVE_DTYPES and gate_up.stride(-1) == 1
                and path in (PANELS, DOT_PANELS, AMX_PANELS)):
            out = gate_up.new_empty(rows, self.out_features)
            if path == AMX_PANELS:  # gated by the separate op, inside the call
                self.ops.amx_panel_linear(out, gate_up, self.amx_panels, self.plain_bias, True)
            elif path == DOT_PANELS:
                self.ops.dot_panel_linear(out, gate_up, self.dot_panels, self.plain_bias, True)
            else:
                self.ops.panel_linear(out, gate_up, self.panels, self.plain_bias, True)
            return out
        return self(silu_and_mul(gate_up))

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] projection of x: [..., in] -> [..., out / 2].

        Packed for it (`fuses_swiglu`), the GEMM gates each register tile as it stores it, so
        the gate_up activations are never written out and no separate pass reads them back; the
        results are those of the projection followed by the silu_and_mul op, bit for bit.
        (Measured: ~1 ms of a 64-sequence decode step on SmolLM2, where the separate op took
        38 us a layer.)
        """
        if not self.fuses_swiglu:
            return silu_and_mul(self(x))
        rows = self._native_rows(x)
        out = rows.new_empty(rows.shape[0], self.out_features // 2)
        self.ops.dot_swiglu_linear(out, rows, self.dot_panels, self.plain_bias)
        return _as_dtype(out, x.dtype).reshape(*x.shape[:-1], self.out_features // 2)

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-streaming kernel over the plain weight."""
        out = x.new_empty(x.shape[0], self.out_features)
        self.ops.linear_few_rows(out, x, self.plain, self.plain_bias)
        return out

    def panel(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The panel GEMM over the panel-packed weight."""
        out = x.new_empty(x.shape[0], self.out_features, dtype=out_dtype or x.dtype)
        self.ops.panel_linear(out, x, self.panels, self.plain_bias)
        return out

    def dot(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The bf16 dot-product kernel over the pair-packed weight (x rounded to bf16)."""
        self._refuse_if_swiglu()
        out = x.new_empty(x.shape[0], self.out_features, dtype=out_dtype or x.dtype)
        self.ops.dot_panel_linear(out, x, self.dot_panels, self.plain_bias)
        return out

    def amx(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The AMX kernel over the tile-packed weight (x rounded to bf16)."""
        out = x.new_empty(x.shape[0], self.out_features, dtype=out_dtype or x.dtype)
        self.ops.amx_panel_linear(out, x, self.amx_panels, self.plain_bias)
        return out

    def move_to(self, allocate: Callable[[Sequence[int], torch.dtype], torch.Tensor]) -> None:
        """Copies the tensors the native kernels stream (panels, plain weight) into tensors
        from allocate(shape, dtype), e.g. the worker's huge-page arena, dropping the old ones.
        oneDNN's reordered weight stays where oneDNN put it."""
        for name in ("panels", "dot_panels", "amx_panels", "plain"):
            tensor = getattr(self, name)
            if tensor is not None:
                target = allocate(tensor.shape, tensor.dtype)
                target.copy_(tensor)
                setattr(self, name, target)

    # ---- the packed-weight cache (layers/packed_cache.py) ----------------------------------

    _CACHED_TENSORS = ("panels", "dot_panels", "amx_panels", "plain", "plain_bias")

    def cache_state(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(settings, tensors) that rebuild this weight without packing it again
        (`from_cache_state`), or None where part of it is oneDNN's opaque layout."""
        if self.onednn_weight is not None:
            return None
        meta = {"out_features": self.out_features, "stream_max_rows": self.stream_max_rows,
                "panel_max_rows": None if self.panel_max_rows == math.inf
                else self.panel_max_rows,
                "fuses_swiglu": self.fuses_swiglu, "native": self.ops is not None,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}
        tensors = {name: getattr(self, name) for name in self._CACHED_TENSORS
                   if getattr(self, name) is not None}
        return meta, tensors

    @classmethod
    def from_cache_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        """The PackedWeight that cache_state() described, on `tensors` as they are."""
        self = cls.__new__(cls)
        self.ops = cpu_ops() if meta["native"] else None
        if meta["native"] and self.ops is None:
            raise RuntimeError("the native ops are unavailable")
        self.out_features = meta["out_features"]
        for name in cls._CACHED_TENSORS:
            setattr(self, name, tensors.get(name))
        self.stream_max_rows = meta["stream_max_rows"]
        panel_max_rows = meta["panel_max_rows"]
        self.panel_max_rows = math.inf if panel_max_rows is None else panel_max_rows
        self.fuses_swiglu = meta["fuses_swiglu"]
        self.compute_dtype = getattr(torch, meta["compute_dtype"])
        self.onednn_weight = None
        self.bias = None
        return self

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN over the reordered weight."""
        inputs = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        out = torch.ops.mkldnn._linear_pointwise(inputs, self.onednn_weight, self.bias, "none",
                                                 [], "")
        return out if out.dtype == x.dtype else out.to(x.dtype)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def try_pack(weight: torch.Tensor, bias: torch.Tensor | None = None,
             batch_hint: int = 64, swiglu: bool = False,
             batch_invariant: bool = True) -> PackedWeight | None:
    """A PackedWeight for a CPU weight, or None where it cannot be packed (other device, dtype
    or platform): callers then keep F.linear."""
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        return PackedWeight(weight.detach(), bias, batch_hint, swiglu, batch_invariant)
    except RuntimeError as exc:
        logger.info("keeping F.linear: oneDNN cannot pack a %s weight (%s)", weight.dtype, exc)
        return None
