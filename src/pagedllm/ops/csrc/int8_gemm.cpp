// The W8A8 int8 GEMM (int8_gemm.h): symmetric int8 weights with a scale per output column and
// group of G inputs, pre-packed at load into panels of 32 columns, times activations quantized
// per row to int8 in blocks of the same G inputs (a scale each, max |block| / 127). Each
// output sums, group by group in order,
//   acc = fma(float(P), ws * dx, acc)
// with P the group's integer dot product (exact in int32) and ws, dx the weight's and the
// activations' scales; then out = acc + bias. Every output takes exactly these operations
// whichever tile, row count or ISA computes it: the kernel is batch-invariant, and its
// AVX512-VNNI, AVX2 and scalar forms agree bit for bit.
//
// VNNI: VPDPBUSD multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products to an
// int32 lane: 64 multiply-adds per instruction, twice VDPBF16PS's 32. The weights are the
// unsigned operand (q + 128, one 64-byte load holds 4 inputs of 16 columns), the activations
// the signed one (4 bytes broadcast to every lane), and each group's sum starts from
// -128 * (the block's sum of q), so P = sum q_w * q_x exactly. A register tile is up to 4
// rows x 32 columns: 8 int32 sums for the group in flight and 8 fp32 accumulators.
// AVX2 (no VNNI): VPMADDUBSW on |q_w| and q_x with q_w's sign (pairs stay within int16 for
// |q| <= 127), then VPMADDWD by ones: the same P.
//
// Work is shared as the bf16 GEMMs share it (deal.h): items are row blocks x panels,
// block-major; each thread walks its panels in memory order.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "deal.h"
#include "int8_gemm.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

constexpr int64_t kCols = kInt8PanelCols;
constexpr int kRows = 4;                     // rows per register tile
constexpr int64_t kBlockBytes = 256 * 1024;  // quantized activations per row block

enum Isa : int { kAuto = -1, kVnni512 = 0, kAvx2 = 1, kScalar = 2 };
const char* const kIsaNames[] = {"avx512_vnni", "avx2", "scalar"};

Isa best_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return kVnni512;
#elif defined(__AVX2__)
  return kAvx2;
#else
  return kScalar;
#endif
}

std::atomic<int> g_isa{kAuto};  // set_int8_gemm_isa (a test hook)

Isa active_isa() {
  const int isa = g_isa.load(std::memory_order_relaxed);
  return isa == kAuto ? best_isa() : static_cast<Isa>(isa);
}

inline int64_t padded_k(int64_t K) { return (K + 63) / 64 * 64; }

// Activations of one call: row m's int8 values at a + m * Kp (zero past K), group g's scale
// at dx[m * groups + g] and -128 * its sum of q at comp[m * groups + g].
struct Acts {
  const int8_t* a;
  const float* dx;
  const int32_t* comp;
  int64_t Kp, groups, G;
};

// Row x[0:K] quantized per block of G to q = round_even(x * (1 / dx)), dx = max |block| / 127.
template <typename X>
void quantize_row(const X* x, int64_t K, int64_t Kp, int64_t G, float* buf, int8_t* a,
                  float* dx, int32_t* comp) {
  vec::widen(x, buf, K);
  std::fill(buf + K, buf + Kp, 0.0f);
  for (int64_t k0 = 0; k0 < Kp; k0 += G) {
    const int64_t g = k0 / G;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < G; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(buf + k0 + i)));
    const float amax = _mm512_reduce_max_ps(mx);
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < G; i += 16) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buf + k0 + i), vid));
      q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + k0 + i), _mm512_cvtepi32_epi8(q));
    }
    const int32_t total = _mm512_reduce_add_epi32(sum);
#else
    float amax = 0.0f;
    for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::abs(buf[k0 + i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t total = 0;
    for (int64_t i = 0; i < G; ++i) {
      const int q = std::clamp(static_cast<int>(std::nearbyint(buf[k0 + i] * id)), -127, 127);
      a[k0 + i] = static_cast<int8_t>(q);
      total += q;
    }
#endif
    dx[g] = d;
    comp[g] = -128 * total;
  }
}

