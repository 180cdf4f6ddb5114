// A bf16 linear layer on CPUs with AVX512_BF16: out = x @ W.T + b with VDPBF16PS, which
// multiplies pairs of bf16 values and adds both products to an fp32 accumulator (what a bf16
// GEMM with fp32 accumulation computes, up to summation order; oneDNN's bf16 GEMM uses the same
// instruction).
//
// Why not oneDNN: at decode sizes (64 rows) its 2-thread split of SmolLM2's narrow projections
// leaves a thread idle at the end of most calls (576 columns are 9 of its 64-column blocks), and
// the LM head's fp32 logits cost it a conversion pass. Here threads share out panels of 48
// columns (each walking its own run in memory order, idle threads taking from the others'
// ends), a register tile keeps its accumulators for the whole inner dimension, and the LM
// head writes fp32 directly. (Measured: 15% faster than oneDNN at 64 rows, even at 2048.)
//
// Layout: packed[p, kp, 2 * j + e] = W[p * 48 + j, 2 * kp + e] (bf16; zero past N and K): each
// 64 bytes of a panel's row hold a pair of inputs for 16 columns, the operand VDPBF16PS takes.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "deal.h"
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


// For each register tile of x[M, 2*K2] @ the packed panels (x bf16 with row stride ldx), calls
// store(m0, rows, p, acc): rows m0 .. m0 + rows - 1 of panel p, acc[kColVecs * r + j] holding
// row m0 + r's sums of the panel's columns 16j .. 16j + 15.
template <typename Store>
void run_dot_panels(const bf16_t* x, int64_t ldx, int64_t M, int64_t K2, const bf16_t* packed,
                    int64_t num_panels, const Store& store) {
  const int64_t mb = std::max<int64_t>(kRows, kBlockBytes / (4 * K2) / kRows * kRows);
  const int64_t num_blocks = (M + mb - 1) / mb;
  const int64_t num_items = num_blocks * num_panels;  // block-major: a block's panels in order
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
  const auto run_item = [&](int64_t item) {
    const int64_t m_begin = item / num_panels * mb, m_end = std::min(M, m_begin + mb);
    const int64_t p = item % num_panels;
    const bf16_t* panel = packed + p * K2 * 2 * kCols;
    alignas(64) __m512 acc[kColVecs * kRows];
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, m_end - m0);
      dot_tile_fn(rows)(x + m0 * ldx, ldx, panel, K2, acc);
      store(m0, rows, p, acc);
    }
  };
  deal_in_memory_order(num_items, num_threads, run_item);
}

// out[M, N] = the product + bias (out fp32 or bf16, row stride ldo).
template <typename O>
void run_dot_linear(O* out, int64_t ldo, const bf16_t* x, int64_t ldx, int64_t M, int64_t K2,
                    const bf16_t* packed, const float* bias, int64_t N) {
  run_dot_panels(x, ldx, M, K2, packed, (N + kCols - 1) / kCols,
                 [&](int64_t m0, int64_t rows, int64_t p, const __m512* acc) {
                   const int64_t n0 = p * kCols, width = std::min(kCols, N - n0);
                   for (int64_t r = 0; r < rows; ++r) {
                     vec::store_sums<kCols>(out + (m0 + r) * ldo + n0,
                                            reinterpret_cast<const float*>(acc + kColVecs * r),
                                            bias ? bias + n0 : nullptr, width);
                   }
                 });
}

// SwiGLU panels (pack_dot_swiglu_panels): panel p's columns are gate rows kHalf * p .. + kHalf
// then the up rows of the same units.
constexpr int64_t kHalf = kCols / 2;

// out[0:n] = silu(gate) * up for the units col0 .. col0 + n - 1 (n <= kHalf) of a row whose
// gate and up values (in T, as a gate_up projection stores them) are gate[0:n], up[0:n], each
// with room for 32 values. Computed exactly as the silu_and_mul op computes a row of d units:
// vector code below its last whole vector (vec_end = d / kLanes * kLanes), scalar code above.
template <typename T>
inline void swiglu_units(T* out, const T* gate, const T* up, int64_t col0, int64_t n,
                         int64_t vec_end) {
  alignas(64) float res[32];
  for (int64_t c = 0; c < n; c += vec::kLanes) {
    vec::store(res + c, vec::silu_mul<T>(vec::load(gate + c), vec::load(up + c)));
  }
  for (int64_t c = 0; c < n; ++c) {
    const float v = col0 + c < vec_end ? res[c]
                                       : vec::silu_mul<T>(vec::load1(gate, c), vec::load1(up, c));
    if constexpr (std::is_same_v<T, bf16_t>) out[c] = vec::float_to_bf16(v); else out[c] = v;
  }
}

