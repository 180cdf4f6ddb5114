// A Llama-family decoder stack in one call: for each layer, (add +) RMSNorm, the qkv
// projection, rotary embedding, PagedAttention, the o projection, add + RMSNorm, the gate_up
// projection and the down projection over the SwiGLU gate; then the final add + RMSNorm.
// What differs between the families (Mistral, Qwen2, Qwen3, Phi-3) is described per layer:
// a sliding window (or none), RMSNorms over each q and k head before rotary, biases; and the
// projections may be quantized (GGUF blocks or int8 rows, multiplied by their kernels).
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
#include "quant.h"
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
  kQuantized = 5,  // gguf_linear / int8_linear (quant_*.cpp) on each projection's runs of
                   // columns, each in its own format (`quant_layout`); fp32 bias
};

// The int8 layers' format id (quant.h: kInt8Channel); any other is a GGML type id.
constexpr int64_t kInt8Format = 1000;

// out = x @ W.T + b for a quantized weight, as GGUFLinearMethod / Int8LinearMethod.apply call
// their kernels (activations quantized per row): `weight` the GGUF blocks or int8 rows,
// `scales` the int8 rows' scales (empty for GGUF). int8 goes through the dispatcher by name
// (its file owns its entry point and options); GGUF through quant.h's entry point.
void quantized_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& bias, int64_t format, const at::Tensor& scales) {
  if (format != kInt8Format) {
    // NOTE: called directly (its options at quant.h's defaults, those of the op's schema): a
    // boxed call's stack of arguments cost about a microsecond, 120 times per decode step.
    quant::gguf_linear(out, x, weight, format, bias);
    return;
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pagedllm_cpu::int8_linear", "");
  torch::jit::Stack stack;
  stack.emplace_back(out);
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(scales);
  stack.emplace_back(bias);
  // The rest (quantize_activations and any later options) at their defaults, as apply() leaves
  // them.
  const std::vector<c10::Argument>& arguments = op.schema().arguments();
  for (size_t i = stack.size(); i < arguments.size(); ++i) {
    TORCH_CHECK(arguments[i].default_value().has_value(), op.schema().name(),
                "'s argument ", arguments[i].name(), " has no default");
    stack.push_back(*arguments[i].default_value());
  }
  op.callBoxed(&stack);
}

// A quantized projection: runs of its output columns [start, start + size), each computed by
// one kernel call on a weight of one format (a GGUF layer may mix types, e.g. q and k in Q4_K,
// v in Q6_K), as GGUFLinearMethod.apply runs them.
struct QuantRun {
  int64_t format, start, size;
  const at::Tensor* weight;
  const at::Tensor* bias;
  const at::Tensor* scales;
};
using QuantProjection = std::vector<QuantRun>;

// The projections (qkv, o, gate_up, down of each layer) from `layout`: per projection its
// number of runs, then each run's format and size; `tensors`: per run weight, bias, scales.
std::vector<QuantProjection> quant_projections(at::IntArrayRef layout, at::TensorList tensors,
                                               int64_t num_projections) {
  std::vector<QuantProjection> projections(num_projections);
  size_t li = 0, ti = 0;
  for (QuantProjection& runs : projections) {
    TORCH_CHECK(li < layout.size(), "quant_layout is too short");
    const int64_t num_runs = layout[li++];
    int64_t start = 0;
    for (int64_t r = 0; r < num_runs; ++r) {
      TORCH_CHECK(li + 2 <= layout.size() && ti + 3 <= tensors.size(),
                  "quant_layout or quant_tensors is too short");
      const int64_t format = layout[li], size = layout[li + 1];
      li += 2;
      runs.push_back({format, start, size, &tensors[ti], &tensors[ti + 1], &tensors[ti + 2]});
      ti += 3;
      start += size;
    }
  }
  TORCH_CHECK(li == layout.size() && ti == tensors.size(),
              "quant_layout and quant_tensors describe more projections than the layers have");
  return projections;
}

// x <- its sum over the ranks through pagedllm_tp::all_reduce, the op distributed/pg_comm.py
// defines over the process group (ranks that share no memory); looked up once, when first
// needed, so the op exists only where that module was imported.
void process_group_all_reduce(at::Tensor& x) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pagedllm_tp::all_reduce", "");
  torch::jit::Stack stack;
  stack.emplace_back(x);
  op.callBoxed(&stack);
}

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
                   const at::Tensor& bias, bool gated, at::Tensor& gated_buffer,
                   const QuantProjection* quant = nullptr) {
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
  if (path == kQuantized) {
    int64_t columns = 0;
    for (const QuantRun& run : *quant) {
      at::Tensor cols = quant->size() == 1 ? out : out.narrow(1, run.start, run.size);
      quantized_linear(cols, *input, *run.weight, *run.bias, run.format, *run.scales);
      columns += run.size;
    }
    TORCH_CHECK(columns == out.size(1), "a quantized projection's runs cover ", columns,
                " of its ", out.size(1), " columns");
    return out;
  }
  return onednn_linear(*input, weight, bias);
}

