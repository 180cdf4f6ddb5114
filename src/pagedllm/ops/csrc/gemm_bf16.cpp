// A bf16 linear layer on CPUs with AVX512_BF16: out = x @ W.T + b with VDPBF16PS, which
// multiplies pairs of bf16 values and adds both products to an fp32 accumulator (what a bf16
// GEMM with fp32 accumulation computes, up to summation order; oneDNN's bf16 GEMM uses the same
// instruction).
//
// Why not oneDNN: at decode sizes (64 rows) its 2-thread split of SmolLM2's narrow projections
// leaves a thread idle at the end of most calls (576 columns are 9 of its 64-column blocks), and
// the LM head's fp32 logits cost it a conversion pass. Here threads take panels of 48 columns
// dynamically, a register tile keeps its accumulators for the whole inner dimension, and the LM
// head writes fp32 directly. (Measured: 15% faster than oneDNN at 64 rows, even at 2048.)
//
// Layout: packed[p, kp, 2 * j + e] = W[p * 48 + j, 2 * kp + e] (bf16; zero past N and K): each
// 64 bytes of a panel's row hold a pair of inputs for 16 columns, the operand VDPBF16PS takes.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>

#include "ops.h"
#include "vec.h"

namespace pagedllm {

bool has_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
namespace {

using vec::bf16_t;

// A register tile is kRows x kColVecs vectors of 16 fp32 sums. Same-process A/B of tile shapes
// over SmolLM2's 120 projections (2-core Zen 4): 8 x 3 beat 8 x 2 by 4% at 64 rows, 10% at 16,
// 1% at 2048; 12 x 2 was between them, 6 x 4 and 4 x 4 even with 8 x 2.
constexpr int kColVecs = 3;
constexpr int64_t kCols = 16 * kColVecs;  // output columns per panel
constexpr int kRows = 8;                  // rows of x per register tile
constexpr int64_t kPanelRun = 1;          // panels a thread takes at a time
// Bytes of x rows per block: a block stays in L2 while a thread's panels pass over it.
constexpr int64_t kBlockBytes = 256 * 1024;

// acc[r][0:kCols] = x[r, 0:2*K2] @ panel for R rows (row stride ldx, bf16, 2*K2 values each).
template <int R>
inline void dot_tile(const bf16_t* x, int64_t ldx, const bf16_t* panel, int64_t K2, __m512* acc) {
  __m512 c[R][kColVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kColVecs; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh b[kColVecs];
    for (int j = 0; j < kColVecs; ++j) {
      b[j] = (__m512bh)_mm512_loadu_si512(panel + (kp * kColVecs + j) * 32);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * kp, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < kColVecs; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kColVecs; ++j) acc[kColVecs * r + j] = c[r][j];
}

using DotTileFn = void (*)(const bf16_t*, int64_t, const bf16_t*, int64_t, __m512*);

DotTileFn dot_tile_fn(int64_t rows) {
  switch (rows) {
    case 1: return dot_tile<1>;
    case 2: return dot_tile<2>;
    case 3: return dot_tile<3>;
    case 4: return dot_tile<4>;
    case 5: return dot_tile<5>;
    case 6: return dot_tile<6>;
    case 7: return dot_tile<7>;
    default: return dot_tile<kRows>;
  }
}


// out[M, N] = x[M, 2*K2] @ W.T + bias over the packed panels; x bf16 with row stride ldx.
template <typename O>
void run_dot_panels(O* out, int64_t ldo, const bf16_t* x, int64_t ldx, int64_t M, int64_t K2,
                    const bf16_t* packed, const float* bias, int64_t N) {
  const int64_t num_panels = (N + kCols - 1) / kCols;
  const int64_t num_runs = (num_panels + kPanelRun - 1) / kPanelRun;
  const int64_t mb = std::max<int64_t>(kRows, kBlockBytes / (4 * K2) / kRows * kRows);
  const int64_t num_blocks = (M + mb - 1) / mb;
  const int64_t num_items = num_blocks * num_runs;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t m_begin = item / num_runs * mb, m_end = std::min(M, m_begin + mb);
    const int64_t p_begin = item % num_runs * kPanelRun;
    const int64_t p_end = std::min(num_panels, p_begin + kPanelRun);
    alignas(64) __m512 acc[kColVecs * kRows];
    for (int64_t p = p_begin; p < p_end; ++p) {
      const bf16_t* panel = packed + p * K2 * 2 * kCols;
      const int64_t n0 = p * kCols, width = std::min(kCols, N - n0);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, m_end - m0);
        dot_tile_fn(rows)(x + m0 * ldx, ldx, panel, K2, acc);
        for (int64_t r = 0; r < rows; ++r) {
          vec::store_sums<kCols>(out + (m0 + r) * ldo + n0,
                                 reinterpret_cast<const float*>(acc + kColVecs * r),
                                 bias ? bias + n0 : nullptr, width);
        }
      }
    }
  }
}

}  // namespace

