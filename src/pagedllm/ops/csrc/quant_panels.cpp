// GGUF weights of the 32-value block formats (Q4_0, Q4_1, Q8_0) repacked at load into panels
// of 16 rows, and the kernel that multiplies them for every row count (gguf_linear on a panel
// format, quant.h).
//
// Layout (gguf_pack_panels): rows 16p .. 16p + 15 form panel p, stored where those rows were
// (16 * row_bytes bytes), block after block; block b of a panel holds the 16 rows' block b:
//   values: 8 groups j of 4 consecutive values (4j .. 4j + 3), each group as 64 bytes, lane r
//     (row 16p + r) at bytes 4r .. 4r + 3, so that one VPDPBUSD multiplies a group of all 16
//     rows by 4 activations broadcast: Q8_0 stores q + 128 (group j at 64j); Q4_0/Q4_1 two
//     groups in the nibbles of one 64 bytes (group 2t in the low nibbles of bytes 64t .. 64t +
//     63, group 2t + 1 in the high ones);
//   then d of the 16 rows (fp16, 32 bytes), then Q4_1's minimums m (fp16, 32 bytes).
// A panel is as large as its 16 rows in the file; the rows past the last whole panel (N % 16)
// stay as the file has them (the kernel repacks them per call into a panel of its own).
//
// Arithmetic: each output is one lane of a vector accumulator, over the blocks in order:
//   acc = fma(float(P), d * dx, acc)        P = sum of u * q over the block + zero * S, int32
//   acc = fma(m, dx * S, acc)               (Q4_1)
// with q the block's quantized activations (8 or 16 bits, as quant_dot.cpp quantizes them; 16
// bits as two int8 planes, P = 255 * (u . hi) + u . lo), dx their scale and S their sum. The
// integer sums are exact in any order, and every output takes the same float operations in the
// same order whatever the row count, the tile, or the integer path (VNNI, AVX2, scalar: all
// three give the same bits): the kernel is batch-invariant with no reduction across lanes.
// Integer work per block and row: one VPDPBUSD per 4-value group per plane, the nibbles
// unpacked in registers, shared by every row of the tile; no scratch copies of the weight.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "deal.h"
#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

constexpr int64_t kRows = 16;                   // weight rows per panel
// Panels per work item, the tiles' width: items of 4 panels left one thread 5 of a 576-row
// projection's 9 (a tile reads its 2 panels once per row tile either way).
constexpr int64_t kGroup = 2;
constexpr int64_t kRowBlockBytes = 256 * 1024;  // quantized activations per row block
constexpr int kQ16Max = 127 * 255;              // as quant_dot.cpp

// How far ahead of each panel's stream a tile prefetches, in bytes (0: not at all): a panel is
// a short stream (5.6 KB for a 576-input Q4_1 projection), too short for the hardware
// prefetchers to ramp up on their own, and they stop at every 4 KB page. Same-process A/B, one
// row, 2 threads, SmolLM2's Q4_1 layers (66 MB) and Q8_0 LM head (30 MB) streamed from memory,
// best of 60 on the loaded machine: none 2.58 / 0.57 ms, 1 KB 2.28 / 0.54, 2 KB 2.26 / 0.50,
// 4 KB 2.23 / 0.51. set_panel_prefetch_bytes changes it (a tuning and test hook; no effect on
// the results).
std::atomic<int> g_prefetch_bytes{2048};

// A panel block's parts: the values' bytes (then d at +values, m at +values + 32) and size.
template <int64_t kBase>
struct PanelBlock {
  static constexpr int64_t values = kBase == kQ8_0 ? 512 : 256;
  static constexpr int64_t bytes = kBase == kQ8_0 ? 16 * 34 : kBase == kQ4_1 ? 16 * 20 : 16 * 18;
  static constexpr bool has_min = kBase == kQ4_1;
  static constexpr int zero = kBase == kQ8_0 ? -128 : kBase == kQ4_0 ? -8 : 0;
};

