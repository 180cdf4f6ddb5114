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
// -128 * (the block's sum of q), so P = sum q_w * q_x exactly. A register tile is up to 5
// rows x 32 columns: 10 int32 sums for the group in flight and 10 fp32 accumulators.
// NOTE: on Zen 5 (2 VPDPBUSD a cycle) the group's epilogue (convert, multiply, fma per 16
// outputs, every G / 4 VPDPBUSD) caps the tile at about 80% of the VNNI peak; in L1, groups
// of 32, K = 576: 4 rows 770-790 GOP/s on one core, 5 rows 800-830 (6 spill: 780-800).
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
constexpr int kRows = 5;                     // rows per register tile
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
// at dx[m * groups + g] and -128 * its sum of q at comp[m * groups + g]. A tile sums
// `vgroups` products in order, product v of activation group v >> ashift and weight group
// v >> wshift with weight scale v: 8-bit activations and weights, both shifts 0; 16-bit
// activations (ashift 0, wshift 1), each weight group times its activations' high plane
// (group 2g of the row, Kp twice the weight's) then low one (2g + 1; q = 255 * high + low,
// int8_gemm.h); 16-bit weights (ashift 1, wshift 0), each activation group times the
// weight's high plane then its residual one (weight groups 2g, 2g + 1).
struct Acts {
  const int8_t* a;
  const float* dx;
  const int32_t* comp;
  int64_t Kp, groups, G, vgroups;
  int ashift, wshift;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The shuffle tree of reduce16, its lanes in the tree's order.
template <typename Op>
__attribute__((always_inline)) inline __m512 reduce16_tree(__m512* v, const Op& op) {
  // 16 -> 8: lanes 0-7 of each reduce one vector, 8-15 the next.
  for (int j = 0; j < 8; ++j) {
    v[j] = op(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
              _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  }
  // 8 -> 4: a 128-bit lane per vector.
  for (int j = 0; j < 4; ++j) {
    v[j] = op(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x88),
              _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xDD));
  }
  // 4 -> 2 -> 1: within 128-bit lanes.
  for (int j = 0; j < 2; ++j) {
    v[j] = op(_mm512_shuffle_ps(v[2 * j], v[2 * j + 1], 0x44),
              _mm512_shuffle_ps(v[2 * j], v[2 * j + 1], 0xEE));
  }
  return op(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}
#endif

// Row x[0:K] (zero past K, up to Kp) quantized per block of G inputs (a multiple of 16) to
// q = round_even(x * (1 / dx)), dx = max |block| / 127, with comp = -128 * the block's sum of
// q. Scalar form:
template <typename X>
void quantize_row_scalar(const X* x, int64_t K, int64_t Kp, int64_t G, int8_t* a, float* dx,
                         int32_t* comp) {
  const auto value = [&](int64_t k) { return k < K ? vec::load1(x, k) : 0.0f; };
  for (int64_t k0 = 0; k0 < Kp; k0 += G) {
    float amax = 0.0f;
    for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::abs(value(k0 + i)));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t total = 0;
    for (int64_t i = 0; i < G; ++i) {
      const int q = std::clamp(static_cast<int>(std::nearbyint(value(k0 + i) * id)), -127, 127);
      a[k0 + i] = static_cast<int8_t>(q);
      total += q;
    }
    dx[k0 / G] = d;
    comp[k0 / G] = -128 * total;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// x[i] for the lanes i < n (0 in the rest) as fp32.
inline __m512 load16(const float* x, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(x)
                 : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), x);
}
inline __m512 load16(const vec::bf16_t* x, int64_t n) {
  const __m256i bits =
      n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))
              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// v[0..15] -> one vector whose lane j is op over v[j]'s 16 lanes, by a tree of shuffles that
