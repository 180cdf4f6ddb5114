// The ops other C++ code calls directly (the decoder stack), as registered with torch: each
// is defined in its own source file and checks its arguments as the Python-facing op does.
#pragma once

#include <ATen/core/Tensor.h>

namespace pagedllm {

// paged_attention.cpp: writes key/value into their slots, then attends through block tables.
void paged_attention(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value,
                     at::Tensor kv_cache, at::Tensor slot_mapping, at::Tensor query_start_loc,
                     at::Tensor seq_lens, at::Tensor block_tables, double scale);
// ... the same where each query sees only the last `window` keys (0: all) and scores are
// soft-capped (0: not).
void paged_attention_windowed(at::Tensor out, at::Tensor query, at::Tensor key,
                              at::Tensor value, at::Tensor kv_cache, at::Tensor slot_mapping,
                              at::Tensor query_start_loc, at::Tensor seq_lens,
                              at::Tensor block_tables, double scale, int64_t window,
                              double soft_cap);

// layer_ops.cpp
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight,
                        double eps);
void rotary_embedding(const at::Tensor& positions, at::Tensor query, at::Tensor key,
                      const at::Tensor& cos_cache, const at::Tensor& sin_cache);
void silu_and_mul(at::Tensor out, const at::Tensor& x);
// In place, each head of x [tokens, heads, head_size] (a last-dim-contiguous view).
void head_rms_norm(at::Tensor x, const at::Tensor& weight, double eps);

// gemm.cpp: out = x @ W.T + b on a weight from pack_panels (x gated first with silu_and_mul).
void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                  const at::Tensor& bias, bool silu_and_mul);

// gemm_bf16.cpp: the same with VDPBF16PS on a weight from pack_dot_panels (AVX512_BF16 CPUs).
void dot_panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& bias, bool silu_and_mul);
// ... and SwiGLU's gate_up projection with the gating in its epilogue (pack_dot_swiglu_panels).
void dot_swiglu_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& bias);

// gemm_amx.cpp: the same with AMX tiles on a weight from pack_amx_panels (AMX CPUs).
void amx_panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& bias, bool silu_and_mul);

// gemv.cpp: out = x @ W.T + b streaming a row-major weight (a few rows of x).
void linear_few_rows(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias);

// shm_comm.cpp: x <- the sum of every rank's x over the group's shared buffer, in place.
void shm_all_reduce(at::Tensor x, const at::Tensor& buffer, int64_t rank, int64_t world_size,
                    at::Tensor generation);

}  // namespace pagedllm