int64_t panel_block_values(int64_t base) { return base == kQ8_0 ? 512 : 256; }

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Packs `rows` (<= 16) rows of raw blocks (row r at raw + r * row_bytes) into one panel at dst;
// missing rows are zeros (u 0, d 0).
void pack_panel(int64_t base, const uint8_t* raw, int64_t row_bytes, int64_t rows,
                int64_t num_blocks, uint8_t* dst) {
  const FormatInfo info = format_info(base);
  const int64_t vbytes = panel_block_values(base), bb = kRows * info.block_bytes;
  for (int64_t b = 0; b < num_blocks; ++b) {
    uint8_t* blk = dst + b * bb;
    std::memset(blk, base == kQ8_0 ? 0x80 : 0, vbytes);
    std::memset(blk + vbytes, 0, bb - vbytes);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* src = raw + r * row_bytes + b * info.block_bytes;
      std::memcpy(blk + vbytes + 2 * r, src, 2);  // d
      if (base == kQ8_0) {
        for (int i = 0; i < 32; ++i) blk[i / 4 * 64 + 4 * r + i % 4] = src[2 + i] ^ 0x80;
        continue;
      }
      const uint8_t* qs = src + (base == kQ4_1 ? 4 : 2);
      if (base == kQ4_1) std::memcpy(blk + vbytes + 32 + 2 * r, src + 2, 2);  // m
      for (int i = 0; i < 32; ++i) {
        const uint8_t u = i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4;
        const int j = i / 4;  // group j: byte 64 * (j / 2) + 4r + i % 4, nibble j % 2
        blk[j / 2 * 64 + 4 * r + i % 4] |= static_cast<uint8_t>(u << (4 * (j % 2)));
      }
    }
  }
}

// Activation rows quantized per block of 32 for the panel kernel: row m's block b at
// a + (m * nb + b) * 32 * planes (the hi plane's 32 values, then the lo plane's), its scale at
// dx[m * nb + b] and its term corr[m * nb + b]: zero * S (int32) for formats with a zero,
// dx * S (float bits) for Q4_1.
struct PanelActs {
  const int8_t* a;
  const float* dx;
  const int32_t* corr;
  int64_t nb;
};

// Block b's term for its scale d and sum S (PanelActs).
inline void store_corr(int32_t* corr, int64_t b, float d, int sum, int zero, bool has_min) {
  if (has_min) {
    const float t = d * static_cast<float>(sum);
    std::memcpy(corr + b, &t, 4);
  } else {
    corr[b] = zero * sum;
  }
}

template <typename T>
void quantize_row_blocks(const T* x, int64_t K, int planes, int zero, bool has_min, int8_t* a,
                         float* dx, int32_t* corr) {
  const int qmax = planes == 2 ? kQ16Max : 127;
#if defined(__AVX512F__) && defined(__AVX512BW__) && PA_LANES == 16
  // The scalar code below, 16 values at a time: the same operations (VCVTPS2DQ rounds to
  // nearest even, as nearbyint; h is the nearest integer to q / 255, never a tie), the same
  // bytes.
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i lim = _mm512_set1_epi32(qmax), neg_lim = _mm512_set1_epi32(-qmax);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 v0 = reinterpret_cast<__m512>(vec::load(x + b * 32));
    const __m512 v1 = reinterpret_cast<__m512>(vec::load(x + b * 32 + 16));
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
    const float d = amax / static_cast<float>(qmax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);
    __m512i q[2];
    q[0] = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    q[1] = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    int8_t* out = a + b * 32 * planes;
    for (int i = 0; i < 2; ++i) {
      q[i] = _mm512_max_epi32(_mm512_min_epi32(q[i], lim), neg_lim);
      if (planes == 2) {
        const __m512i h = _mm512_cvtps_epi32(
            _mm512_div_ps(_mm512_cvtepi32_ps(q[i]), _mm512_set1_ps(255.0f)));
        const __m512i lo = _mm512_sub_epi32(q[i], _mm512_sub_epi32(_mm512_slli_epi32(h, 8), h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 + 16 * i), _mm512_cvtepi32_epi8(lo));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm512_cvtepi32_epi8(q[i]));
      }
    }
    dx[b] = d;
    store_corr(corr, b, d, _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1])), zero, has_min);
  }
  return;