// Stores v's lanes 0-7 at row0 and lanes 8-15 at row1 (8 values each) in T.
template <typename T>
inline void store_halves(T* row0, T* row1, __m512 v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    const __m256i h = _mm512_cvtepi32_epi16((__m512i)vec::to_bf16_bits((vec::vfloat)v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row0), _mm256_castsi256_si128(h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row1), _mm256_extracti128_si256(h, 1));
  } else {
    _mm256_storeu_ps(row0, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(row1, _mm512_extractf32x8_ps(v, 1));
  }
}

// out[M, I] = silu(x @ Wg.T + bg) * (x @ Wu.T + bu), each product first rounded to T as the
// gate_up projection's output would be (bias: fp32 [2 * I] in [gate | up] order, or null).
//
// A tile row's three vectors hold gate units 0-15 | gate 16-23, up 0-7 | up 8-23. Units 0-15
// are gated in one vector per row; units 16-23 of two rows share one (no idle lanes). Panels
// with units the silu_and_mul op computes in scalar code (past its last whole vector), or
// cut short at I, take swiglu_units row by row.
template <typename T>
void run_dot_swiglu(T* out, int64_t ldo, const bf16_t* x, int64_t ldx, int64_t M, int64_t K2,
                    const bf16_t* packed, const float* bias, int64_t I) {
  static_assert(kHalf == 24 && vec::kLanes == 16, "the register layout above");
  using vec::vfloat;
  const int64_t vec_end = I / vec::kLanes * vec::kLanes;
  const __m512i up_lo_index = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                                                20, 21, 22, 23);
  const auto gate = [](__m512 g, __m512 u) {
    return (__m512)vec::silu_mul<T>(vec::round_as<T>((vfloat)g), vec::round_as<T>((vfloat)u));
  };
  const auto store16 = [](T* dst, __m512 v) {
    if constexpr (std::is_same_v<T, bf16_t>) vec::store(dst, (vfloat)v); else _mm512_storeu_ps(dst, v);
  };
  run_dot_panels(x, ldx, M, K2, packed, (I + kHalf - 1) / kHalf,
                 [&](int64_t m0, int64_t rows, int64_t p, const __m512* acc) {
    const int64_t c0 = p * kHalf, n = std::min(kHalf, I - c0);
    alignas(64) float panel_bias[kCols + 16] = {};
    if (bias) {
      for (int64_t c = 0; c < n; ++c) {
        panel_bias[c] = bias[c0 + c];
        panel_bias[kHalf + c] = bias[I + c0 + c];
      }
    }
    if (n < kHalf || c0 + kHalf > vec_end) {
      for (int64_t r = 0; r < rows; ++r) {
        alignas(64) T gate_up[kCols + 32] = {};  // + room for whole vectors
        vec::store_sums<kCols>(gate_up, reinterpret_cast<const float*>(acc + kColVecs * r),
                               bias ? panel_bias : nullptr, kCols);
        swiglu_units<T>(out + (m0 + r) * ldo + c0, gate_up, gate_up + kHalf, c0, n, vec_end);
      }
      return;
    }
    // The bias in the vectors' layouts (zero without bias: adding it changes nothing).
    const __m512 bias_gate = _mm512_load_ps(panel_bias);
    const __m512 bias_up = _mm512_loadu_ps(panel_bias + kHalf);
    const __m512 bias_gate_hi = _mm512_shuffle_f32x4(_mm512_loadu_ps(panel_bias + 16),
                                                     _mm512_loadu_ps(panel_bias + 16),
                                                     _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 bias_up_hi = _mm512_shuffle_f32x4(_mm512_loadu_ps(panel_bias + kHalf + 16),
                                                   _mm512_loadu_ps(panel_bias + kHalf + 16),
                                                   _MM_SHUFFLE(1, 0, 1, 0));
    // As store_sums adds: always for fp32 (sums + 0 turns -0 into +0), only a bias for bf16.
    const auto add_bias = [&](__m512 v, __m512 b) {
      return bias || std::is_same_v<T, float> ? _mm512_add_ps(v, b) : v;
    };
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t r1 = std::min(r + 1, rows - 1);  // an odd last row pairs with itself
      for (int64_t q = r; q <= r1; ++q) {
        const __m512* a = acc + kColVecs * q;
        const __m512 up = _mm512_permutex2var_ps(a[1], up_lo_index, a[2]);
        store16(out + (m0 + q) * ldo + c0, gate(add_bias(a[0], bias_gate), add_bias(up, bias_up)));
      }
      const __m512* a0 = acc + kColVecs * r;
      const __m512* a1 = acc + kColVecs * r1;
      const __m512 g = _mm512_shuffle_f32x4(a0[1], a1[1], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 u = _mm512_shuffle_f32x4(a0[2], a1[2], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512 res = gate(add_bias(g, bias_gate_hi), add_bias(u, bias_up_hi));
      T* row0 = out + (m0 + r) * ldo + c0 + 16;
      if (r1 != r) {
        store_halves<T>(row0, out + (m0 + r1) * ldo + c0 + 16, res);
      } else {
        alignas(64) T spare[8];
        store_halves<T>(row0, spare, res);
      }
    }
  });
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

// x as the register tiles read it: bf16 rows of even length with contiguous pairs. Anything
// else (fp32, an odd K, strided rows) goes through a zero-padded bf16 copy.
at::Tensor bf16_pair_rows(const at::Tensor& x, int64_t K2) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kBFloat16 && K % 2 == 0 && x.stride(1) == 1 && x.stride(0) % 2 == 0) {
    return x;
  }
  at::Tensor padded = at::zeros({x.size(0), 2 * K2}, x.options().dtype(at::kBFloat16));
  padded.narrow(1, 0, K).copy_(x);
  return padded;
}