// pairs vectors (4 levels, 45 instructions for 16 reductions, against ~8 each one by one).
// For max and integer sums (exact in any order) the values are those of one-by-one
// reductions.
template <typename Op>
__attribute__((always_inline)) inline __m512 reduce16(__m512* v, const Op& op) {
  static const __m512i order = [] {  // the tree's lane of each vector's reduction
    __m512 probe[16];
    for (int j = 0; j < 16; ++j) probe[j] = _mm512_set1_ps(static_cast<float>(j));
    __m512 lanes = reduce16_tree(probe, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
    alignas(64) float at[16];
    _mm512_store_ps(at, lanes);
    alignas(64) int32_t index[16];
    for (int k = 0; k < 16; ++k) index[static_cast<int>(at[k])] = k;
    return _mm512_load_si512(index);
  }();
  return _mm512_permutexvar_ps(order, reduce16_tree(v, op));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Blocks g0 .. g0 + nb - 1 (nb <= 16) of a row, V vectors of 16 inputs each (V = G / 16; 0:
// G / 16 read from `G`); `full`: every input of them lies below K (no masked loads).
template <int V, bool kFull, typename X>
inline void quantize_blocks(const X* x, int64_t K, int64_t G, int64_t g0, int nb, int8_t* a,
                            float* dx, int32_t* comp) {
  const int64_t vectors = V > 0 ? V : G / 16;
  const auto load = [&](int64_t k) {
    return load16(x + k, kFull ? 16 : std::clamp<int64_t>(K - k, 0, 16));
  };
  const auto fmax = [](__m512 u, __m512 v) { return _mm512_max_ps(u, v); };
  const auto iadd = [](__m512 u, __m512 v) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(u), _mm512_castps_si512(v)));
  };
  __m512 v[16];
  for (int j = 0; j < 16; ++j) {
    __m512 mx = _mm512_setzero_ps();
    if (j < nb) {
      const int64_t k0 = (g0 + j) * G;
      for (int64_t i = 0; i < vectors; ++i) {
        mx = _mm512_max_ps(mx, _mm512_abs_ps(load(k0 + 16 * i)));
      }
    }
    v[j] = mx;
  }
  const __m512 d = _mm512_div_ps(reduce16(v, fmax), _mm512_set1_ps(127.0f));
  const __mmask16 nonzero = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  alignas(64) float id[16];
  _mm512_store_ps(id, _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0f), d));
  const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1);
  _mm512_mask_storeu_ps(dx + g0, valid, d);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int j = 0; j < 16; ++j) {
    __m512i sum = _mm512_setzero_si512();
    if (j < nb) {
      const int64_t k0 = (g0 + j) * G;
      const __m512 vid = _mm512_set1_ps(id[j]);
      for (int64_t i = 0; i < vectors; ++i) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load(k0 + 16 * i), vid));
        q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a + k0 + 16 * i), _mm512_cvtepi32_epi8(q));
      }
    }
    v[j] = _mm512_castsi512_ps(sum);
  }
  const __m512i total = _mm512_castps_si512(reduce16(v, iadd));
  _mm512_mask_storeu_epi32(comp + g0, valid, _mm512_mullo_epi32(total, _mm512_set1_epi32(-128)));
}

template <int V, typename X>
void quantize_row_vector(const X* x, int64_t K, int64_t Kp, int64_t G, int8_t* a, float* dx,
                         int32_t* comp) {
  const int64_t groups = Kp / G;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int nb = static_cast<int>(std::min<int64_t>(16, groups - g0));
    if ((g0 + nb) * G <= K) {
      quantize_blocks<V, true>(x, K, G, g0, nb, a, dx, comp);
    } else {
      quantize_blocks<V, false>(x, K, G, g0, nb, a, dx, comp);
    }
  }
}
#endif

// The vector form: blocks 16 at a time, x read in place (twice, while in L1: the maxima, then
// the values), the 16 maxima and sums each by one reduce16; the same values as the scalar form.
template <typename X>
void quantize_row(const X* x, int64_t K, int64_t Kp, int64_t G, int8_t* a, float* dx,
                  int32_t* comp) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  switch (G) {
    case 16: return quantize_row_vector<1>(x, K, Kp, G, a, dx, comp);
    case 32: return quantize_row_vector<2>(x, K, Kp, G, a, dx, comp);
    case 64: return quantize_row_vector<4>(x, K, Kp, G, a, dx, comp);
    default: return quantize_row_vector<0>(x, K, Kp, G, a, dx, comp);
  }
#else
  quantize_row_scalar(x, K, Kp, G, a, dx, comp);
#endif
}

constexpr int kQ16Max = 127 * 255;  // 16-bit activations: q in -kQ16Max..kQ16Max