#endif
  for (int64_t b = 0; b < K / 32; ++b) {
    float v[32];
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) {
      v[i] = vec::load1(x, b * 32 + i);
      amax = std::max(amax, std::abs(v[i]));
    }
    const float d = amax / static_cast<float>(qmax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int8_t* hi = a + b * 32 * planes;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int q = std::clamp(static_cast<int>(std::nearbyint(v[i] * id)), -qmax, qmax);
      if (planes == 2) {
        const int h = q >= 0 ? (q + 127) / 255 : -((127 - q) / 255);
        hi[i] = static_cast<int8_t>(h);
        hi[32 + i] = static_cast<int8_t>(q - 255 * h);
      } else {
        hi[i] = static_cast<int8_t>(q);
      }
      sum += q;
    }
    dx[b] = d;
    store_corr(corr, b, d, sum, zero, has_min);
  }
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Each tile: rows m0 .. m0 + R - 1 times panels pan[0 .. C - 1] over all blocks;
// sums[(r * C + c) * 16 + lane].
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int R, int C, int64_t kBase, int kPlanes>
void tile_vnni(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums) {
  using PB = PanelBlock<kBase>;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int pf = g_prefetch_bytes.load(std::memory_order_relaxed);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < A.nb; ++b) {
    const int8_t* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = A.a + ((m0 + r) * A.nb + b) * 32 * kPlanes;
    const uint8_t* blk[C];
    for (int c = 0; c < C; ++c) blk[c] = pan[c] + b * PB::bytes;
    if (pf > 0) {  // this block's bytes, pf further on (g_prefetch_bytes)
      for (int c = 0; c < C; ++c) {
        for (int64_t l = 0; l < PB::bytes; l += 64) __builtin_prefetch(blk[c] + pf + l);
      }
    }
    // One row has too few chains of dependent VPDPBUSDs to hide their latency: its groups j
    // alternate between two sums per plane (integers: exact in any order).
    constexpr int S = R == 1 ? 2 : 1;
    __m512i ph[S][R][C], pl[S][R][C];
    for (int k = 0; k < S; ++k)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) ph[k][r][c] = pl[k][r][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512i u[C];
      for (int c = 0; c < C; ++c) {
        if constexpr (kBase == kQ8_0) {
          u[c] = _mm512_loadu_si512(blk[c] + 64 * j);
        } else {
          const __m512i v = _mm512_loadu_si512(blk[c] + 64 * (j / 2));
          u[c] = _mm512_and_si512(j % 2 ? _mm512_srli_epi16(v, 4) : v, nibble);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i ah = _mm512_set1_epi32(load_i32(ar[r] + 4 * j));
        for (int c = 0; c < C; ++c) {
          ph[j % S][r][c] = _mm512_dpbusd_epi32(ph[j % S][r][c], u[c], ah);
        }
        if constexpr (kPlanes == 2) {
          const __m512i al = _mm512_set1_epi32(load_i32(ar[r] + 32 + 4 * j));
          for (int c = 0; c < C; ++c) {
            pl[j % S][r][c] = _mm512_dpbusd_epi32(pl[j % S][r][c], u[c], al);
          }
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 d = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[c] + PB::values)));
      __m512 mn = _mm512_setzero_ps();
      if constexpr (PB::has_min) {
        mn = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[c] + PB::values + 32)));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = (m0 + r) * A.nb + b;
        __m512i p = ph[0][r][c], q = pl[0][r][c];
        if constexpr (S == 2) {
          p = _mm512_add_epi32(p, ph[1][r][c]);
          q = _mm512_add_epi32(q, pl[1][r][c]);
        }
        if constexpr (kPlanes == 2) {
          p = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(p, 8), p), q);
        }
        if constexpr (PB::zero != 0) p = _mm512_add_epi32(p, _mm512_set1_epi32(A.corr[i]));
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                    _mm512_mul_ps(d, _mm512_set1_ps(A.dx[i])), acc[r][c]);
        if constexpr (PB::has_min) {
          float t;
          std::memcpy(&t, A.corr + i, 4);
          acc[r][c] = _mm512_fmadd_ps(mn, _mm512_set1_ps(t), acc[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(sums + (r * C + c) * 16, acc[r][c]);
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// Half-panels of 8 lanes: VPMADDUBSW + VPMADDWD. Q8_0 through the signed form (|q| times a
// with q's sign: pairs stay within int16), which sums q * a directly (no zero term); the
// nibble formats as u * a (u <= 15) plus zero * S.
template <int R, int C, int64_t kBase, int kPlanes>
void tile_avx2(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums) {
  using PB = PanelBlock<kBase>;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < A.nb; ++b) {
      const int8_t* ar[R];
      for (int r = 0; r < R; ++r) ar[r] = A.a + ((m0 + r) * A.nb + b) * 32 * kPlanes;
      const uint8_t* blk[C];
      for (int c = 0; c < C; ++c) blk[c] = pan[c] + b * PB::bytes;
      __m256i ph[R][C], pl[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) ph[r][c] = pl[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m256i u[C];
        for (int c = 0; c < C; ++c) {
          if constexpr (kBase == kQ8_0) {
            u[c] = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[c] + 64 * j + 32 * half)),
                sign_bit);  // q as int8
          } else {
            const __m256i v = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(blk[c] + 64 * (j / 2) + 32 * half));
            u[c] = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, nibble);
          }
        }
        for (int r = 0; r < R; ++r) {
          const __m256i ah = _mm256_set1_epi32(load_i32(ar[r] + 4 * j));
          __m256i al = _mm256_setzero_si256();
          if constexpr (kPlanes == 2) al = _mm256_set1_epi32(load_i32(ar[r] + 32 + 4 * j));
          for (int c = 0; c < C; ++c) {
            const __m256i w = kBase == kQ8_0 ? _mm256_abs_epi8(u[c]) : u[c];
            const __m256i sh = kBase == kQ8_0 ? _mm256_sign_epi8(ah, u[c]) : ah;
            ph[r][c] = _mm256_add_epi32(
                ph[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(w, sh), ones));
            if constexpr (kPlanes == 2) {
              const __m256i sl = kBase == kQ8_0 ? _mm256_sign_epi8(al, u[c]) : al;
              pl[r][c] = _mm256_add_epi32(
                  pl[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(w, sl), ones));
            }
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(blk[c] + PB::values + 16 * half)));
        __m256 mn = _mm256_setzero_ps();
        if constexpr (PB::has_min) {
          mn = _mm256_cvtph_ps(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(blk[c] + PB::values + 32 + 16 * half)));
        }
        for (int r = 0; r < R; ++r) {
          const int64_t i = (m0 + r) * A.nb + b;
          __m256i p = ph[r][c];
          if constexpr (kPlanes == 2) {
            p = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(p, 8), p), pl[r][c]);
          }
          if constexpr (PB::zero != 0 && kBase != kQ8_0) {
            p = _mm256_add_epi32(p, _mm256_set1_epi32(A.corr[i]));
          }
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                      _mm256_mul_ps(d, _mm256_set1_ps(A.dx[i])), acc[r][c]);
          if constexpr (PB::has_min) {
            float t;
            std::memcpy(&t, A.corr + i, 4);
            acc[r][c] = _mm256_fmadd_ps(mn, _mm256_set1_ps(t), acc[r][c]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(sums + (r * C + c) * 16 + 8 * half, acc[r][c]);
  }
}
#endif

