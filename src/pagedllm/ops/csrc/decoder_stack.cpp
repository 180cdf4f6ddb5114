// A Llama-family decoder stack in one call: for each layer, (add +) RMSNorm, the qkv
// projection, rotary embedding, PagedAttention, the o projection, add + RMSNorm, the gate_up
// projection and the down projection over the SwiGLU gate; then the final add + RMSNorm.
//
// It calls the same kernels, in the same order and on the same buffers' contents, as the
// per-module Python path (pagedllm/models/llama.py), so the two agree bit for bit. What it
// saves is the Python between them: ~8 ops per layer, each a dispatcher round trip with tensor
// views and allocations around it, 240 per step for SmolLM2's 30 layers. That was 8-20 ms of a
// 160-200 ms decode step of 64 sequences and about a third of a single sequence's step.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace pagedllm {
namespace {

// Per layer, in `weights`: input norm, qkv weight, qkv bias, o weight, o bias,
// post-attention norm, gate_up weight, gate_up bias, down weight, down bias, each projection's
// weight and bias in the form its path takes (biases may be empty).
constexpr int64_t kTensorsPerLayer = 10;

// How the step's projections run, chosen in Python by PackedWeight.path, as for one layer
// (pagedllm/layers/linear.py: PANELS, STREAMING, ONEDNN, DOT_PANELS, AMX_PANELS).
enum LinearPath : int64_t {
  kPanels = 0,     // panel_linear on weights from pack_panels; fp32 bias
  kStreaming = 1,  // linear_few_rows on the row-major weight; fp32 bias
  kOneDnn = 2,     // oneDNN on its reordered weight; bias in the weight's dtype
  kDotPanels = 3,  // dot_panel_linear on weights from pack_dot_panels, gate_up's from
                   // pack_dot_swiglu_panels (gated by dot_swiglu_linear); fp32 bias
  kAmxPanels = 4,  // amx_panel_linear on weights from pack_amx_panels; fp32 bias
};

// mkldnn::_linear_pointwise(x, w, b, "none", [], ""), as PackedWeight.onednn calls it.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias.numel() > 0 ? c10::IValue(bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

// x @ W.T + b by `path`, into `out` except on oneDNN (which allocates its result); with
// `gated`, over silu(gate) * up of x = [gate | up]: fused into the panels' packing, the op
// inside the dot-product and AMX kernels, else the silu_and_mul op first (into
// `gated_buffer`), as Linear.after_silu_and_mul does.
at::Tensor project(LinearPath path, at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, bool gated, at::Tensor& gated_buffer) {
  if (path == kPanels) {
    panel_linear(out, x, weight, bias, gated);
    return out;
  }
  if (path == kDotPanels) {
    dot_panel_linear(out, x, weight, bias, gated);
    return out;
  }
  if (path == kAmxPanels) {
    amx_panel_linear(out, x, weight, bias, gated);
    return out;
  }
  const at::Tensor* input = &x;
  if (gated) {
    if (!gated_buffer.defined()) gated_buffer = at::empty({x.size(0), x.size(1) / 2}, x.options());
    silu_and_mul(gated_buffer, x);
    input = &gated_buffer;
  }
  if (path == kStreaming) {
    linear_few_rows(out, *input, weight, bias);
    return out;
  }
  return onednn_linear(*input, weight, bias);
}

// Where a profiled step's time goes: the two blocks of each layer (the module path's hook
// names), and across them the kinds of work. Blocks: attention = its norm, projections,
// rotary and attention; MLP = its norm and projections. The other four parts sum to both.
enum Part : int {
  kAttentionBlock,
  kMlpBlock,
  kNormsRotary,
  kAttentionProjections,
  kAttentionKernel,
  kMlpProjections,
  kNumParts
};

// Accumulates wall time into seconds[part] (float64 [kNumParts]) when profiling passes it.
class PartTimer {
 public:
  using Clock = std::chrono::steady_clock;

  explicit PartTimer(const std::optional<at::Tensor>& seconds)
      : seconds_(seconds && seconds->defined() ? seconds->data_ptr<double>() : nullptr) {}