void check_dot_operands(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be 2-D fp32/bf16 CPU");
  TORCH_CHECK(out.dim() == 2, "out must be 2-D");
  TORCH_CHECK(out.size(0) == x.size(0) && out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be fp32/bf16 with x's rows and a contiguous last dim");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kCols && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_dot_panels or pack_dot_swiglu_panels");
}

// The packed weight's pairs of inputs, checked against the layer's input width K.
int64_t checked_pairs(const at::Tensor& packed, int64_t K) {
  const int64_t K2 = packed.size(1);
  TORCH_CHECK(K2 == (K + 1) / 2, "x has ", K, " columns, the weight ", 2 * K2, " (padded)");
  return K2;
}

// The fp32 bias of n values (`size` names n in the message), or null for an empty one.
const float* checked_bias(const at::Tensor& bias, int64_t n, const char* size) {
  if (bias.numel() == 0) return nullptr;
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == n,
              "bias must be contiguous float32 [", size, "] (or empty)");
  return bias.data_ptr<float>();
}

// run(out's data) as float* or bf16_t*, by out's dtype.
template <typename Run>
void with_out_data(const at::Tensor& out, const Run& run) {
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>());
  } else {
    run(reinterpret_cast<bf16_t*>(out.data_ptr()));
  }
}

// out [M, N] fp32/bf16 (contiguous last dim); x [M, K] bf16 (fp32 is rounded to bf16 first);
// packed from pack_dot_panels; bias fp32 [N] or empty. With silu_and_mul, x is [M, 2K] =
// [gate | up] and the layer's input is the silu_and_mul op's output.
void dot_panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& bias, bool silu_and_mul) {
  check_dot_operands(out, x, packed);
  TORCH_CHECK(!silu_and_mul || x.size(1) % 2 == 0, "silu_and_mul needs x = [gate | up]");
  const int64_t M = x.size(0), K = silu_and_mul ? x.size(1) / 2 : x.size(1), N = out.size(1);
  const int64_t K2 = checked_pairs(packed, K);
  TORCH_CHECK(packed.size(0) == (N + kCols - 1) / kCols, "out has ", N,
              " columns, the weight ", packed.size(0) * kCols, " (padded)");
  const float* bp = checked_bias(bias, N, "N");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: the bias alone
    if (bp) out.copy_(bias.unsqueeze(0).expand({M, N})); else out.zero_();
    return;
  }
  at::Tensor xb = x;
  if (silu_and_mul) {  // the separate op's output in x's dtype (rounded below if fp32)
    xb = at::empty({M, K}, x.options());
    pagedllm::silu_and_mul(xb, x);
  }
  xb = bf16_pair_rows(xb, K2);
  const bf16_t* xp = reinterpret_cast<const bf16_t*>(xb.data_ptr());
  const bf16_t* wp = reinterpret_cast<const bf16_t*>(packed.data_ptr());
  with_out_data(out, [&](auto* op) {
    run_dot_linear(op, out.stride(0), xp, xb.stride(0), M, K2, wp, bp, N);
  });
}