// sums[r * kCols + j] for rows m0 .. m0 + R - 1 and the panel's columns j (panel: [Kp / 4]
// [kCols][4] bytes, scales [groups][kCols]).
using TileFn = void (*)(const Acts&, int64_t, const uint8_t*, const float*, float*);

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// acc += VPDPBUSD(u, b) in place. NOTE: with the intrinsic, GCC copied each of the tile's int32
// sums to another register and back around every instruction (16 moves per 8 products).
inline void dpbusd(__m512i& acc, __m512i u, __m512i b) {
  asm("vpdpbusd %[b], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [b] "v"(b));
}

template <int R>
void tile_vnni(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums) {
  const int64_t G4 = A.G / 4;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int8_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = A.a + (m0 + r) * A.Kp;
  for (int64_t g = 0; g < A.groups; ++g) {
    __m512i p[R][2];
    for (int r = 0; r < R; ++r) {
      p[r][0] = p[r][1] = _mm512_set1_epi32(A.comp[(m0 + r) * A.groups + g]);
    }
    const uint8_t* w = panel + g * G4 * kCols * 4;
    const int64_t k0 = g * A.G;
    for (int64_t k4 = 0; k4 < G4; ++k4) {
      const __m512i w0 = _mm512_loadu_si512(w + k4 * 128);
      const __m512i w1 = _mm512_loadu_si512(w + k4 * 128 + 64);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, a[r] + k0 + 4 * k4, 4);
        const __m512i b = _mm512_set1_epi32(quad);
        dpbusd(p[r][0], w0, b);
        dpbusd(p[r][1], w1, b);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(ps + g * kCols), s1 = _mm512_loadu_ps(ps + g * kCols + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(A.dx[(m0 + r) * A.groups + g]);
      acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[r][0]), _mm512_mul_ps(s0, d), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[r][1]), _mm512_mul_ps(s1, d), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(sums + r * kCols, acc[r][0]);
    _mm512_storeu_ps(sums + r * kCols + 16, acc[r][1]);
  }
}
#endif

#if defined(__AVX2__)
template <int R>
void tile_avx2(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums) {
  const int64_t G4 = A.G / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < A.groups; ++g) {
    __m256i p[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) p[r][c] = _mm256_setzero_si256();
    const uint8_t* w = panel + g * G4 * kCols * 4;
    const int64_t k0 = g * A.G;
    for (int64_t k4 = 0; k4 < G4; ++k4) {
      __m256i ws[4], aw[4];
      for (int c = 0; c < 4; ++c) {
        const __m256i u =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k4 * 128 + 32 * c));
        ws[c] = _mm256_xor_si256(u, sign_bit);  // q as int8
        aw[c] = _mm256_abs_epi8(ws[c]);
      }
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, A.a + (m0 + r) * A.Kp + k0 + 4 * k4, 4);
        const __m256i b = _mm256_set1_epi32(quad);
        for (int c = 0; c < 4; ++c) {
          const __m256i pairs = _mm256_maddubs_epi16(aw[c], _mm256_sign_epi8(b, ws[c]));
          p[r][c] = _mm256_add_epi32(p[r][c], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_set1_ps(A.dx[(m0 + r) * A.groups + g]);
      for (int c = 0; c < 4; ++c) {
        const __m256 s = _mm256_loadu_ps(ps + g * kCols + 8 * c);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r][c]), _mm256_mul_ps(s, d), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(sums + r * kCols + 8 * c, acc[r][c]);
}
#endif

template <int R>
void tile_scalar(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums) {
  for (int r = 0; r < R; ++r) {
    const int8_t* a = A.a + (m0 + r) * A.Kp;
    for (int64_t j = 0; j < kCols; ++j) {
      float acc = 0.0f;
      for (int64_t g = 0; g < A.groups; ++g) {
        int32_t p = 0;
        for (int64_t k = g * A.G; k < (g + 1) * A.G; ++k) {
          p += (static_cast<int32_t>(panel[(k / 4 * kCols + j) * 4 + k % 4]) - 128) * a[k];
        }
        const float scale = ps[g * kCols + j] * A.dx[(m0 + r) * A.groups + g];
        acc = std::fma(static_cast<float>(p), scale, acc);
      }
      sums[r * kCols + j] = acc;
    }
  }
}

TileFn tile_fn(Isa isa, int rows) {
#define PAGEDLLM_TILES(tile)                                    \
  switch (rows) {                                               \
    case 1: return tile<1>;                                     \
    case 2: return tile<2>;                                     \
    case 3: return tile<3>;                                     \
    default: return tile<kRows>;                                \
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == kVnni512) PAGEDLLM_TILES(tile_vnni)
#endif
#if defined(__AVX2__)
  if (isa == kAvx2) PAGEDLLM_TILES(tile_avx2)
#endif
  (void)isa;
  PAGEDLLM_TILES(tile_scalar)
#undef PAGEDLLM_TILES
}

