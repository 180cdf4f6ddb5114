// The quantized linear kernel (quant.h): activations quantized per row in blocks of 32 (a
// scale per block) to int8 (as llama.cpp's Q8_0) or to 16-bit integers held as two int8 planes
// (q = 255 * hi + lo), times unpacked weight rows with integer dot products: AVX512-VNNI
// VPDPBUSD (64 values per instruction) or AVX2 VPMADDUBSW + VPMADDWD (32), scalar code
// elsewhere.
//
// Per output, lane l of a vector accumulator takes, for each 64-value chunk g in order,
//   acc += float(P) * (ws * dx) [+ wm * (dx * Q4)]
// where P is the lane's integer sum over its 4 values (u * q, plus zero * Q4: Q4 the lane's
// activation sum; with 16 bits, 255 * (u . hi) + u . lo, exact in int32), ws/wm the lane's
// half-block weight scale and minimum, dx the block's activation scale; the lanes are then
// summed in a fixed tree. A row's outputs therefore take the same operations in the same
// order whatever the row count and whichever tile computes them: the kernel is
// batch-invariant. (VPMADDUBSW saturates at int16: values up to 63 fit; Q8_0 and int8 weights
// go through its signed form, |q| times a with q's sign, instead.)
//
// Work is shared as the bf16 GEMMs share it (deal.h): items are row blocks x panels of 8
// weight rows, block-major; a thread unpacks an item's panel once and runs its rows in register
// tiles (up to 4 rows x 4 weight rows; few rows stream each weight row once).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "deal.h"
#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

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

std::atomic<int> g_isa{kAuto};  // set_quant_kernel_isa (a test hook)

Isa active_isa() {
  const int isa = g_isa.load(std::memory_order_relaxed);
  return isa == kAuto ? best_isa() : static_cast<Isa>(isa);
}

constexpr int64_t kPanel = 8;                   // weight rows per item
constexpr int64_t kRowBlockBytes = 256 * 1024;  // prepared activations per row block

// Activation rows quantized for one call. With 8 bits, a value is q * dx (q = a, int8); with
// 16 bits, q * dx with q = 255 * hi + lo (hi and lo int8 in -127..127: two planes of int8 that
// the same integer dot products multiply, then combined exactly in int32). Row m's values at
// a + m * Kp * planes, its 64-value chunk g at + 64 * planes * g (the hi plane, then the lo
// one); block scales at dx + m * Kp / 32, per-lane terms at aux + m * Kp / 4 (int32 zero * Q4
// for formats with a zero, float dx * Q4 for formats with a minimum; Q4 the lane's sum of q).
struct Acts {
  const int8_t* a;
  const float* dx;
  const int32_t* aux;
  int64_t Kp;
  int planes;  // 1: 8-bit activations, 2: 16-bit
};

// The weight rows of one panel, unpacked: row c's values at u[c], scales at ws[c], minimums at
// wm[c].
struct Panel {
  const uint8_t* u[kPanel];
  const float* ws[kPanel];
  const float* wm[kPanel];
};

constexpr int kQ16Max = 127 * 255;  // 16-bit activations: q in -kQ16Max..kQ16Max

