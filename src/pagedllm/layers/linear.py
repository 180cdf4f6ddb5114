"""Linear layers, replicated or split over the tensor-parallel ranks (vLLM's names).

A layer owns the shapes and the sharding; its linear method (layers/quantization: dense by
default, the packed CPU kernels of layers/packed.py) owns the parameters and the arithmetic.
Each parameter's `weight_loader(param, loaded_weight, shard_id)` takes a whole checkpoint
tensor and copies in this rank's part (models/interface.py's `load_mapped_weights` calls it).

    ReplicatedLinear            every rank holds the whole weight
    ColumnParallelLinear        output features split: rank r holds rows [r * n/tp, (r+1) * n/tp)
    MergedColumnParallelLinear  several column-parallel outputs fused (SwiGLU's gate | up)
    QKVParallelLinear           q | k | v split by heads; KV heads replicated where tp > their count
    RowParallelLinear           input features split; the partial outputs are all-reduced and
                                the bias is added once (by rank 0)

A fused layer's parts are `shard_id`s 0, 1, ... (q/k/v as 0/1/2 or "q"/"k"/"v"); a checkpoint
that stores the fused tensor whole passes shard_id None and the layer splits it.
At one rank every layer is the dense `Linear` the models always had: same parameters, same
kernels, same arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagedllm.distributed import (
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers.packed import (  # noqa: F401 - re-exported: the kernels' old home
    AMX_PANELS,
    DOT_PANELS,
    FEW_ROWS,
    FP32_PANEL_MAX_ROWS,
    ONEDNN,
    PANELS,
    STREAMING,
    PackedWeight,
    amx_kernel_applies,
    dot_kernel_applies,
    onednn_has_gemm,
    try_pack,
)
from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    WeightShapeError,
    set_weight_attrs,
)
from pagedllm.layers.quantization.dense import UnquantizedLinearMethod

_QKV_IDS = {"q": 0, "k": 1, "v": 2}


class KeepsParamAttrs(nn.Module):
    """Keeps the loader attributes of its parameters (weight_loader, output_dim, ...) when
    `to_empty` or `to` replaces the Parameter objects (models are built on the meta device)."""

    def _apply(self, fn, recurse=True):
        saved = {name: dict(p.__dict__) for name, p in self._parameters.items()
                 if p is not None and p.__dict__}
        out = super()._apply(fn, recurse)
        for name, attrs in saved.items():
            param = self._parameters.get(name)
            if param is not None:
                for key, value in attrs.items():
                    param.__dict__.setdefault(key, value)
        return out


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size "
                         f"({denominator})")
    return numerator // denominator


class LinearBase(KeepsParamAttrs):
    """y = x @ W.T + b through the layer's linear method; unsharded unless a subclass passes
    its share (as the parallel layers below do).

    Args:
        input_size, output_size: the whole layer's features (all ranks together).
        bias: whether the layer has a bias.
        params_dtype: the parameters' dtype (default: torch's default dtype).
        quant_config: the checkpoint's quantization; None is dense.
        prefix: the layer's parameter path (e.g. `layers.0.self_attn.qkv_proj`).
        output_sizes: the fused parts' output features (default: one part).
        output_partition_sizes: this rank's output features of each part.
        output_shard_ranks: which shard of each part this rank holds.
        input_size_per_partition: this rank's input features.
    """

    # The dense method's packed weight, set by pack() where the kernels take the weight.
    packed: PackedWeight | None = None
    # SwiGLU's [gate | up] projection, whose output is only ever gated (see swiglu()).
    gates_swiglu: bool = False
    # What pack() passes to the method (read in process_weights_after_loading).
    batch_hint: int = 64
    batch_invariant: bool = True
    # Whether input features are split over the ranks (row-parallel).
    splits_input: bool = False

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 output_sizes: list[int] | None = None,
                 output_partition_sizes: list[int] | None = None,
                 output_shard_ranks: list[int] | None = None,
                 input_size_per_partition: int | None = None) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.input_size, self.output_size = input_size, output_size
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.output_sizes = list(output_sizes or [output_size])
        self.input_size_per_partition = input_size_per_partition or input_size
        self.output_partition_sizes = list(output_partition_sizes or self.output_sizes)
        self.output_shard_ranks = list(output_shard_ranks or [0] * len(self.output_sizes))
        method = quant_config.get_linear_method(self, prefix) if quant_config else None
        self.linear_method: LinearMethodBase = method or UnquantizedLinearMethod()
        self.linear_method.create_weights(
            self, self.input_size_per_partition, self.output_partition_sizes, input_size,
            output_size, self.params_dtype, weight_loader=self.weight_loader)
        if bias:
            bias_param = nn.Parameter(torch.empty(sum(self.output_partition_sizes),
                                                  dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(bias_param, {"weight_loader": self.weight_loader, "output_dim": 0})
            self.register_parameter("bias", bias_param)
        else:
            self.register_parameter("bias", None)
        weight = self._parameters.get("weight")
        if weight is not None and weight.device.type != "meta" and weight.is_floating_point():
            self._init_like_nn_linear()

    def _init_like_nn_linear(self) -> None:
        """nn.Linear's random init, for a layer built outside the meta device (tests)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.input_size) if self.input_size else 0
                nn.init.uniform_(self.bias, -bound, bound)

    # ---- shapes ------------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        """This rank's input features."""
        return self.input_size_per_partition

    @property
    def out_features(self) -> int:
        """This rank's output features."""
        return sum(self.output_partition_sizes)

    @property
    def shard_sizes(self) -> list[int] | None:
        """The fused parts' output features (the loader expects one tensor per part), or None."""
        return self.output_sizes if len(self.output_sizes) > 1 else None

    @shard_sizes.setter
    def shard_sizes(self, sizes: list[int]) -> None:
        """Splits an unsharded layer's output into fused parts after construction."""
        if self.tp_size > 1 or sum(sizes) != self.output_size:
            raise ValueError(f"shard sizes {sizes} do not split {self.output_size} outputs")
        self.output_sizes = list(sizes)
        self.output_partition_sizes = list(sizes)
        self.output_shard_ranks = [0] * len(sizes)

    # ---- loading -----------------------------------------------------------------------

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        """Copies this rank's part of a checkpoint tensor (of fused part `shard_id`, or the
        whole layer) into `param`, along the parameter's `output_dim`/`input_dim`.

        Raises:
            WeightShapeError: the tensor's shape is not the whole layer's (or part's).
        """
        if isinstance(shard_id, str):
            shard_id = _QKV_IDS[shard_id]
        output_dim = getattr(param, "output_dim", None)
        input_dim = getattr(param, "input_dim", None) if self.splits_input else None
        if shard_id is None and output_dim is not None and len(self.output_sizes) > 1:
            # A fused tensor stored whole: each part in turn.
            expected = list(param.shape)
            expected[output_dim] = sum(self.output_sizes)
            if input_dim is not None:
                expected[input_dim] = self.input_size
            check_weight_shape(loaded_weight, expected)
            start = 0
            for part, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(output_dim, start, size), part)
                start += size
            return
        dst = param.data
        expected = list(dst.shape)
        part = shard_id or 0
        if output_dim is not None:
            size = self.output_partition_sizes[part]
            dst = dst.narrow(output_dim, sum(self.output_partition_sizes[:part]), size)
            expected[output_dim] = self.output_sizes[part]
        if input_dim is not None:
            expected[input_dim] = self.input_size
        check_weight_shape(loaded_weight, expected)
        if output_dim is not None:
            loaded_weight = loaded_weight.narrow(
                output_dim, self.output_shard_ranks[part] * size, size)
        if input_dim is not None:
            size = self.input_size_per_partition
            loaded_weight = loaded_weight.narrow(input_dim, self.tp_rank * size, size)
        dst.copy_(loaded_weight)

    def rank_bias(self) -> torch.Tensor | None:
        """The bias this rank adds (all of it; row-parallel ranks past 0 add none)."""
        return self.bias

    def pack(self, batch_hint: int = 64, batch_invariant: bool = True) -> bool:
        """Has the linear method process the loaded weights (the dense one packs them for the
        CPU kernels); False where a dense weight could not be packed (nothing changes)."""
        self.batch_hint, self.batch_invariant = batch_hint, batch_invariant
        self.linear_method.process_weights_after_loading(self)
        return self.packed is not None or not isinstance(self.linear_method,
                                                         UnquantizedLinearMethod)

    # ---- forward -----------------------------------------------------------------------

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """The subclass's collective over the method's output (none here)."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.linear_method.apply(self, x, self.rank_bias()))

    @property
    def fuses_swiglu(self) -> bool:
        """Whether swiglu() gates inside the GEMM (and the plain forward is unavailable)."""
        return self.linear_method.fuses_swiglu(self)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] projection of x, fused where the kernels allow
        (each rank holds matching gate and up rows, so no collective is needed)."""
        return self.linear_method.apply_swiglu(self, x, self.rank_bias())

    def after_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for gate_up = [gate | up], fused where the kernels allow."""
        return self._finish(self.linear_method.apply_after_silu_and_mul(self, gate_up,
                                                                         self.rank_bias()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


# The name the models and tests used before the parallel layers: an unsharded dense layer,
# Linear(in_features, out_features, bias) as nn.Linear is built.
Linear = LinearBase


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, bias, params_dtype, quant_config, prefix)


class ColumnParallelLinear(LinearBase):
    """Output features split over the ranks; with `gather_output` every rank gets them all."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 output_sizes: list[int] | None = None) -> None:
        tp = get_tp_group()
        output_sizes = list(output_sizes or [output_size])
        what = f"{prefix or 'the layer'}'s output features"
        super().__init__(input_size, output_size, bias, params_dtype, quant_config, prefix,
                         output_sizes=output_sizes,
                         output_partition_sizes=[divide(n, tp.world_size, what)
                                                 for n in output_sizes],
                         output_shard_ranks=[tp.rank] * len(output_sizes))
        self.gather_output = gather_output

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel outputs fused into one GEMM (SwiGLU's [gate | up]); each rank holds its
    rows of every part, so its [gate_r | up_r] gates locally."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, sum(output_sizes), bias, gather_output, params_dtype,
                         quant_config, prefix, output_sizes=list(output_sizes))