// Portable: the same operations per output, one lane at a time.
template <int R, int C, int64_t kBase, int kPlanes>
void tile_scalar(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums) {
  using PB = PanelBlock<kBase>;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      for (int lane = 0; lane < kRows; ++lane) {
        float acc = 0.0f;
        for (int64_t b = 0; b < A.nb; ++b) {
          const int64_t i = (m0 + r) * A.nb + b;
          const int8_t* a = A.a + i * 32 * kPlanes;
          const uint8_t* blk = pan[c] + b * PB::bytes;
          int32_t ph = 0, pl = 0;
          for (int v = 0; v < 32; ++v) {
            const int j = v / 4;
            int u;
            if constexpr (kBase == kQ8_0) {
              u = blk[64 * j + 4 * lane + v % 4];
            } else {
              u = (blk[64 * (j / 2) + 4 * lane + v % 4] >> (4 * (j % 2))) & 0xF;
            }
            ph += u * a[v];
            if constexpr (kPlanes == 2) pl += u * a[32 + v];
          }
          int32_t p = kPlanes == 2 ? 255 * ph + pl : ph;
          if constexpr (PB::zero != 0) p += A.corr[i];
          const float d = half_to_float(blk + PB::values + 2 * lane);
          acc = std::fma(static_cast<float>(p), d * A.dx[i], acc);
          if constexpr (PB::has_min) {
            float t;
            std::memcpy(&t, A.corr + i, 4);
            acc = std::fma(half_to_float(blk + PB::values + 32 + 2 * lane), t, acc);
          }
        }
        sums[(r * C + c) * 16 + lane] = acc;
      }
    }
  }
}