// Row x quantized per block of 32 to q = round(x / dx) with dx = max |block| / qmax (qmax 127
// for 8 bits, kQ16Max for 16), laid out as Acts says (a: the row's Kp * planes bytes).
template <typename T>
void quantize_row(const T* x, int64_t K, int64_t Kp, const FormatInfo& info, int planes,
                  int8_t* a, float* dx, int32_t* aux) {
  const int qmax = planes == 2 ? kQ16Max : 127;
  for (int64_t b = 0; b < Kp / 32; ++b) {
    float v[32] = {};
    for (int64_t i = 0; i < 32 && b * 32 + i < K; ++i) v[i] = vec::load1(x, b * 32 + i);
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(v[i]));
    const float d = amax / static_cast<float>(qmax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    dx[b] = d;
    // Block b's values in its 64-value chunk's planes.
    int8_t* hi = a + b / 2 * 64 * planes + b % 2 * 32;
    for (int l = 0; l < 8; ++l) {
      int sum = 0;
      for (int e = 0; e < 4; ++e) {
        const int i = 4 * l + e;
        const int q = std::clamp(static_cast<int>(std::nearbyint(v[i] * id)), -qmax, qmax);
        if (planes == 2) {
          // q = 255 * h + lo, h the nearest integer to q / 255 (255 is odd: no ties), so
          // |lo| <= 127.
          const int h = q >= 0 ? (q + 127) / 255 : -((127 - q) / 255);
          hi[i] = static_cast<int8_t>(h);
          hi[64 + i] = static_cast<int8_t>(q - 255 * h);
        } else {
          hi[i] = static_cast<int8_t>(q);
        }
        sum += q;
      }
      if (info.has_min) {
        const float t = d * static_cast<float>(sum);
        std::memcpy(aux + b * 8 + l, &t, 4);
      } else {
        aux[b * 8 + l] = info.zero * sum;
      }
    }
  }
}

// Sums of a tile: sums[r * C + c] for rows r0 + r and panel rows c0 + c.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int R, int C, bool kZero, bool kMin, int kPlanes>
void tile_vnni(const Acts& A, int64_t r0, const Panel& P, int64_t c0, float* sums) {
  const int64_t G = A.Kp / 64;
  const __m512i block_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i half_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i ia[R], ib[R], init[R];
    __m512 dxl[R], dxa[R];
    for (int r = 0; r < R; ++r) {
      const int64_t m = r0 + r;
      const int8_t* am = A.a + (m * A.Kp + 64 * g) * kPlanes;
      ia[r] = _mm512_loadu_si512(am);
      if constexpr (kPlanes == 2) ib[r] = _mm512_loadu_si512(am + 64);
      const __m128 d2 = _mm_castsi128_ps(_mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(A.dx + m * (A.Kp / 32) + 2 * g)));
      dxl[r] = _mm512_permutexvar_ps(block_idx, _mm512_castps128_ps512(d2));
      const __m512i aux = _mm512_loadu_si512(A.aux + m * (A.Kp / 4) + 16 * g);
      init[r] = kZero ? aux : _mm512_setzero_si512();
      dxa[r] = _mm512_castsi512_ps(aux);
    }
    for (int c = 0; c < C; ++c) {
      const __m512i iu = _mm512_loadu_si512(P.u[c0 + c] + 64 * g);
      const __m512 wsl =
          _mm512_permutexvar_ps(half_idx, _mm512_castps128_ps512(_mm_loadu_ps(P.ws[c0 + c] + 4 * g)));
      __m512 wml = _mm512_setzero_ps();
      if constexpr (kMin) {
        wml = _mm512_permutexvar_ps(half_idx,
                                    _mm512_castps128_ps512(_mm_loadu_ps(P.wm[c0 + c] + 4 * g)));
      }
      for (int r = 0; r < R; ++r) {
        __m512i p;
        if constexpr (kPlanes == 2) {
          // 255 * (u . hi) + u . lo + zero * Q4, exact in int32.
          const __m512i ph = _mm512_dpbusd_epi32(_mm512_setzero_si512(), iu, ia[r]);
          p = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(ph, 8), ph),
                               _mm512_dpbusd_epi32(init[r], iu, ib[r]));
        } else {
          p = _mm512_dpbusd_epi32(init[r], iu, ia[r]);
        }
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(wsl, dxl[r]), acc[r][c]);
        if constexpr (kMin) acc[r][c] = _mm512_fmadd_ps(wml, dxa[r], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sums[r * C + c] = _mm512_reduce_add_ps(acc[r][c]);
}
#endif

