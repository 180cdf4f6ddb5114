"""Phi-3 (`Phi3ForCausalLM`): Llama whose checkpoint stores q/k/v and gate/up fused.

`qkv_proj` ([q | k | v] rows) and `gate_up_proj` ([gate | up] rows) are split into the
shards Llama's loading places (q_proj, k_proj, ...), so the checked loading, and any layer
that places its own shard (tensor parallelism, quantization), see the usual names.

RoPE: default, or LongRoPE (Phi-3 128k): transformers rotates a whole sequence with the short
factors while it fits `original_max_position_embeddings` and, once it grows past that,
recomputes its whole cache with the long ones (Phi3ForCausalLM.prepare_inputs_for_generation).
A paged cache keeps the keys it rotated, so here each position takes the short factors below
the original length and the long ones from it (vLLM switches a whole batch instead, which
would tie a request's result to its batch). Sequences within the original length match
transformers exactly; longer ones differ from it in the positions before the switch.
Being one table indexed by position, LongRoPE runs on the native decoder stack as default RoPE
does (it reads the table the module path reads).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.attention import AttentionBackend
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.models.mistral import MistralForCausalLM


def _rope_parameters(config: PretrainedConfig) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


class Phi3ForCausalLM(MistralForCausalLM):
    """Phi-3 / Phi-3.5 (mini, medium); fused checkpoint projections split on load."""

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, max_position: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        params = _rope_parameters(config)
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor",
                                                               1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported for "
                             f"Phi3ForCausalLM (only 1.0: RoPE over the whole head)")
        longrope = params.get("rope_type") == "longrope"
        # The shared rotary table refuses LongRoPE by name: it is built as default RoPE and
        # init_buffers() fills it with LongRoPE's.
        super().__init__(_with_default_rope(config) if longrope else config, backend,
                         max_position, quant_config)
        self.config = config
        self.longrope = longrope

    def init_buffers(self) -> None:
        if not self.longrope:
            super().init_buffers()
            return
        self.rotary.cos_cache.copy_(self._longrope_table(torch.cos))
        self.rotary.sin_cache.copy_(self._longrope_table(torch.sin))

    def _longrope_table(self, fn) -> torch.Tensor:
        """cos or sin of LongRoPE's angles: short factors below the original length, long from
        it, times the attention factor."""
        config = self.config
        rotary = self.rotary
        original = _rope_parameters(config).get(
            "original_max_position_embeddings", getattr(config, "original_max_position_embeddings",
                                                         None))
        init = ROPE_INIT_FUNCTIONS["longrope"]
        cpu = torch.device("cpu")
        short_freq, scaling = init(config, cpu)
        long_freq, _ = init(config, cpu, seq_len=original + 1)
        positions = torch.arange(rotary.max_position, dtype=torch.float32)
        inv_freq = torch.where((positions < original)[:, None], short_freq[None, :],
                               long_freq[None, :])
        freqs = positions[:, None] * inv_freq  # [max_position, head_size // 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (fn(emb) * scaling).to(rotary.cos_cache.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """qkv_proj -> q_proj, k_proj, v_proj; gate_up_proj -> gate_proj, up_proj (rows)."""
        config = self.config
        head_size = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        q_size = config.num_attention_heads * head_size  # whole tensors: every rank's heads
        kv_size = (getattr(config, "num_key_value_heads", None)
                   or config.num_attention_heads) * head_size
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            head, _, last = module.rpartition(".")
            if last == "qkv_proj":
                sizes = [q_size, kv_size, kv_size]
                parts = ("q_proj", "k_proj", "v_proj")
            elif last == "gate_up_proj":
                half = tensor.shape[0] // 2
                sizes = [half, tensor.shape[0] - half]
                parts = ("gate_proj", "up_proj")
            else:
                yield name, tensor
                continue
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"but the config makes its rows {sum(sizes)} "
                                 f"({' + '.join(map(str, sizes))}): does the config match the "
                                 f"weights?")
            for part, shard in zip(parts, tensor.split(sizes, dim=0)):
                yield f"{head}.{part}.{leaf}", shard


def _with_default_rope(config: PretrainedConfig) -> PretrainedConfig:
    """A shallow copy of `config` whose rotary table builds as default RoPE (refilled later)."""
    import copy

    plain = copy.copy(config)
    plain.rope_parameters = {"rope_type": "default",
                             "rope_theta": _rope_parameters(config).get("rope_theta", 10000.0)}
    return plain