using PanelTileFn = void (*)(const PanelActs&, int64_t, const uint8_t* const*, float*);

template <int R, int C, int64_t kBase, int kPlanes>
PanelTileFn panel_tile(int isa) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == 0) return tile_vnni<R, C, kBase, kPlanes>;
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  if (isa <= 1) return tile_avx2<R, C, kBase, kPlanes>;
#endif
  (void)isa;
  return tile_scalar<R, C, kBase, kPlanes>;
}

// Row tiles: 4 rows x 2 panels (many rows), 1-3 rows x 2 panels for what is left.
struct PanelTiles {
  PanelTileFn r4, r3, r2, r1;
};

template <int64_t kBase, int kPlanes>
PanelTiles make_tiles(int isa) {
  return {panel_tile<4, 2, kBase, kPlanes>(isa), panel_tile<3, 2, kBase, kPlanes>(isa),
          panel_tile<2, 2, kBase, kPlanes>(isa), panel_tile<1, 2, kBase, kPlanes>(isa)};
}

PanelTiles tiles_for(int64_t base, int planes, int isa) {
  switch (base * 2 + planes - 1) {
    case kQ4_0 * 2: return make_tiles<kQ4_0, 1>(isa);
    case kQ4_0 * 2 + 1: return make_tiles<kQ4_0, 2>(isa);
    case kQ4_1 * 2: return make_tiles<kQ4_1, 1>(isa);
    case kQ4_1 * 2 + 1: return make_tiles<kQ4_1, 2>(isa);
    case kQ8_0 * 2: return make_tiles<kQ8_0, 1>(isa);
    case kQ8_0 * 2 + 1: return make_tiles<kQ8_0, 2>(isa);
    default: TORCH_CHECK(false, "no panel kernel for format ", base);
  }
}