  void begin_block() {
    if (seconds_) block_begin_ = last_ = Clock::now();
  }
  // The time since the last lap (or the block's start) goes to `part`.
  void lap(Part part) {
    if (!seconds_) return;
    const Clock::time_point now = Clock::now();
    seconds_[part] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  // The block's time up to its last lap goes to `block`.
  void end_block(Part block) {
    if (seconds_) seconds_[block] += std::chrono::duration<double>(last_ - block_begin_).count();
  }

 private:
  double* seconds_;
  Clock::time_point block_begin_, last_;
};

}  // namespace


// hidden [T, H] (the embeddings; not modified) -> the final norm's output [T, H].
at::Tensor llama_decoder_stack(const at::Tensor& hidden, const at::Tensor& positions,
                               at::TensorList weights, at::TensorList kv_caches,
                               const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                               const at::Tensor& seq_lens, const at::Tensor& block_tables,
                               const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                               const at::Tensor& final_norm, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_size,
                               int64_t intermediate_size, double eps, double scale,
                               int64_t linear_path, const std::optional<at::Tensor>& seconds,
                               const std::optional<at::Tensor>& comm_buffer, int64_t tp_rank,
                               int64_t tp_size,
                               const std::optional<at::Tensor>& comm_generation) {
  const int64_t num_layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(num_layers > 0 && static_cast<int64_t>(weights.size()) ==
                                    num_layers * kTensorsPerLayer,
              "expected ", kTensorsPerLayer, " weight tensors per layer for ", num_layers,
              " layers, got ", weights.size());
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous [T, H]");
  TORCH_CHECK(!seconds || !seconds->defined() ||
                  (seconds->scalar_type() == at::kDouble && seconds->is_contiguous() &&
                   seconds->numel() == kNumParts),
              "seconds must be a contiguous float64 [", kNumParts, "] tensor");
  TORCH_CHECK(linear_path >= kPanels && linear_path <= kAmxPanels, "unknown linear path ",
              linear_path);
  const auto path = static_cast<LinearPath>(linear_path);
  TORCH_CHECK(tp_size == 1 || (comm_buffer && comm_generation),
              "tensor parallelism needs the shared buffer and generation counter");
  // Under tensor parallelism the o and down projections (row-parallel) give this rank's
  // partial sums: all-reduced in place before the residual add.
  auto all_reduce = [&](at::Tensor& t) {
    if (tp_size > 1) shm_all_reduce(t, *comm_buffer, tp_rank, tp_size, *comm_generation);
  };
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t q_size = num_heads * head_size, kv_size = num_kv_heads * head_size;
  const auto options = hidden.options();
  // The residual stream; x holds each block's input, then its output.
  at::Tensor residual = hidden.clone();
  at::Tensor x = at::empty({T, H}, options);
  at::Tensor attn_out = at::empty({T, num_heads, head_size}, options);
  // Allocated in the first layer.
  at::Tensor qkv, gate_up, gated;
  PartTimer timer(seconds);

  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kTensorsPerLayer;
    timer.begin_block();
    if (l == 0) {
      rms_norm(x, residual, w[0], eps);
    } else {
      fused_add_rms_norm(x, residual, w[0], eps);
    }
    timer.lap(kNormsRotary);
    if (!qkv.defined()) qkv = at::empty({T, q_size + 2 * kv_size}, options);
    qkv = project(path, qkv, x, w[1], w[2], false, gated);
    timer.lap(kAttentionProjections);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_size});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_size});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_size});
    rotary_embedding(positions, q, k, cos_cache, sin_cache);
    timer.lap(kNormsRotary);
    paged_attention(attn_out, q, k, v, kv_caches[l], slot_mapping, query_start_loc, seq_lens,
                    block_tables, scale);
    timer.lap(kAttentionKernel);
    x = project(path, x, attn_out.view({T, q_size}), w[3], w[4], false, gated);
    all_reduce(x);
    timer.lap(kAttentionProjections);
    timer.end_block(kAttentionBlock);

    timer.begin_block();
    fused_add_rms_norm(x, residual, w[5], eps);
    timer.lap(kNormsRotary);
    if (path == kDotPanels) {  // gated in the gate_up GEMM's epilogue
      if (!gated.defined()) gated = at::empty({T, intermediate_size}, options);
      dot_swiglu_linear(gated, x, w[6], w[7]);
      x = project(path, x, gated, w[8], w[9], false, gated);
    } else {
      if (!gate_up.defined()) gate_up = at::empty({T, 2 * intermediate_size}, options);
      gate_up = project(path, gate_up, x, w[6], w[7], false, gated);
      x = project(path, x, gate_up, w[8], w[9], true, gated);
    }
    all_reduce(x);
    timer.lap(kMlpProjections);
    timer.end_block(kMlpBlock);
  }
  fused_add_rms_norm(x, residual, final_norm, eps);
  return x;
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def(
      "llama_decoder_stack(Tensor hidden, Tensor positions, Tensor[] weights, "
      "Tensor(a!)[] kv_caches, Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, "
      "Tensor block_tables, Tensor cos_cache, Tensor sin_cache, Tensor final_norm, "
      "int num_heads, int num_kv_heads, int head_size, int intermediate_size, float eps, "
      "float scale, "
      "int linear_path=0, Tensor(b!)? seconds=None, Tensor? comm_buffer=None, "
      "int tp_rank=0, int tp_size=1, Tensor(c!)? comm_generation=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("llama_decoder_stack", &pagedllm::llama_decoder_stack);
}

// oneDNN's reordered weights are MkldnnCPU tensors; among the weights they pick that key.
TORCH_LIBRARY_IMPL(pagedllm_cpu, MkldnnCPU, m) {
  m.impl("llama_decoder_stack", &pagedllm::llama_decoder_stack);
}
