"""Calibration for quantization="int8": per-input-channel smoothing (SmoothQuant), searched
per projection (as AWQ searches its scales), of a Llama-family model at load, measured on a
shipped calibration text (benchmarks/data/paradise_lost_book1.txt; never the text the
quality benchmark scores) before the int8 method rounds the weights.

W8A8 (8-bit activations, ops/csrc/int8_gemm.cpp) quantizes each row's activations with one
scale per group of inputs (max |group| / 127), so a few large channels coarsen the steps of
every channel in their group. Smoothing divides input channel j by s_j and multiplies the
weight's column j by s_j (the product is unchanged), with

    s_j = max |X_j| ^ alpha / max_n |W_nj| ^ (1 - alpha), rounded to a power of two,

over the calibration activations X. For each projection (q/k/v, o, gate/up, down of each
layer) the search keeps the alpha (or none) whose quantized output is nearest the dense one
on the calibration tokens, and none unless it cuts that error by a quarter. Each division is
folded into what makes the input, so no op is added and the model computes the same function:

    q/k/v columns      input_layernorm's weight / s
    gate/up columns    post_attention_layernorm's weight / s
    o columns          v's rows / s (each KV head's dims, shared by the query heads it serves)
    down columns       up's rows / s (silu(gate) * up / s)

Powers of two make every fold exact in any float dtype (bf16 included): a smoothed model
without quantization gives the original's bits, and int8's rounding of a row scaled by a power
of two is the row's own, scaled. Under tensor parallelism each rank smooths its own shard
consistently: the column-parallel layers (q/k/v, gate/up) take the scale all ranks agree on
(rank 0's, from the whole input's statistics and the column maxima over all ranks' rows), the
row-parallel ones (o, down) their own input channels, which the rows they fold into (v, up)
hold on the same rank; every rank makes the same choice (errors summed over the ranks).

Only models built as models/llama.py's (plain RMSNorm, SwiGLU MLP, fused q/k/v and gate/up)
are smoothed; others are quantized as they load. int8 rounding in torch (GPTQ included) and
the kernels' layouts: int8_rounding.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import (
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

logger = logging.getLogger(__name__)

# The calibration text (public domain; see benchmarks/data/README.md).
CALIBRATION_TEXT = (Path(__file__).resolve().parents[2] / "benchmarks" / "data"
                    / "paradise_lost_book1.txt")
# What a W8A8 model's most sensitive projections may keep instead (int8.py: SENSITIVE_ENV):
# 16-bit activations, 16-bit weights (two int8 planes), groups of 16, the dense weight.
SENSITIVE_KINDS = ("a16", "w16", "g16", "dense")
# Tokens of it run through the model, in windows of CALIBRATION_WINDOW (each from no context).
CALIBRATION_TOKENS = 512
CALIBRATION_WINDOW = 512


def smoothable(model: nn.Module) -> bool:
    """Whether `model` is built as models/llama.py's (plain RMSNorm before fused q/k/v and
    gate/up, o and down row-parallel, SwiGLU), which the smoothing folds into."""
    from pagedllm.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (type(layer.input_layernorm) is RMSNorm
                and type(layer.post_attention_layernorm) is RMSNorm
                and isinstance(attn.qkv_proj, QKVParallelLinear)
                and isinstance(attn.o_proj, RowParallelLinear)
                and isinstance(mlp.gate_up_proj, MergedColumnParallelLinear)
                and isinstance(mlp.down_proj, RowParallelLinear)
                and getattr(mlp.gate_up_proj, "gates_swiglu", False)):
            return False
    return True


def calibration_windows(model_dir: Path, vocab_size: int,
                        num_tokens: int = CALIBRATION_TOKENS,
                        window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    """The calibration text's first `num_tokens` tokens by the model's tokenizer.json (its
    UTF-8 bytes where it has none), ids past the vocabulary wrapped, in windows."""
    text = CALIBRATION_TEXT.read_text()
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tokenizer_file)).encode(
            text[: num_tokens * 16], add_special_tokens=False).ids
    else:
        ids = list(text.encode())
    ids = [i % vocab_size for i in ids[:num_tokens]]
    return [ids[i:i + window] for i in range(0, len(ids), window)]


def _causal_mask(length: int, sliding_window: int | None) -> torch.Tensor:
    """[length, length] True where query i attends to key j: j <= i, within the window."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    mask = j <= i
    return mask if sliding_window is None else mask & (i - j < sliding_window)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's dense weight (loaded, not yet quantized) on x, this rank's bias, and the
    row-parallel all-reduce."""
    bias = layer.rank_bias()
    out = F.linear(x, layer.weight, None if bias is None else bias.to(x.dtype))
    if layer.splits_input and layer.tp_size > 1:
        out = tensor_model_parallel_all_reduce(out.contiguous())
    return out


def _power_of_two(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(s)))


def smoothing_scale(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float,
                    shared: bool) -> torch.Tensor:
    """s [K] = max|X|^alpha / max|W|^(1 - alpha) per input column of weight [N, K], a power of
    two (1 where either max is 0). `shared`: a column-parallel weight, whose columns' maxima
    span every rank's rows, and whose scale every rank takes from rank 0."""
    w_amax = weight.detach().float().abs().amax(0)
    tp_size = get_tp_group().world_size
    if shared and tp_size > 1:
        w_amax = tensor_model_parallel_all_gather(w_amax[None].contiguous(), 0).amax(0)
    x_amax = act_amax.float()
    live = (x_amax > 0) & (w_amax > 0)
    s = torch.where(live, x_amax.clamp(min=1e-30).pow(alpha)
                    / w_amax.clamp(min=1e-30).pow(1 - alpha), torch.ones_like(x_amax))
    s = _power_of_two(s)
    if shared and tp_size > 1:
        s = tensor_model_parallel_all_gather(s[None].contiguous(), 0)[0]
    return s


