// SIMD helpers for pagedllm's CPU ops, written with GCC vector extensions: a vector is
// 8 fp32 lanes (AVX2, or 2 x SSE) or 16 (AVX-512), so one source builds for any -march.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace pagedllm::vec {

#ifndef PA_LANES  // overridable, e.g. to test the 16-lane code on an AVX2 machine
#if defined(__AVX512F__)
#define PA_LANES 16
#else
#define PA_LANES 8
#endif
#endif
constexpr int kLanes = PA_LANES;

using bf16_t = uint16_t;  // raw bfloat16 bits
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vuint __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vbf16 __attribute__((vector_size(kLanes * 2)));
typedef float vfloat4 __attribute__((vector_size(16)));
constexpr float kInf = std::numeric_limits<float>::infinity();

// NOTE: x - 0, not 0 + x: the compiler may drop x - 0 (exact even for -0), but must keep the
// add (0 + -0 is +0), which would cost a dependent scalar add before every broadcast.
inline vfloat splat(float x) { return x - vfloat{}; }

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vfloat load(const bf16_t* p) {
#if PA_LANES == 8 && defined(__AVX2__)
  // NOTE: GCC lowers the generic widening below to two 128-bit halves and a lane insert (4
  // instructions plus the shift); one vpmovzxwd from memory does it.
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vfloat>(_mm256_slli_epi32(w, 16));
#elif PA_LANES == 16 && defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<vfloat>(_mm512_slli_epi32(w, 16));
#else
  vbf16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vuint) << 16);
#endif
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline float bf16_to_float(bf16_t x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16.
inline bf16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  return static_cast<bf16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// float_to_bf16 on every lane: the bf16 bits, widened to 32-bit lanes.
inline vuint to_bf16_bits(vfloat v) {
  const vuint u = reinterpret_cast<vuint>(v);
  const vuint rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? vuint{} + 0x7FC0u : rounded;
}

// The float value a bf16 store of v keeps.
inline vfloat round_bf16(vfloat v) { return reinterpret_cast<vfloat>(to_bf16_bits(v) << 16); }

inline void store(bf16_t* p, vfloat v) {
  const vbf16 h = __builtin_convertvector(to_bf16_bits(v), vbf16);
  std::memcpy(p, &h, sizeof h);
}

// A GEMM's output row: out[0:width] = sums + bias (bias may be null), in out's dtype. A full
// row of kWidth columns without bias is stored in vectors; any other row one value at a time.
template <int64_t kWidth>
inline void store_sums(float* out, const float* sums, const float* bias, int64_t width) {
  for (int64_t j = 0; j < width; ++j) out[j] = sums[j] + (bias ? bias[j] : 0.0f);
}
template <int64_t kWidth>
inline void store_sums(bf16_t* out, const float* sums, const float* bias, int64_t width) {
  if (width == kWidth && !bias) {
    for (int64_t j = 0; j < kWidth; j += kLanes) store(out + j, load(sums + j));
    return;
  }
  for (int64_t j = 0; j < width; ++j) out[j] = float_to_bf16(sums[j] + (bias ? bias[j] : 0.0f));
}

// Element i of an fp32 or bf16 array, as fp32.
inline float load1(const float* p, int64_t i) { return p[i]; }
inline float load1(const bf16_t* p, int64_t i) { return bf16_to_float(p[i]); }
// Element i of an fp32 or bf16 array = x (rounded to nearest even for bf16).
inline void store1(float* p, int64_t i, float x) { p[i] = x; }
inline void store1(bf16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }

// dst[0:n] = src[0:n] as fp32 (a copy for fp32, exact widening for bf16).
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = load1(src, i);
}

inline vfloat4 low_quarter(vfloat v) {
#if PA_LANES == 16
  typedef float vfloat8 __attribute__((vector_size(32)));
  const vfloat8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
  return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#endif
}

inline float hsum(vfloat v) {
  vfloat4 s = low_quarter(v);
  s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s += __builtin_shufflevector(s, s, 1, 0, 3, 2);
  return s[0];
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) in fp32, Cephes-style: 2^n * p(r), ~1 ulp; exactly 0 below -87 (and for -inf).
inline vfloat vexp(vfloat x) {
  const vint underflow = x < splat(-87.0f);
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  // Adding 1.5 * 2^23 rounds x * log2(e) to an integer n, held in the low mantissa bits.
  const vfloat shifted = x * 1.44269504088896341f + 12582912.0f;
  const vfloat n = shifted - 12582912.0f;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vint e = (reinterpret_cast<vint>(shifted) - 0x4B400000 + 127) << 23;
  const vfloat result = p * reinterpret_cast<vfloat>(e);
  return underflow ? splat(0.0f) : result;
}

// The value a torch op storing into T keeps: rounded to bf16 for bf16, unchanged for fp32.
template <typename T>
inline vfloat round_as(vfloat v) {
  if constexpr (std::is_same_v<T, bf16_t>) return round_bf16(v);
  return v;
}
template <typename T>
inline float round_as(float x) {
  if constexpr (std::is_same_v<T, bf16_t>) return bf16_to_float(float_to_bf16(x));
  return x;
}

// SwiGLU's gate silu(g) * u as computed in T: silu is rounded to T first, as the reference
// models round their activation's output. The silu_and_mul op and the gated GEMM input both
// use it, so their results agree bit for bit.
template <typename T>
inline vfloat silu_mul(vfloat g, vfloat u) {
  return round_as<T>(g / (1.0f + vexp(-g))) * u;
}
template <typename T>
inline float silu_mul(float g, float u) {
  return round_as<T>(g / (1.0f + std::exp(-g))) * u;
}

// a * b + c, rounded once, on every lane.
inline vfloat fma(vfloat a, vfloat b, vfloat c) {
#if PA_LANES == 16 && defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                                  reinterpret_cast<__m512>(b),
                                                  reinterpret_cast<__m512>(c)));
#elif PA_LANES == 8 && defined(__FMA__)
  return reinterpret_cast<vfloat>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a),
                                                  reinterpret_cast<__m256>(b),
                                                  reinterpret_cast<__m256>(c)));
#else
  vfloat r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// [sum(a0), sum(a1), sum(a2), sum(a3)]: four horizontal sums in one transposing tree. Each sums
// its vector's lanes l as b_l = a_l (+ a_{l + 8} with 16 lanes), then ((b0 + b1) + (b2 + b3)) +
// ((b4 + b5) + (b6 + b7)) (the attention kernel's GEMM form adds its partial sums so).
inline vfloat4 reduce4(vfloat a0, vfloat a1, vfloat a2, vfloat a3) {
  typedef float vfloat8 __attribute__((vector_size(32)));
#if PA_LANES == 16
  const auto fold = [](vfloat v) -> vfloat8 {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  };
  const vfloat8 b0 = fold(a0), b1 = fold(a1), b2 = fold(a2), b3 = fold(a3);
#else
  const vfloat8 b0 = a0, b1 = a1, b2 = a2, b3 = a3;
#endif
  // Pairwise sums within each 128-bit half (the vhaddps pattern), twice.
  const auto hadd = [](vfloat8 x, vfloat8 y) -> vfloat8 {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vfloat8 h = hadd(hadd(b0, b1), hadd(b2, b3));  // [s0 s1 s2 s3 | s0' s1' s2' s3']
  return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
}

}  // namespace pagedllm::vec