// Rows m0 .. m0 + R - 1, columns n0 .. n0 + width - 1 of out = sums + bias (0 without).
template <typename O>
void store_tile(O* out, int64_t ldo, int64_t m0, int R, int64_t n0, int64_t width,
                const float* sums, const float* bias) {
  for (int r = 0; r < R; ++r) {
    O* row = out + (m0 + r) * ldo + n0;
    const float* s = sums + r * kCols;
    int64_t j = 0;
    for (; j + vec::kLanes <= width; j += vec::kLanes) {
      const vec::vfloat b = bias ? vec::load(bias + n0 + j) : vec::splat(0.0f);
      vec::store(row + j, vec::load(s + j) + b);
    }
    for (; j < width; ++j) vec::store1(row, j, s[j] + (bias ? bias[n0 + j] : 0.0f));
  }
}

template <typename O, typename X>
void run_panels(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
                const uint8_t* bytes, const float* scales, int64_t groups, const float* bias) {
  const int64_t Kp = padded_k(K), G = Kp / groups;
  std::vector<int8_t> a(M * Kp);
  std::vector<float> dx(M * groups);
  std::vector<int32_t> comp(M * groups);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(Kp);
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(x + m * ldx, K, Kp, G, buf.data(), a.data() + m * Kp, dx.data() + m * groups,
                   comp.data() + m * groups);
    }
  });
  const Acts acts{a.data(), dx.data(), comp.data(), Kp, groups, G};
  const Isa isa = active_isa();
  const TileFn tiles[kRows + 1] = {nullptr, tile_fn(isa, 1), tile_fn(isa, 2), tile_fn(isa, 3),
                                   tile_fn(isa, 4)};
  const int64_t num_panels = (N + kCols - 1) / kCols;
  // NOTE: the row block depends on K alone; no output depends on it (or on the tile) anyway.
  const int64_t mb = std::max<int64_t>(kRows, kBlockBytes / Kp / kRows * kRows);
  const int64_t num_items = (M + mb - 1) / mb * num_panels;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
  const auto make_state = [&] { return std::vector<uint8_t>(); };
  deal_in_memory_order(num_items, num_threads, make_state,
                       [&](std::vector<uint8_t>& tail, int64_t item) {
    const int64_t m_begin = item / num_panels * mb, m_end = std::min(M, m_begin + mb);
    const int64_t p = item % num_panels, n0 = p * kCols, width = std::min(kCols, N - n0);
    const uint8_t* panel = bytes + n0 * Kp;
    if (width < kCols) {  // the last panel, narrower: widened with zero weights (q + 128)
      tail.assign(kCols * Kp, 128);
      for (int64_t k4 = 0; k4 < Kp / 4; ++k4) {
        std::memcpy(tail.data() + k4 * kCols * 4, panel + k4 * width * 4, width * 4);
      }
      panel = tail.data();
    }
    const float* ps = scales + p * groups * kCols;
    alignas(64) float sums[kRows * kCols];
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
      const int R = static_cast<int>(std::min<int64_t>(kRows, m_end - m0));
      tiles[R](acts, m0, panel, ps, sums);
      store_tile(out, ldo, m0, R, n0, width, sums, bias);
    }
  });
}

// The test hook's path: each output the fp64 sum over k of float(ws * q) * x, in order.
template <typename O, typename X>
void run_float(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
               const uint8_t* bytes, const float* scales, int64_t groups, const float* bias) {
  const int64_t Kp = padded_k(K), G = Kp / groups;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t p = n / kCols, j = n % kCols, width = std::min(kCols, N - p * kCols);
      const uint8_t* panel = bytes + p * kCols * Kp;
      for (int64_t k = 0; k < K; ++k) {
        const int q = static_cast<int>(panel[(k / 4 * width + j) * 4 + k % 4]) - 128;
        w[k] = scales[(p * groups + k / G) * kCols + j] * static_cast<float>(q);
      }
      for (int64_t m = 0; m < M; ++m) {
        double sum = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          sum += static_cast<double>(w[k]) * static_cast<double>(vec::load1(x + m * ldx, k));
        }
        vec::store1(out + m * ldo, n, static_cast<float>(sum) + (bias ? bias[n] : 0.0f));
      }
    }
  });
}

std::string int8_gemm_isa() { return kIsaNames[active_isa()]; }