class SmoothingSearch:
    """Chooses each projection's smoothing among `alphas` and none: the one whose quantized
    output (the int8 kernel itself, on the calibration rows) is nearest the dense output in
    squared error, summed over the ranks' outputs (row-parallel: the error of the all-reduced
    output), so every rank makes the same choice; none unless a scale cuts that error by at
    least `min_gain`. `search` False: always alphas[0]."""

    def __init__(self, alphas: tuple[float, ...], activation_bits: int, group_size: int,
                 search: bool = True, max_rows: int = 256, max_outputs: int = 256,
                 min_gain: float = 0.25, sensitive: str | None = None) -> None:
        self.alphas, self.activation_bits, self.group_size = alphas, activation_bits, group_size
        self.search, self.min_gain = search, min_gain
        self.max_rows, self.max_outputs = max_rows, max_outputs
        if sensitive not in (None, *SENSITIVE_KINDS):
            raise ValueError(f"sensitive must be one of {', '.join(SENSITIVE_KINDS)}, got "
                             f"{sensitive!r}")
        self.sensitive = sensitive
        self.chosen: list[float | None] = []
        # Per projection, in call order, with `sensitive`: (the layer, what that precision
        # (SENSITIVE_KINDS) would cut its quantized output's squared error by, relative to
        # the output's energy, all ranks summed; its weight's elements on this rank).
        self.sensitivity: list[tuple[nn.Module | None, float, int]] = []

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, shared: bool,
                 kv_group: tuple[int, int, int] | None = None,
                 layer: nn.Module | None = None) -> torch.Tensor | None:
        """x [T, K]: the projection's calibration inputs; weight [N, K] (this rank's). Returns
        the chosen scale [K] (for o, `kv_group` = (kv_heads, query heads per KV head, head
        size): one scale per KV head's dims, expanded), or None (no smoothing). With
        `sensitive`, records `layer`'s gain from that precision (self.sensitivity)."""
        amax = x.float().abs().amax(0)
        scales = [self._scale(amax, weight, alpha, shared, kv_group) for alpha in self.alphas]
        numel = weight.numel()
        # The error on a sample: every few tokens, every few output rows (the same rows on
        # every rank of a row-parallel layer; column-parallel ranks each sample their own).
        rows = x[:: max(1, -(-x.shape[0] // self.max_rows))]
        weight = weight[:: max(1, -(-weight.shape[0] // self.max_outputs))]
        reference = F.linear(rows.float(), weight.float())
        if not self.search or not scales:
            best_scale = scales[0] if scales else None
            self.chosen.append(self.alphas[0] if scales else None)
            error = (self._error(rows, weight, best_scale, reference, shared)
                     if self.sensitive else None)
        else:
            options = [None, *scales]
            errors = torch.stack([self._error(rows, weight, s, reference, shared)
                                  for s in options])
            best = int(torch.argmin(errors))
            logger.debug("int8 smoothing: errors %s", (errors / errors[0]).tolist())
            if errors[best] > (1 - self.min_gain) * errors[0]:
                best = 0  # NOTE: a smaller gain on the calibration text is within its noise
            self.chosen.append(None if best == 0 else self.alphas[best - 1])
            best_scale, error = options[best], errors[best]
        if self.sensitive:
            if self.sensitive == "a16":
                precise = self._error(rows, weight, best_scale, reference, shared, bits=16)
            elif self.sensitive == "g16":
                precise = self._error(rows, weight, best_scale, reference, shared, group=16)
            else:  # w16, dense: the weights' rounding error (nearly) gone
                precise = 0.0
            energy = self._energy(reference, shared)
            gain = float((error - precise) / energy) if energy > 0 else 0.0
            self.sensitivity.append((layer, gain, numel))
        return best_scale

    @staticmethod
    def _scale(amax: torch.Tensor, weight: torch.Tensor, alpha: float, shared: bool,
               kv_group: tuple[int, int, int] | None) -> torch.Tensor:
        s = smoothing_scale(amax, weight, alpha, shared)
        if kv_group is None:
            return s
        kv_heads, group, head = kv_group
        s_kv = s.view(kv_heads, group, head).amax(1)
        return s_kv[:, None, :].expand(kv_heads, group, head).reshape(-1).contiguous()

    @staticmethod
    def _energy(reference: torch.Tensor, shared: bool) -> torch.Tensor:
        """The sampled dense outputs' squared sum (row-parallel: of their all-reduced sum),
        the same on every rank."""
        if get_tp_group().world_size == 1:
            return reference.double().pow(2).sum()
        if not shared:
            return tensor_model_parallel_all_reduce(
                reference.contiguous()).double().pow(2).sum()
        return tensor_model_parallel_all_reduce(
            reference.double().pow(2).sum().float().reshape(1)).double()[0]

    def _error(self, rows: torch.Tensor, weight: torch.Tensor, s: torch.Tensor | None,
               reference: torch.Tensor, shared: bool, bits: int | None = None,
               group: int | None = None) -> torch.Tensor:
        """The squared error of the sampled outputs, quantized as the kernels quantize (the
        weight per group with max |group| / 127, without pack_int8_weight's clipping search;
        8-bit activations per row and group likewise; `bits` 16: the activations exact),
        multiplied in fp32."""
        if s is not None:
            rows = rows / s.to(rows.dtype)
            weight = weight * s.to(weight.dtype)
        x = rows.float()
        group = group or self.group_size
        if (self.activation_bits if bits is None else bits) == 8:
            x = _fake_quantize(x, group)
        out = F.linear(x, _fake_quantize(weight.float(), group))
        diff = out - reference
        if get_tp_group().world_size == 1:
            return diff.double().pow(2).sum()
        if not shared:  # partial sums: the error of their all-reduced sum
            return tensor_model_parallel_all_reduce(diff.contiguous()).double().pow(2).sum()
        return tensor_model_parallel_all_reduce(
            diff.double().pow(2).sum().float().reshape(1)).double()[0]


def _fake_quantize(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """t [R, K] fp32 through symmetric int8 per row and group of group_size inputs (the row
    zero-padded to a multiple of 64), scale max |group| / 127, and back."""
    k = t.shape[1]
    groups = F.pad(t, (0, -k % 64)).view(t.shape[0], -1, group_size)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.round(groups * inv).clamp(-127, 127) * scale
    return q.view(t.shape[0], -1)[:, :k]


@torch.no_grad()
def smooth(model: nn.Module, windows: list[list[int]], choose: SmoothingSearch) -> None:
    """Runs the calibration windows through the dense model layer by layer (this rank's
    shards, in torch, causal attention within each window) and folds each projection's
    chosen scale (see the module docstring) before the next layer reads its output."""
    embed = model.get_input_embeddings()
    hidden = [embed(torch.tensor(w, dtype=torch.long)) for w in windows]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o = attn.qkv_proj, attn.o_proj
        gate_up, down = mlp.gate_up_proj, mlp.down_proj

        xs = [layer.input_layernorm(h.clone()) for h in hidden]
        outs = [_attention(attn, x) for x in xs]
        s = choose(torch.cat(xs), qkv.weight, shared=True, layer=qkv)
        if s is not None:
            _divide(layer.input_layernorm.weight, s)
            qkv.weight.mul_(s.to(qkv.weight.dtype))
        hidden = [h + _linear(o, out) for h, out in zip(hidden, outs)]
        # o's input: this rank's query heads; one scale per KV head's dims (the largest over
        # the query heads it serves), divided out of v's rows.
        kv_heads = attn.num_kv_heads
        group = attn.num_heads // kv_heads
        s = choose(torch.cat(outs), o.weight, shared=False,
                   kv_group=(kv_heads, group, attn.head_size), layer=o)
        if s is not None:
            o.weight.mul_(s.to(o.weight.dtype))
            s_kv = s.view(kv_heads, group, attn.head_size)[:, 0, :].reshape(-1)
            v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
            _divide(qkv.weight[v_rows], s_kv[:, None])
            if qkv.bias is not None:
                _divide(qkv.bias[v_rows], s_kv)

        xs = [layer.post_attention_layernorm(h.clone()) for h in hidden]
        acts = []
        for x in xs:
            gate, up = _linear(gate_up, x).chunk(2, dim=-1)
            acts.append(F.silu(gate) * up)
        hidden = [h + _linear(down, act) for h, act in zip(hidden, acts)]
        s = choose(torch.cat(xs), gate_up.weight, shared=True, layer=gate_up)
        if s is not None:
            _divide(layer.post_attention_layernorm.weight, s)
            gate_up.weight.mul_(s.to(gate_up.weight.dtype))
        # down's input: silu(gate) * up, divided through up's rows (this rank's units).
        s = choose(torch.cat(acts), down.weight, shared=False, layer=down)
        if s is not None:
            down.weight.mul_(s.to(down.weight.dtype))
            units = down.in_features
            _divide(gate_up.weight[units:], s[:, None])
            if gate_up.bias is not None:
                _divide(gate_up.bias[units:], s)


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention block's o input for one window's normed hidden states x [T, hidden]."""
    length = x.shape[0]
    q, k, v = _linear(attn.qkv_proj, x).split([attn.q_size, attn.kv_size, attn.kv_size], -1)
    q, k, v = attn.split_heads(q.contiguous(), k.contiguous(), v.contiguous())
    q, k = attn.rotary(torch.arange(length), q.contiguous(), k.contiguous())
    group = attn.num_heads // attn.num_kv_heads
    window = attn.backend.sliding_window
    window = window if window is not None and window < length else None
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float().repeat_interleave(group, 0),
        v.transpose(0, 1).float().repeat_interleave(group, 0),
        attn_mask=None if window is None else _causal_mask(length, window),
        is_causal=window is None, scale=attn.backend.scale)
    return out.transpose(0, 1).reshape(length, -1).to(x.dtype)


def _divide(t: torch.Tensor, s: torch.Tensor) -> None:
    t.div_(s.to(t.dtype))


def choose_sensitive(sensitivity: list[tuple[nn.Module | None, float, int]],
                     share: float) -> list[int]:
    """The indices of the projections (SmoothingSearch.sensitivity) to keep more precise: by
    gain per weight element, largest first (ties: the earlier one), each taken while the kept
    weights stay within `share` of all; those with no gain never. The same on every rank (the
    gains are summed over the ranks, the shards equal)."""
    total = sum(numel for _, _, numel in sensitivity)
    order = sorted(range(len(sensitivity)),
                   key=lambda i: (-sensitivity[i][1] / max(sensitivity[i][2], 1), i))
    kept, budget = [], share * total
    for i in order:
        _, gain, numel = sensitivity[i]
        if gain <= 0:
            break
        if numel <= budget:
            kept.append(i)
            budget -= numel
    return sorted(kept)


def calibrate(model: nn.Module, model_dir: Path, choose: SmoothingSearch) -> bool:
    """Smooths a loaded (not yet quantized) model for int8; False where the model is not
    smoothable (it is left as it is)."""
    if not smoothable(model):
        logger.info("int8: %s is not smoothed (not built as models/llama.py's)",
                    type(model).__name__)
        return False
    start = time.perf_counter()
    # Windows no longer than the model's positions (its rotary table: max_model_len), the
    # same tokens in all.
    window = min(CALIBRATION_WINDOW, model.layers[0].self_attn.rotary.max_position)
    windows = calibration_windows(model_dir, model.get_input_embeddings().num_embeddings,
                                  window=window)
    # NOTE: on one thread: the ops are small (512 tokens), and on a busy machine each
    # parallel region waits for a descheduled second thread (SmolLM2 with load ~7 on 2
    # cores: 38 s on two threads, 3.9 s on one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        smooth(model, windows, choose)
    finally:
        torch.set_num_threads(threads)
    kept = sum(alpha is not None for alpha in choose.chosen)
    logger.info("int8: smoothing on %d calibration tokens in %.2f s: %d of %d projections "
                "smoothed (alphas %s)", sum(map(len, windows)), time.perf_counter() - start,
                kept, len(choose.chosen), choose.alphas)
    return True