// Where a profiled step's time goes: the two blocks of each layer (the module path's hook
// names), and across them the kinds of work. Blocks: attention = its norm, projections,
// rotary and attention; MLP = its norm and projections. The other parts sum to both (the
// all-reduce, timed only under tensor parallelism: the row-parallel sums with any wait for
// the other ranks).
enum Part : int {
  kAttentionBlock,
  kMlpBlock,
  kNormsRotary,
  kAttentionProjections,
  kAttentionKernel,
  kMlpProjections,
  kAllReduce,
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
                               const std::optional<at::Tensor>& comm_generation,
                               at::IntArrayRef windows, at::TensorList head_norms,
                               at::IntArrayRef quant_layout, at::TensorList quant_tensors) {
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
  TORCH_CHECK(linear_path >= kPanels && linear_path <= kQuantized, "unknown linear path ",
              linear_path);
  const auto path = static_cast<LinearPath>(linear_path);
  // Per layer: its window (0: none), its q and k head norms (none where the list is empty),
  // and on the quantized path each projection's runs (qkv, o, gate_up, down; the projections'
  // slots in `weights` are unused there).
  TORCH_CHECK(windows.empty() || static_cast<int64_t>(windows.size()) == num_layers,
              "windows must be empty or one per layer");
  TORCH_CHECK(head_norms.empty() || static_cast<int64_t>(head_norms.size()) == 2 * num_layers,
              "head_norms must be empty or two (q, k) per layer");
  const std::vector<QuantProjection> quant =
      path == kQuantized ? quant_projections(quant_layout, quant_tensors, 4 * num_layers)
                         : std::vector<QuantProjection>();
  const bool shared_memory = comm_buffer.has_value() && comm_buffer->defined();
  TORCH_CHECK(!shared_memory || comm_generation,
              "the shared buffer needs its generation counter");
  // Under tensor parallelism the o and down projections (row-parallel) give this rank's
  // partial sums: all-reduced in place before the residual add, through the shared buffer
  // on one host, else through the process group's op (distributed/pg_comm.py).
  auto all_reduce = [&](at::Tensor& t) {
    if (shared_memory) {
      shm_all_reduce(t, *comm_buffer, tp_rank, tp_size, *comm_generation);
    } else {
      process_group_all_reduce(t);
    }
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
    // This layer's quantized projections (none on the dense paths).
    const QuantProjection* lq = path == kQuantized ? quant.data() + 4 * l : nullptr;
    timer.begin_block();
    if (l == 0) {
      rms_norm(x, residual, w[0], eps);
    } else {
      fused_add_rms_norm(x, residual, w[0], eps);
    }
    timer.lap(kNormsRotary);
    if (!qkv.defined()) qkv = at::empty({T, q_size + 2 * kv_size}, options);
    qkv = project(path, qkv, x, w[1], w[2], false, gated, lq);
    timer.lap(kAttentionProjections);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_size});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_size});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_size});
    if (!head_norms.empty()) {
      head_rms_norm(q, head_norms[2 * l], eps);
      head_rms_norm(k, head_norms[2 * l + 1], eps);
    }
    rotary_embedding(positions, q, k, cos_cache, sin_cache);
    timer.lap(kNormsRotary);
    paged_attention_windowed(attn_out, q, k, v, kv_caches[l], slot_mapping, query_start_loc,
                             seq_lens, block_tables, scale, windows.empty() ? 0 : windows[l],
                             0.0);
    timer.lap(kAttentionKernel);
    x = project(path, x, attn_out.view({T, q_size}), w[3], w[4], false, gated, lq ? lq + 1 : nullptr);
    timer.lap(kAttentionProjections);
    if (tp_size > 1) {
      all_reduce(x);
      timer.lap(kAllReduce);
    }
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
      gate_up = project(path, gate_up, x, w[6], w[7], false, gated, lq ? lq + 2 : nullptr);
      x = project(path, x, gate_up, w[8], w[9], true, gated, lq ? lq + 3 : nullptr);
    }
    timer.lap(kMlpProjections);
    if (tp_size > 1) {
      all_reduce(x);
      timer.lap(kAllReduce);
    }
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
      "int linear_path, Tensor(b!)? seconds, Tensor? comm_buffer, int tp_rank, int tp_size, "
      "Tensor(c!)? comm_generation, int[] windows, Tensor[] head_norms, int[] quant_layout, "
      "Tensor[] quant_tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("llama_decoder_stack", &pagedllm::llama_decoder_stack);
}

// oneDNN's reordered weights are MkldnnCPU tensors; among the weights they pick that key.
TORCH_LIBRARY_IMPL(pagedllm_cpu, MkldnnCPU, m) {
  m.impl("llama_decoder_stack", &pagedllm::llama_decoder_stack);
}