// Row x[0:K] quantized per block of G inputs to 16 bits: q = round_even(x * (1 / dx)), dx =
// max |block| / kQ16Max, split as q = 255 * h + l (h the nearest integer to q / 255: |l| <=
// 127), the block's h at a[2 * b * G ..] and its l at a[(2 b + 1) * G ..], each plane's dx and
// -128 * its sum at dx / comp[2 b], [2 b + 1].
template <typename X>
void quantize_row16(const X* x, int64_t K, int64_t Kp, int64_t G, int8_t* a, float* dx,
                    int32_t* comp) {
  const auto value = [&](int64_t k) { return k < K ? vec::load1(x, k) : 0.0f; };
  for (int64_t k0 = 0, b = 0; k0 < Kp; k0 += G, ++b) {
    float amax = 0.0f;
    for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::abs(value(k0 + i)));
    const float d = amax / static_cast<float>(kQ16Max), id = d != 0.0f ? 1.0f / d : 0.0f;
    int8_t* hi = a + 2 * b * G;
    int8_t* lo = hi + G;
    int32_t sum_hi = 0, sum_lo = 0;
    for (int64_t i = 0; i < G; ++i) {
      const int q = std::clamp(static_cast<int>(std::nearbyint(value(k0 + i) * id)), -kQ16Max,
                               kQ16Max);
      const int h = q >= 0 ? (q + 127) / 255 : -((127 - q) / 255);
      hi[i] = static_cast<int8_t>(h);
      lo[i] = static_cast<int8_t>(q - 255 * h);
      sum_hi += h;
      sum_lo += q - 255 * h;
    }
    dx[2 * b] = dx[2 * b + 1] = d;
    comp[2 * b] = -128 * sum_hi;
    comp[2 * b + 1] = -128 * sum_lo;
  }
}

// sums[r * kCols + j] for rows m0 .. m0 + R - 1 and the panel's columns j (panel: [Kp / 4]
// [kCols][4] bytes, scales [groups][kCols]).
// Fetches p's 64-byte lines begin .. end - 1 into L2.
inline void prefetch_lines(const uint8_t* p, int64_t begin, int64_t end) {
  for (int64_t line = begin; line < end; ++line) {
    _mm_prefetch(reinterpret_cast<const char*>(p + 64 * line), _MM_HINT_T1);
  }
}

// Lines a tile fetches into L2 per group as it goes (pf[0 : 64 * kPrefetchLines * groups]):
// the next panel's weights, fetched a few at a time between the group's products.
constexpr int64_t kPrefetchLines = 2;
using TileFn = void (*)(const Acts&, int64_t, const uint8_t*, const float*, float*,
                        const uint8_t* pf);

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// acc += VPDPBUSD(u, b) in place. NOTE: with the intrinsic, GCC copied each of the tile's int32
// sums to another register and back around every instruction (16 moves per 8 products).
inline void dpbusd(__m512i& acc, __m512i u, __m512i b) {
  asm("vpdpbusd %[b], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [b] "v"(b));
}

template <int R>
void tile_vnni(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums,
               const uint8_t* pf) {
  const int64_t G4 = A.G / 4;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int8_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = A.a + (m0 + r) * A.Kp;
  for (int64_t g = 0; g < A.vgroups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * kPrefetchLines * g), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * kPrefetchLines * g + 64), _MM_HINT_T1);
    const int64_t ag = g >> A.ashift;
    __m512i p[R][2];
    for (int r = 0; r < R; ++r) {
      p[r][0] = p[r][1] = _mm512_set1_epi32(A.comp[(m0 + r) * A.groups + ag]);
    }
    const uint8_t* w = panel + (g >> A.wshift) * G4 * kCols * 4;
    const int64_t k0 = ag * A.G;
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
      const __m512 d = _mm512_set1_ps(A.dx[(m0 + r) * A.groups + ag]);
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
void tile_avx2(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums,
               const uint8_t* pf) {
  const int64_t G4 = A.G / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < A.vgroups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * kPrefetchLines * g), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * kPrefetchLines * g + 64), _MM_HINT_T1);
    const int64_t ag = g >> A.ashift;
    __m256i p[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) p[r][c] = _mm256_setzero_si256();
    const uint8_t* w = panel + (g >> A.wshift) * G4 * kCols * 4;
    const int64_t k0 = ag * A.G;
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
      const __m256 d = _mm256_set1_ps(A.dx[(m0 + r) * A.groups + ag]);
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
void tile_scalar(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps, float* sums,
                 const uint8_t* pf) {
  (void)pf;
  for (int r = 0; r < R; ++r) {
    const int8_t* a = A.a + (m0 + r) * A.Kp;
    for (int64_t j = 0; j < kCols; ++j) {
      float acc = 0.0f;
      for (int64_t g = 0; g < A.vgroups; ++g) {
        const int64_t ag = g >> A.ashift;
        int32_t p = 0;
        const int64_t kw = (g >> A.wshift) * A.G - ag * A.G;  // the weight's input, less k
        for (int64_t k = ag * A.G; k < (ag + 1) * A.G; ++k) {
          p += (static_cast<int32_t>(panel[((k + kw) / 4 * kCols + j) * 4 + k % 4]) - 128) * a[k];
        }
        const float scale = ps[g * kCols + j] * A.dx[(m0 + r) * A.groups + ag];
        acc = std::fma(static_cast<float>(p), scale, acc);
      }
      sums[r * kCols + j] = acc;
    }
  }
}