#if defined(__AVX2__)
inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <int R, int C, bool kZero, bool kMin, bool kSigned, int kPlanes>
void tile_avx2(const Acts& A, int64_t r0, const Panel& P, int64_t c0, float* sums) {
  const int64_t G2 = A.Kp / 32;  // 32-value chunks
  const __m256i half_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G2; ++g) {
    __m256i ia[R], ib[R], init[R];
    __m256 dxl[R], dxa[R];
    for (int r = 0; r < R; ++r) {
      const int64_t m = r0 + r;
      const int8_t* am = A.a + (m * A.Kp + 64 * (g / 2)) * kPlanes + 32 * (g % 2);
      ia[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am));
      if constexpr (kPlanes == 2) {
        ib[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am + 64));
      }
      dxl[r] = _mm256_set1_ps(A.dx[m * (A.Kp / 32) + g]);
      const __m256i aux =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.aux + m * (A.Kp / 4) + 8 * g));
      init[r] = kZero && !kSigned ? aux : _mm256_setzero_si256();
      dxa[r] = _mm256_castsi256_ps(aux);
    }
    for (int c = 0; c < C; ++c) {
      __m256i iu = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P.u[c0 + c] + 32 * g));
      if constexpr (kSigned) iu = _mm256_xor_si256(iu, sign_bit);  // u - 128 = q as int8
      const __m256 wsl = _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_castsi128_ps(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.ws[c0 + c] + 2 * g)))),
          half_idx);
      __m256 wml = _mm256_setzero_ps();
      if constexpr (kMin) {
        wml = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_castsi128_ps(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.wm[c0 + c] + 2 * g)))),
            half_idx);
      }
      const __m256i abs_u = kSigned ? _mm256_abs_epi8(iu) : iu;
      for (int r = 0; r < R; ++r) {
        // (|a| <= 127: VPMADDUBSW's pairs stay within int16 for u <= 63 and for |q| <= 128.)
        const __m256i a = kSigned ? _mm256_sign_epi8(ia[r], iu) : ia[r];
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_u, a), ones);
        if constexpr (kPlanes == 2) {  // 255 * (u . hi) + u . lo, exact in int32
          const __m256i b = kSigned ? _mm256_sign_epi8(ib[r], iu) : ib[r];
          const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_u, b), ones);
          p = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(p, 8), p), pl);
        }
        p = _mm256_add_epi32(p, init[r]);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(wsl, dxl[r]), acc[r][c]);
        if constexpr (kMin) acc[r][c] = _mm256_fmadd_ps(wml, dxa[r], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sums[r * C + c] = hsum8(acc[r][c]);
}
#endif

// Portable: per half-block, float(P) * (ws * dx) [+ wm * (dx * S)] in order.
template <int R, int C, bool kZero, bool kMin, int kPlanes>
void tile_scalar(const Acts& A, int64_t r0, const Panel& P, int64_t c0, float* sums) {
  for (int r = 0; r < R; ++r) {
    const int64_t m = r0 + r;
    for (int c = 0; c < C; ++c) {
      const uint8_t* u = P.u[c0 + c];
      float acc = 0.0f;
      for (int64_t h = 0; h < A.Kp / 16; ++h) {
        const int8_t* a = A.a + (m * A.Kp + 64 * (h / 4)) * kPlanes + 16 * (h % 4);
        const float dx = A.dx[m * (A.Kp / 32) + h / 2];
        int p = 0;
        float dxs = 0.0f;
        for (int l = 0; l < 4; ++l) {
          const int32_t aux = A.aux[m * (A.Kp / 4) + 4 * h + l];
          if (kZero) p += aux;
          if (kMin) {
            float t;
            std::memcpy(&t, &aux, 4);
            dxs += t;
          }
        }
        for (int i = 0; i < 16; ++i) {
          const int q = kPlanes == 2 ? 255 * a[i] + a[64 + i] : a[i];
          p += u[16 * h + i] * q;
        }
        acc = std::fma(static_cast<float>(p), P.ws[c0 + c][h] * dx, acc);
        if (kMin) acc = std::fma(P.wm[c0 + c][h], dxs, acc);
      }
      sums[r * C + c] = acc;
    }
  }
}

using TileFn = void (*)(const Acts&, int64_t, const Panel&, int64_t, float*);