// weight [N, K] bf16 -> packed [ceil(N / 48), ceil(K / 2), 96] bf16 (see the layout above).
at::Tensor pack_dot_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kBFloat16,
              "weight must be a 2-D bfloat16 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t num_panels = (N + kCols - 1) / kCols, K2 = (K + 1) / 2;
  at::Tensor packed = at::zeros({num_panels, K2, 2 * kCols}, w.options());
  const bf16_t* src = reinterpret_cast<const bf16_t*>(w.data_ptr());
  bf16_t* dst = reinterpret_cast<bf16_t*>(packed.data_ptr());
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < kCols && p * kCols + j < N; ++j) {
        const bf16_t* row = src + (p * kCols + j) * K;
        for (int64_t k = 0; k < K; ++k) dst[(p * K2 + k / 2) * 2 * kCols + 2 * j + k % 2] = row[k];
      }
    }
  });
  return packed;
}

// out [M, N] fp32/bf16 (contiguous last dim); x [M, K] bf16 (fp32 is rounded to bf16 first);
// packed from pack_dot_panels; bias fp32 [N] or empty. With silu_and_mul, x is [M, 2K] =
// [gate | up] and the layer's input is the silu_and_mul op's output.
void dot_panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& bias, bool silu_and_mul) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be 2-D fp32/bf16 CPU");
  TORCH_CHECK(out.dim() == 2, "out must be 2-D");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kCols && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_dot_panels");
  TORCH_CHECK(!silu_and_mul || x.size(1) % 2 == 0, "silu_and_mul needs x = [gate | up]");
  const int64_t M = x.size(0), K = silu_and_mul ? x.size(1) / 2 : x.size(1), N = out.size(1);
  const int64_t K2 = packed.size(1);
  TORCH_CHECK(K2 == (K + 1) / 2, "x has ", K, " columns, the weight ", 2 * K2, " (padded)");
  TORCH_CHECK(out.size(0) == M && out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
                  packed.size(0) == (N + kCols - 1) / kCols,
              "out must be [M, N] fp32/bf16 with a contiguous last dim, N the weight's rows");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                            bias.numel() == N),
              "bias must be contiguous float32 [N] (or empty)");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: the bias alone
    if (has_bias) out.copy_(bias.unsqueeze(0).expand({M, N})); else out.zero_();
    return;
  }
  // The tile reads x in pairs along contiguous rows of even length: anything else (the gated
  // input, fp32, an odd K, strided rows) goes through a bf16 copy first.
  at::Tensor xb = x;
  if (silu_and_mul) {  // the separate op's output in x's dtype (rounded below if fp32)
    xb = at::empty({M, K}, x.options());
    pagedllm::silu_and_mul(xb, x);
  }
  if (xb.scalar_type() != at::kBFloat16 || K % 2 || xb.stride(1) != 1 || xb.stride(0) % 2) {
    at::Tensor padded = at::zeros({M, 2 * K2}, x.options().dtype(at::kBFloat16));
    padded.narrow(1, 0, K).copy_(xb);
    xb = padded;
  }
  const bf16_t* xp = reinterpret_cast<const bf16_t*>(xb.data_ptr());
  const bf16_t* wp = reinterpret_cast<const bf16_t*>(packed.data_ptr());
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  if (out.scalar_type() == at::kFloat) {
    run_dot_panels(out.data_ptr<float>(), out.stride(0), xp, xb.stride(0), M, K2, wp, bp, N);
  } else {
    run_dot_panels(reinterpret_cast<bf16_t*>(out.data_ptr()), out.stride(0), xp, xb.stride(0), M,
                   K2, wp, bp, N);
  }
}

#else  // no AVX512_BF16: the ops exist, and say why they cannot run

at::Tensor pack_dot_panels(const at::Tensor&) {
  TORCH_CHECK(false, "pack_dot_panels needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}
void dot_panel_linear(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "dot_panel_linear needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}

#endif

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("has_bf16_dot() -> bool", &pagedllm::has_bf16_dot);
  m.def("pack_dot_panels(Tensor weight) -> Tensor");
  m.def(
      "dot_panel_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias, "
      "bool silu_and_mul=False) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_dot_panels", &pagedllm::pack_dot_panels);
  m.impl("dot_panel_linear", &pagedllm::dot_panel_linear);
}