// The AVX2 and scalar forms take up to 4 rows at a time: 5 as 4 + 1.
#define PAGEDLLM_UP_TO_4_ROWS(tile)                                                          \
  template <int R>                                                                          \
  void tile##_rows(const Acts& A, int64_t m0, const uint8_t* panel, const float* ps,        \
                   float* sums, const uint8_t* pf) {                      \
    if constexpr (R <= 4) {                                                                 \
      tile<R>(A, m0, panel, ps, sums, pf);                                                  \
    } else {                                                                                \
      tile<4>(A, m0, panel, ps, sums, pf);                                                  \
      tile<R - 4>(A, m0 + 4, panel, ps, sums + 4 * kCols, pf);                              \
    }                                                                                       \
  }
#if defined(__AVX2__)
PAGEDLLM_UP_TO_4_ROWS(tile_avx2)
#endif
PAGEDLLM_UP_TO_4_ROWS(tile_scalar)
#undef PAGEDLLM_UP_TO_4_ROWS
static_assert(kRows <= 8, "the AVX2 and scalar forms split a tile in two at most");

TileFn tile_fn(Isa isa, int rows) {
#define PAGEDLLM_TILES(tile)                                    \
  switch (rows) {                                               \
    case 1: return tile<1>;                                     \
    case 2: return tile<2>;                                     \
    case 3: return tile<3>;                                     \
    case 4: return tile<4>;                                     \
    default: return tile<kRows>;                                \
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == kVnni512) PAGEDLLM_TILES(tile_vnni)
#endif
#if defined(__AVX2__)
  if (isa == kAvx2) PAGEDLLM_TILES(tile_avx2_rows)
#endif
  (void)isa;
  PAGEDLLM_TILES(tile_scalar_rows)
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

// planes 2: 16-bit activations (scales [panels, groups, 2, 32]: 255 * ws, ws); wplanes 2:
// 16-bit weights (bytes [N, 2 Kp]: each group's high plane, then its residual's; scales
// [panels, groups, 2, 32]: theirs).
template <typename O, typename X>
void run_panels(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
                const uint8_t* bytes, const float* scales, int64_t groups, const float* bias,
                int planes, int wplanes) {
  const int64_t G = padded_k(K) / groups;
  const int64_t Kw = padded_k(K) * wplanes;  // bytes per weight column
  const int64_t vgroups = groups * planes * wplanes;
  // The activations' row and groups (16 bits: two planes of each weight group).
  const int64_t Kp = padded_k(K) * planes;
  groups *= planes;
  // The quantized activations, in buffers kept by the calling thread between calls (a fresh
  // prefill-sized allocation is mapped and faulted in page by page every call).
  // (Pointers taken here: inside the parallel regions a thread_local names the worker's own.)
  thread_local std::vector<int8_t> a_buffer;
  thread_local std::vector<float> dx_buffer;
  thread_local std::vector<int32_t> comp_buffer;
  if (static_cast<int64_t>(a_buffer.size()) < M * Kp) a_buffer.resize(M * Kp);
  if (static_cast<int64_t>(dx_buffer.size()) < M * groups) {
    dx_buffer.resize(M * groups);
    comp_buffer.resize(M * groups);
  }
  int8_t* const a = a_buffer.data();
  float* const dx = dx_buffer.data();
  int32_t* const comp = comp_buffer.data();
  // A decode step's rows (~0.1 ns an input) are quantized on the calling thread: sharing them
  // would cost a fork and join per call, about what they take.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / Kp);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (planes == 2) {
        quantize_row16(x + m * ldx, K, Kp / 2, G, a + m * Kp, dx + m * groups,
                       comp + m * groups);
      } else {
        quantize_row(x + m * ldx, K, Kp, G, a + m * Kp, dx + m * groups, comp + m * groups);
      }
    }
  });
  const Acts acts{a, dx, comp, Kp, groups, G, vgroups, wplanes == 2 ? 1 : 0,
                  planes == 2 ? 1 : 0};
  const Isa isa = active_isa();
  TileFn tiles[kRows + 1] = {nullptr};
  for (int r = 1; r <= kRows; ++r) tiles[r] = tile_fn(isa, r);
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
    const uint8_t* panel = bytes + n0 * Kw;
    if (width < kCols) {  // the last panel, narrower: widened with zero weights (q + 128)
      tail.assign(kCols * Kw, 128);
      for (int64_t k4 = 0; k4 < Kw / 4; ++k4) {
        std::memcpy(tail.data() + k4 * kCols * 4, panel + k4 * width * 4, width * 4);
      }
      panel = tail.data();
    }
    const float* ps = scales + p * vgroups * kCols;
    // The next panel in memory (this thread's next item) is fetched into L2 while this one is
    // computed, kPrefetchLines per group of each tile: at a few dozen rows the first tile
    // otherwise waits on memory for each line of its panel. Where the tiles would cover less
    // than half of it (a few rows) the hardware's prefetcher is left to stream it: a burst
    // of the rest stalled on the misses in flight (1-3 rows 20-40% slower). Tiles with
    // nothing to fetch fetch their own panel's lines, in cache by then.
    const int64_t num_tiles = (m_end - m_begin + kRows - 1) / kRows;
    const int64_t per_tile = kPrefetchLines * vgroups;
    const uint8_t* next = panel;
    int64_t next_lines = per_tile;
    if (p + 1 < num_panels) {
      const int64_t lines = (std::min(kCols, N - n0 - kCols) * Kw + 63) / 64;
      if (2 * num_tiles * per_tile >= lines) next = bytes + (n0 + kCols) * Kw, next_lines = lines;
    }
    const int64_t last_first = std::max<int64_t>(0, next_lines - per_tile);
    alignas(64) float sums[kRows * kCols];
    for (int64_t m0 = m_begin, t = 0; m0 < m_end; m0 += kRows, ++t) {
      const int64_t first = std::min(t * per_tile, last_first);
      const int R = static_cast<int>(std::min<int64_t>(kRows, m_end - m0));
      tiles[R](acts, m0, panel, ps, sums, next + 64 * first);
      store_tile(out, ldo, m0, R, n0, width, sums, bias);
    }
  });
}