template <int R, int C, int kPlanes>
TileFn tile_fn(Isa isa, const FormatInfo& info) {
  const bool zero = info.zero != 0, min = info.has_min;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == kVnni512) {
    if (min) return tile_vnni<R, C, false, true, kPlanes>;
    return zero ? tile_vnni<R, C, true, false, kPlanes> : tile_vnni<R, C, false, false, kPlanes>;
  }
#endif
#if defined(__AVX2__)
  if (isa == kAvx2) {
    if (min) return tile_avx2<R, C, false, true, false, kPlanes>;
    if (info.zero == -128) return tile_avx2<R, C, true, false, true, kPlanes>;
    return zero ? tile_avx2<R, C, true, false, false, kPlanes>
                : tile_avx2<R, C, false, false, false, kPlanes>;
  }
#endif
  (void)isa;
  if (min) return tile_scalar<R, C, false, true, kPlanes>;
  return zero ? tile_scalar<R, C, true, false, kPlanes> : tile_scalar<R, C, false, false, kPlanes>;
}

// Tiles of 4 rows x 2 panel rows, 2-3 rows x 4, 1 row x 4 (4 weight rows streamed together).
struct Tiles {
  TileFn r4, r3, r2, r1;
  template <int kPlanes>
  static Tiles make(Isa isa, const FormatInfo& info) {
    return {tile_fn<4, 2, kPlanes>(isa, info), tile_fn<3, 4, kPlanes>(isa, info),
            tile_fn<2, 4, kPlanes>(isa, info), tile_fn<1, 4, kPlanes>(isa, info)};
  }
};

template <typename O>
void store_out(O* out, int64_t ldo, int64_t m, int64_t n, float sum, const float* bias) {
  vec::store1(out + m * ldo, n, sum + (bias ? bias[n] : 0.0f));
}

struct PanelBuffers {
  std::vector<uint8_t> u;
  std::vector<float> ws, wm;
};

template <typename O, typename X>
void run_quantized(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, const Weight& w,
                   const float* bias, int planes) {
  const FormatInfo info = format_info(w.format);
  const int64_t K = w.K, Kp = padded_k(K);
  // Activations, prepared once per call (rows in parallel; a row's bytes depend on it alone).
  std::vector<int8_t> a(M * Kp * planes);
  std::vector<float> dx(M * Kp / 32);
  std::vector<int32_t> aux(M * Kp / 4);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(x + m * ldx, K, Kp, info, planes, a.data() + m * Kp * planes,
                   dx.data() + m * Kp / 32, aux.data() + m * Kp / 4);
    }
  });
  const Acts acts{a.data(), dx.data(), aux.data(), Kp, planes};
  const Tiles tiles = planes == 2 ? Tiles::make<2>(active_isa(), info)
                                  : Tiles::make<1>(active_isa(), info);
  const int64_t num_panels = (w.N + kPanel - 1) / kPanel;
  // NOTE: the row block depends on K alone, never on M (a row's tile order is then fixed).
  const int64_t mb =
      std::max<int64_t>(4, kRowBlockBytes / (Kp * (planes + 1) + Kp / 8) / 4 * 4);
  const int64_t num_blocks = (M + mb - 1) / mb;
  const int64_t num_items = num_blocks * num_panels;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
  const auto make_state = [&] {
    PanelBuffers buf;
    buf.u.resize(kPanel * Kp);
    buf.ws.resize(kPanel * Kp / 16);
    buf.wm.resize(kPanel * Kp / 16);
    return buf;
  };
  deal_in_memory_order(num_items, num_threads, make_state, [&](PanelBuffers& buf, int64_t item) {
    const int64_t m_begin = item / num_panels * mb, m_end = std::min(M, m_begin + mb);
    const int64_t n0 = item % num_panels * kPanel, cols = std::min(kPanel, w.N - n0);
    Panel panel;
    for (int64_t c = 0; c < kPanel; ++c) {
      // Past N, a panel row repeats the last one (computed, not stored).
      const int64_t n = n0 + std::min(c, cols - 1);
      float* ws = buf.ws.data() + c * Kp / 16;
      float* wm = buf.wm.data() + c * Kp / 16;
      panel.u[c] = c < cols ? unpack_row(w, n, buf.u.data() + c * Kp, ws, wm) : panel.u[cols - 1];
      panel.ws[c] = c < cols ? ws : panel.ws[cols - 1];
      panel.wm[c] = c < cols ? wm : panel.wm[cols - 1];
    }
    float sums[16];
    const auto run = [&](TileFn fn, int64_t m0, int R, int C) {
      for (int64_t c0 = 0; c0 < cols; c0 += C) {
        fn(acts, m0, panel, c0, sums);
        for (int r = 0; r < R; ++r) {
          for (int64_t c = c0; c < std::min<int64_t>(c0 + C, cols); ++c) {
            store_out(out, ldo, m0 + r, n0 + c, sums[r * C + (c - c0)], bias);
          }
        }
      }
    };
    int64_t m0 = m_begin;
    for (; m0 + 4 <= m_end; m0 += 4) run(tiles.r4, m0, 4, 2);
    const int64_t left = m_end - m0;
    if (left == 3) run(tiles.r3, m0, 3, 4);
    if (left == 2) run(tiles.r2, m0, 2, 4);
    if (left == 1) run(tiles.r1, m0, 1, 4);
  });
}