template <typename O, typename X>
void run_panels(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, const Weight& w,
                const float* bias, int planes) {
  const int64_t base = w.format - kPanelFormat;
  const FormatInfo info = format_info(base);
  const int64_t K = w.K, nb = K / 32, N = w.N;
  const int64_t full = N / kRows, num_panels = (N + kRows - 1) / kRows;
  const int64_t panel_bytes = kRows * w.row_bytes;
  // The rows past the last whole panel, repacked for this call.
  std::vector<uint8_t> tail;
  if (num_panels > full) {
    tail.resize(panel_bytes);
    pack_panel(base, w.data + full * panel_bytes, w.row_bytes, N - full * kRows, nb,
               tail.data());
  }
  // The calling thread's buffers, kept between calls (no allocation, no page faults per call).
  thread_local std::vector<int8_t> a_buf;
  thread_local std::vector<float> dx_buf;
  thread_local std::vector<int32_t> corr_buf;
  if (a_buf.size() < static_cast<size_t>(M * K * planes)) a_buf.resize(M * K * planes);
  if (dx_buf.size() < static_cast<size_t>(M * nb)) {
    dx_buf.resize(M * nb);
    corr_buf.resize(M * nb);
  }
  int8_t* a = a_buf.data();
  float* dx = dx_buf.data();
  int32_t* corr = corr_buf.data();
  const auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row_blocks(x + m * ldx, K, planes, info.zero, info.has_min, a + m * K * planes,
                          dx + m * nb, corr + m * nb);
    }
  };
  if (M * K < 16384) {
    quantize(0, M);
  } else {
    at::parallel_for(0, M, 1, quantize);
  }
  const PanelActs acts{a, dx, corr, nb};
  const PanelTiles tiles = tiles_for(base, planes, active_quant_isa());
  const int64_t num_groups = (num_panels + kGroup - 1) / kGroup;
  // NOTE: the row block depends on K alone, never on M (not that a row's result depends on
  // its tile: every tile does a row's arithmetic alike).
  const int64_t mb = std::max<int64_t>(4, kRowBlockBytes / (K * planes) / 4 * 4);
  const int64_t num_blocks = (M + mb - 1) / mb;
  const int64_t num_items = num_blocks * num_groups;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
  const int pf = g_prefetch_bytes.load(std::memory_order_relaxed);
  deal_in_memory_order(num_items, num_threads, [&](int64_t item) {
    const int64_t m_begin = item / num_groups * mb, m_end = std::min(M, m_begin + mb);
    const int64_t p0 = item % num_groups * kGroup, p1 = std::min(num_panels, p0 + kGroup);
    // Past the last panel, a slot repeats it (computed, not stored).
    const uint8_t* pan[kGroup];
    for (int64_t s = 0; s < kGroup; ++s) {
      const int64_t p = std::min(p0 + s, p1 - 1);
      pan[s] = p < full ? w.data + p * panel_bytes : tail.data();
    }
    // The next item's second panel starts a stream of its own (its first panel continues
    // this item's second): its first lines are fetched now, an item ahead.
    if (pf > 0 && item + 1 < num_items) {
      const int64_t p = (item + 1) % num_groups * kGroup + 1;
      if (p < full) {
        const char* next = reinterpret_cast<const char*>(w.data + p * panel_bytes);
        for (int64_t l = 0; l < pf; l += 64) __builtin_prefetch(next + l);
      }
    }
    alignas(64) float sums[4 * 2 * kRows];
    const auto store = [&](int64_t m0, int R, int C, int64_t s0) {
      for (int r = 0; r < R; ++r) {
        O* o = out + (m0 + r) * ldo;
        for (int c = 0; c < C; ++c) {
          const int64_t n0 = (p0 + s0 + c) * kRows;
          if (p0 + s0 + c >= p1) continue;
          const float* sum = sums + (r * C + c) * kRows;
          if (n0 + kRows <= N) {  // a whole panel: the same sums and roundings, in vectors
            for (int64_t l = 0; l < kRows; l += vec::kLanes) {
              // (+ 0.0f without a bias, as the scalar store: -0 becomes +0)
              const vec::vfloat b = bias ? vec::load(bias + n0 + l) : vec::vfloat{};
              vec::store(o + n0 + l, vec::load(sum + l) + b);
            }
            continue;
          }
          for (int64_t l = 0; l < kRows && n0 + l < N; ++l) {
            vec::store1(o, n0 + l, sum[l] + (bias ? bias[n0 + l] : 0.0f));
          }
        }
      }
    };
    // Whole 4-row tiles of a whole panel pair: quant_panels_gemm.cpp (each output's operations
    // as here, stored as vectors); the tiles below take what it leaves.
    int64_t m0 = panel_gemm_rows(base, planes, {a, dx, corr, nb}, m_begin, m_end, pan, p1 - p0,
                                 p0 * kRows, N, out, std::is_same_v<O, vec::bf16_t>, ldo, bias);
    for (; m0 + 4 <= m_end; m0 += 4) {
      for (int64_t s0 = 0; s0 < p1 - p0; s0 += 2) {
        tiles.r4(acts, m0, pan + s0, sums);
        store(m0, 4, 2, s0);
      }
    }
    const int64_t left = m_end - m0;
    if (left > 0) {
      const PanelTileFn fn = left == 3 ? tiles.r3 : left == 2 ? tiles.r2 : tiles.r1;
      for (int64_t s0 = 0; s0 < p1 - p0; s0 += 2) {
        fn(acts, m0, pan + s0, sums);
        store(m0, static_cast<int>(left), 2, s0);
      }
    }
  });
}