class QKVParallelLinear(ColumnParallelLinear):
    """[q | k | v] split by heads: each rank holds num_heads / tp query heads and
    num_kv_heads / tp KV heads, or one KV head, replicated, where tp exceeds their count."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True,
                 params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp = get_tp_group()
        num_heads = divide(total_num_heads, tp.world_size, "num_attention_heads")
        if tp.world_size >= total_num_kv_heads:
            num_kv_heads = 1
            replicas = divide(tp.world_size, total_num_kv_heads, "num_key_value_heads")
        else:
            num_kv_heads = divide(total_num_kv_heads, tp.world_size, "num_key_value_heads")
            replicas = 1
        q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
        total_q, total_kv = total_num_heads * head_size, total_num_kv_heads * head_size
        kv_rank = tp.rank // replicas
        LinearBase.__init__(self, hidden_size, total_q + 2 * total_kv, bias, params_dtype,
                            quant_config, prefix, output_sizes=[total_q, total_kv, total_kv],
                            output_partition_sizes=[q_size, kv_size, kv_size],
                            output_shard_ranks=[tp.rank, kv_rank, kv_rank])
        self.gather_output = False
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_kv_head_replicas = replicas
        self.q_size, self.kv_size = q_size, kv_size


class RowParallelLinear(LinearBase):
    """Input features split over the ranks; each rank's partial output is all-reduced (with
    `reduce_results`), and rank 0 alone adds the bias, so it is added once."""

    splits_input = True

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, params_dtype: torch.dtype | None = None,
                 reduce_results: bool = True, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        if not input_is_parallel:
            raise ValueError("RowParallelLinear takes its input already split "
                             "(input_is_parallel=True)")
        tp_size = get_tp_group().world_size
        super().__init__(input_size, output_size, bias, params_dtype, quant_config, prefix,
                         input_size_per_partition=divide(
                             input_size, tp_size, f"{prefix or 'the layer'}'s input features"))
        self.reduce_results = reduce_results

    def rank_bias(self) -> torch.Tensor | None:
        return self.bias if self.tp_rank == 0 else None

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.reduce_results and self.tp_size > 1:
            return tensor_model_parallel_all_reduce(out.contiguous())
        return out


def check_weight_shape(loaded: torch.Tensor, expected: list[int]) -> None:
    if list(loaded.shape) != list(expected):
        raise WeightShapeError(tuple(loaded.shape), tuple(expected))


def pack_linear_layers(model: nn.Module, batch_hint: int = 64,
                       batch_invariant: bool = True) -> int:
    """Processes every linear layer of a loaded CPU model (the dense method packs it for the
    CPU kernels); returns how many were packed or processed."""
    return sum(m.pack(batch_hint, batch_invariant) for m in model.modules()
               if isinstance(m, LinearBase))