// "auto" (the best this build has), "avx512_vnni", "avx2" or "scalar"; a test hook.
void set_int8_gemm_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(kAuto);
    return;
  }
  for (int isa = 0; isa < 3; ++isa) {
    if (name != kIsaNames[isa]) continue;
    TORCH_CHECK(isa >= best_isa(), "this build has no ", name, " kernel (best: ",
                kIsaNames[best_isa()], ")");
    g_isa.store(isa);
    return;
  }
  TORCH_CHECK(false, "unknown kernel ", name, "; expected auto, avx512_vnni, avx2 or scalar");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> int8_panels_from_rows(const at::Tensor& bytes,
                                                         const at::Tensor& scales) {
  TORCH_CHECK(bytes.dim() == 2 && bytes.scalar_type() == at::kByte && bytes.is_contiguous() &&
                  bytes.size(1) % 64 == 0,
              "bytes must be pack_int8_weight's rows");
  const int64_t N = bytes.size(0), Kp = bytes.size(1);
  const at::Tensor s = scales.dim() == 1 ? scales.unsqueeze(1) : scales;
  TORCH_CHECK(s.dim() == 2 && s.size(0) == N && s.scalar_type() == at::kFloat &&
                  Kp % s.size(1) == 0 && Kp / s.size(1) % 16 == 0,
              "scales must be pack_int8_weight's");
  const int64_t groups = s.size(1), num_panels = (N + kCols - 1) / kCols;
  at::Tensor packed = at::empty({N, Kp}, bytes.options());
  at::Tensor packed_scales = at::zeros({num_panels, groups, kCols}, s.options());
  const uint8_t* src = bytes.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  const at::Tensor sc = s.contiguous();
  const float* ssrc = sc.data_ptr<float>();
  float* sdst = packed_scales.data_ptr<float>();
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kCols, width = std::min(kCols, N - n0);
      uint8_t* panel = dst + n0 * Kp;
      for (int64_t j = 0; j < width; ++j) {
        const uint8_t* row = src + (n0 + j) * Kp;
        for (int64_t k = 0; k < Kp; ++k) panel[(k / 4 * width + j) * 4 + k % 4] = row[k];
        for (int64_t g = 0; g < groups; ++g) {
          sdst[(p * groups + g) * kCols + j] = ssrc[(n0 + j) * groups + g];
        }
      }
    }
  });
  return {packed, packed_scales};
}

void int8_panel_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& bytes,
                       const at::Tensor& scales, const float* bias, bool quantize_activations) {
  const int64_t M = x.size(0), K = x.size(1), N = bytes.size(0), Kp = padded_k(K);
  TORCH_CHECK(bytes.dim() == 2 && bytes.scalar_type() == at::kByte && bytes.is_contiguous() &&
                  bytes.size(1) == Kp,
              "the int8 weight must come from pack_int8_panels for ", K, " inputs");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && scales.size(0) == (N + kCols - 1) / kCols &&
                  scales.size(2) == kCols && scales.size(1) > 0 && Kp % scales.size(1) == 0 &&
                  Kp / scales.size(1) % 16 == 0,
              "scales must be pack_int8_panels' [panels, groups, 32]");
  TORCH_CHECK(x.device().is_cpu() && x.stride(1) == 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be 2-D fp32/bf16 CPU with a contiguous last dim");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be fp32/bf16 [M, N] with a contiguous last dim");
  if (M == 0 || N == 0) return;
  const int64_t groups = scales.size(1);
  const uint8_t* wp = bytes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const auto with_x = [&](auto* op) {
    const int64_t ldo = out.stride(0), ldx = x.stride(0);
    const auto go = [&](const auto* xp) {
      if (quantize_activations) run_panels(op, ldo, xp, ldx, M, N, K, wp, sp, groups, bias);
      else run_float(op, ldo, xp, ldx, M, N, K, wp, sp, groups, bias);
    };
    if (x.scalar_type() == at::kFloat) go(x.data_ptr<float>());
    else go(reinterpret_cast<const vec::bf16_t*>(x.data_ptr()));
  };
  if (out.scalar_type() == at::kFloat) with_x(out.data_ptr<float>());
  else with_x(reinterpret_cast<vec::bf16_t*>(out.data_ptr()));
}

}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("int8_gemm_isa() -> str", &pagedllm::quant::int8_gemm_isa);
  m.def("set_int8_gemm_isa(str name) -> ()", &pagedllm::quant::set_int8_gemm_isa);
}