// The test hook's path: fp32 rows times the dequantized weight, summed in one fixed order.
template <typename O, typename X>
void run_float(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, const Weight& w,
               const float* bias) {
  const int64_t K = w.K;
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) vec::widen(x + m * ldx, xf.data() + m * K, K);
  at::parallel_for(0, w.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t n = begin; n < end; ++n) {
      dequantize_row(w, n, row.data());
      for (int64_t m = 0; m < M; ++m) {
        double sum = 0.0;
        for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(row[k]) * xf[m * K + k];
        store_out(out, ldo, m, n, static_cast<float>(sum), bias);
      }
    }
  });
}

}  // namespace

int active_quant_isa() { return active_isa(); }

void linear(at::Tensor out, const at::Tensor& x, const Weight& w, const at::Tensor& bias,
            bool quantize_activations, int64_t activation_bits) {
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16,
              "activation_bits must be 8 or 16, got ", activation_bits);
  const int planes = activation_bits == 16 ? 2 : 1;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be 2-D fp32/bf16 CPU with a contiguous last dim");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the weight ", w.K, " inputs");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == w.N &&
                  out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be fp32/bf16 [M, N] with a contiguous last dim");
  const float* bp = nullptr;
  if (bias.numel() != 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == w.N,
                "bias must be contiguous float32 [N] (or empty)");
    bp = bias.data_ptr<float>();
  }
  const int64_t M = x.size(0);
  if (M == 0 || w.N == 0) return;
  const auto dispatch = [&](auto* op) {
    const int64_t ldo = out.stride(0), ldx = x.stride(0);
    if (x.scalar_type() == at::kFloat) {
      const float* xp = x.data_ptr<float>();
      if (quantize_activations) run_quantized(op, ldo, xp, ldx, M, w, bp, planes);
      else run_float(op, ldo, xp, ldx, M, w, bp);
    } else {
      const auto* xp = reinterpret_cast<const vec::bf16_t*>(x.data_ptr());
      if (quantize_activations) run_quantized(op, ldo, xp, ldx, M, w, bp, planes);
      else run_float(op, ldo, xp, ldx, M, w, bp);
    }
  };
  if (out.scalar_type() == at::kFloat) {
    dispatch(out.data_ptr<float>());
  } else {
    dispatch(reinterpret_cast<vec::bf16_t*>(out.data_ptr()));
  }
}

namespace {

std::string quant_kernel_isa() { return kIsaNames[active_isa()]; }

// "auto" (the best this build has), "avx512_vnni", "avx2" or "scalar"; a test hook.
void set_quant_kernel_isa(const std::string& name) {
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

}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("quant_kernel_isa() -> str", &pagedllm::quant::quant_kernel_isa);
  m.def("set_quant_kernel_isa(str name) -> ()", &pagedllm::quant::set_quant_kernel_isa);
}