// weight [2 * I, K] = [gate | up] bf16 -> packed [ceil(I / 24), ceil(K / 2), 96]: as
// pack_dot_panels over the rows reordered so that each 48-column panel holds 24 gate units then
// the same 24 up units (zero past I), for dot_swiglu_linear.
at::Tensor pack_dot_swiglu_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.size(0) % 2 == 0 &&
                  weight.scalar_type() == at::kBFloat16,
              "weight must be a 2-D bfloat16 CPU tensor [gate | up] (an even number of rows)");
  const int64_t I = weight.size(0) / 2, K = weight.size(1), P = (I + kHalf - 1) / kHalf;
  at::Tensor halves = at::zeros({2, P * kHalf, K}, weight.options());
  halves.narrow(1, 0, I).copy_(weight.reshape({2, I, K}));
  return pack_dot_panels(halves.view({2, P, kHalf, K}).transpose(0, 1).reshape({P * kCols, K}));
}

// out [M, I] = silu(x @ Wg.T + bg) * (x @ Wu.T + bu) in out's dtype, computed as the gate_up
// projection (dot_panel_linear into [M, 2 * I] of out's dtype) followed by the silu_and_mul op,
// bit for bit, without writing the gate_up activations out. packed from pack_dot_swiglu_panels;
// bias fp32 [2 * I] ([gate | up]) or empty; x as for dot_panel_linear.
void dot_swiglu_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& bias) {
  check_dot_operands(out, x, packed);
  const int64_t M = x.size(0), K = x.size(1), I = out.size(1);
  const int64_t K2 = checked_pairs(packed, K);
  TORCH_CHECK(packed.size(0) == (I + kHalf - 1) / kHalf, "out has ", I,
              " units, the weight ", packed.size(0) * kHalf, " (padded)");
  const float* bp = checked_bias(bias, 2 * I, "2 * I");
  if (M == 0 || I == 0) return;
  if (K == 0) {  // empty sums: the gate_up activations are the bias alone
    at::Tensor gate_up = at::zeros({M, 2 * I}, out.options());
    if (bp) gate_up.copy_(bias.unsqueeze(0).expand({M, 2 * I}));
    pagedllm::silu_and_mul(out, gate_up);
    return;
  }
  const at::Tensor xb = bf16_pair_rows(x, K2);
  const bf16_t* xp = reinterpret_cast<const bf16_t*>(xb.data_ptr());
  const bf16_t* wp = reinterpret_cast<const bf16_t*>(packed.data_ptr());
  with_out_data(out, [&](auto* op) {
    run_dot_swiglu(op, out.stride(0), xp, xb.stride(0), M, K2, wp, bp, I);
  });
}

#else  // no AVX512_BF16: the ops exist, and say why they cannot run

at::Tensor pack_dot_panels(const at::Tensor&) {
  TORCH_CHECK(false, "pack_dot_panels needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}
void dot_panel_linear(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "dot_panel_linear needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}
at::Tensor pack_dot_swiglu_panels(const at::Tensor&) {
  TORCH_CHECK(false, "pack_dot_swiglu_panels needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}
void dot_swiglu_linear(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "dot_swiglu_linear needs a CPU with AVX512_BF16 (see has_bf16_dot)");
}

#endif

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("has_bf16_dot() -> bool", &pagedllm::has_bf16_dot);
  m.def("pack_dot_panels(Tensor weight) -> Tensor");
  m.def("pack_dot_swiglu_panels(Tensor weight) -> Tensor");
  m.def("dot_swiglu_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias) -> ()");
  m.def(
      "dot_panel_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias, "
      "bool silu_and_mul=False) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_dot_panels", &pagedllm::pack_dot_panels);
  m.impl("dot_panel_linear", &pagedllm::dot_panel_linear);
  m.impl("pack_dot_swiglu_panels", &pagedllm::pack_dot_swiglu_panels);
  m.impl("dot_swiglu_linear", &pagedllm::dot_swiglu_linear);
}