// weight [N, row_bytes] (GGML type `format`: Q4_0, Q4_1 or Q8_0) -> the same bytes as panels
// (the layout above): returns the panel format's id.
int64_t gguf_pack_panels_(at::Tensor weight, int64_t format) {
  TORCH_CHECK(format == kQ4_0 || format == kQ4_1 || format == kQ8_0,
              "panels take Q4_0 (2), Q4_1 (3) and Q8_0 (8) weights, not format ", format);
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "weight must be a contiguous 2-D uint8 CPU tensor of GGUF blocks");
  const FormatInfo info = format_info(format);
  const int64_t row_bytes = weight.size(1), nb = row_bytes / info.block_bytes;
  TORCH_CHECK(row_bytes % info.block_bytes == 0, "a weight row of ", row_bytes,
              " bytes is not whole blocks of ", info.block_bytes);
  uint8_t* data = weight.data_ptr<uint8_t>();
  const int64_t full = weight.size(0) / kRows;
  at::parallel_for(0, full, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> panel(kRows * row_bytes);
    for (int64_t p = begin; p < end; ++p) {
      uint8_t* dst = data + p * kRows * row_bytes;
      pack_panel(format, dst, row_bytes, kRows, nb, panel.data());
      std::memcpy(dst, panel.data(), panel.size());
    }
  });
  return kPanelFormat + format;
}

}  // namespace

void unpack_panel_row(const Weight& w, int64_t n, uint8_t* u, float* ws, float* wm) {
  const int64_t base = w.format - kPanelFormat;
  const int64_t full = w.N / kRows;
  if (n >= full * kRows) {  // stored as in the file
    Weight raw = w;
    raw.format = base;
    const int64_t Kp = padded_k(w.K);
    std::vector<uint8_t> tmp(Kp);
    const uint8_t* v = unpack_row(raw, n, tmp.data(), ws, wm);
    std::memcpy(u, v, w.K);
    return;
  }
  const FormatInfo info = format_info(base);
  const int64_t vbytes = panel_block_values(base), bb = kRows * info.block_bytes;
  const uint8_t* panel = w.data + n / kRows * kRows * w.row_bytes;
  const int64_t r = n % kRows;
  for (int64_t b = 0; b < w.K / 32; ++b) {
    const uint8_t* blk = panel + b * bb;
    for (int i = 0; i < 32; ++i) {
      const int j = i / 4;
      u[32 * b + i] = base == kQ8_0
                          ? blk[64 * j + 4 * r + i % 4]
                          : (blk[64 * (j / 2) + 4 * r + i % 4] >> (4 * (j % 2))) & 0xF;
    }
    ws[2 * b] = ws[2 * b + 1] = half_to_float(blk + vbytes + 2 * r);
    wm[2 * b] = wm[2 * b + 1] = base == kQ4_1 ? half_to_float(blk + vbytes + 32 + 2 * r) : 0.0f;
  }
}

void panel_linear(at::Tensor out, const at::Tensor& x, const Weight& w, const at::Tensor& bias,
                  int64_t activation_bits) {
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
  TORCH_CHECK(w.row_bytes == w.K / 32 * format_info(w.format).block_bytes,
              "a panel weight's rows must be contiguous");
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
      run_panels(op, ldo, x.data_ptr<float>(), ldx, M, w, bp, planes);
    } else {
      run_panels(op, ldo, reinterpret_cast<const vec::bf16_t*>(x.data_ptr()), ldx, M, w, bp,
                 planes);
    }
  };
  if (out.scalar_type() == at::kFloat) {
    dispatch(out.data_ptr<float>());
  } else {
    dispatch(reinterpret_cast<vec::bf16_t*>(out.data_ptr()));
  }
}

}  // namespace pagedllm::quant

namespace pagedllm::quant {
namespace {
void set_panel_prefetch_bytes(int64_t b) { g_prefetch_bytes.store(static_cast<int>(b)); }
}  // namespace
}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("gguf_pack_panels_(Tensor(a!) weight, int format) -> int");
  m.def("set_panel_prefetch_bytes(int b) -> ()", &pagedllm::quant::set_panel_prefetch_bytes);
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("gguf_pack_panels_", &pagedllm::quant::gguf_pack_panels_);
}