// The test hook's path: each output the fp64 sum over k of float(ws * q) * x, in order (ws
// the low plane's scale with 16-bit activations).
template <typename O, typename X>
void run_float(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, int64_t N, int64_t K,
               const uint8_t* bytes, const float* scales, int64_t groups, const float* bias,
               int planes, int wplanes) {
  const int64_t G = padded_k(K) / groups, Kp = padded_k(K) * wplanes;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t p = n / kCols, j = n % kCols, width = std::min(kCols, N - p * kCols);
      const uint8_t* panel = bytes + p * kCols * Kp;
      for (int64_t k = 0; k < K; ++k) {
        float wk = 0.0f;
        for (int e = 0; e < wplanes; ++e) {  // 16-bit weights: the high plane and residual
          const int64_t kv = (k / G * wplanes + e) * G + k % G;
          const int q = static_cast<int>(panel[(kv / 4 * width + j) * 4 + kv % 4]) - 128;
          wk += scales[((p * groups + k / G) * planes * wplanes + planes - 1 + e) * kCols + j] *
                static_cast<float>(q);
        }
        w[k] = wk;
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
  // [panels, groups, 32]: 8-bit activations; [panels, groups, 2, 32]: 16-bit activations, or
  // 16-bit weights where the bytes are twice as many (two planes of each group).
  const int wplanes = bytes.dim() == 2 && bytes.size(1) == 2 * Kp ? 2 : 1;
  const int planes = scales.dim() == 4 && wplanes == 1 ? 2 : 1;
  TORCH_CHECK(bytes.dim() == 2 && bytes.scalar_type() == at::kByte && bytes.is_contiguous() &&
                  bytes.size(1) == Kp * wplanes && (wplanes == 1 || scales.dim() == 4),
              "the int8 weight must come from pack_int8_panels for ", K, " inputs");
  TORCH_CHECK((scales.dim() == 3 || (scales.dim() == 4 && scales.size(2) == 2)) &&
                  scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && scales.size(0) == (N + kCols - 1) / kCols &&
                  scales.size(-1) == kCols && scales.size(1) > 0 && Kp % scales.size(1) == 0 &&
                  Kp / scales.size(1) % 16 == 0,
              "scales must be pack_int8_panels' [panels, groups, 32] (or [panels, groups, 2, 32] "
              "for 16-bit activations)");
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
      if (quantize_activations) {
        run_panels(op, ldo, xp, ldx, M, N, K, wp, sp, groups, bias, planes, wplanes);
      } else {
        run_float(op, ldo, xp, ldx, M, N, K, wp, sp, groups, bias, planes, wplanes);
      }
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
