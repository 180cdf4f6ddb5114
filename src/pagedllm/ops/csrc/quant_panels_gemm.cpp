// The GGUF panel kernels' register tiles (quant_panels.cpp's layout, quant.h's PanelBlock): a
// work item's rows (a row block x 2 panels of 16 weight rows) in tiles of 4 rows x 2 panels
// (many rows: the register-tiled GEMM), then one of 1-3 rows for what is left (few rows: the
// weights streamed, prefetched ahead), on AVX512-VNNI (VPDPBUSD), AVX2 (VPMADDUBSW + VPMADDWD,
// half-panels of 8 lanes) or scalar code: one tile template per integer path, for every format
// (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and row count, stored as vectors where a panel is whole.
//
// Batch invariance: an output is one lane of a float accumulator over its blocks of 32 inputs
// in order: per block (per half-block of 16 for Q6_K, whose scales cover 16 values) the
// integer sum P = sum u * q + zero * S (exact in any order: P = 255 * (u . hi) + u . lo with
// 16-bit activations) converted to float, acc = fma(float(P), scale * dx, acc), then
// acc = fma(minimum, dx * S, acc) for the formats with a minimum; at the end sum + bias (+ 0
// without bias) rounded once to the output type. A K-quant's scale is d * float(sc) and its
// minimum -(dmin * float(m)) (the row kernel's values, quant_gguf.cpp). Every tile, every row
// count and every integer path does these float operations alike: the same bits
// (tests/ops/test_quant_panels_gemm.py checks 1-300 rows against the scalar path).
//
// NOTE: measured in a standalone harness on the 2-core Zen 5 (CPU time, one thread, Q4_1
// with 16-bit activations, K 576): the 4 x 2 tile runs 10.0-10.2 cycles per row x panel x
// block, against a floor of 9.5 (16 VPDPBUSD, one multiply and two FMAs share the two FMA
// pipes); 6 x 2, 4 x 3, 8 x 1 and 5 x 2 tiles with the planes chained in one accumulator (to
// fit the registers) were 5-17% slower (the chain's latency).

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

constexpr int64_t kRows = 16;  // weight rows per panel
constexpr int kTileRows = 4;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// The activations' term of row block i (flat index m * nb + b), half h, as float bits.
inline float corr_float(const PanelActs& A, int64_t i) {
  float t;
  std::memcpy(&t, A.corr + i, 4);
  return t;
}

// A K-quant sub-block s's six-bit scales and minimums of 16 lanes from the 12 scale bytes,
// byte k of lane r at sc[16 k + r] (quant_gguf.cpp's scale_min_k4, bytewise).
inline void scale_min_k4(const uint8_t* sc, int s, int lane, int* scale, int* min) {
  const auto at = [&](int k) { return static_cast<int>(sc[16 * k + lane]); };
  if (s < 4) {
    *scale = at(s) & 63;
    *min = at(s + 4) & 63;
  } else {
    *scale = (at(s + 4) & 0xF) | ((at(s - 4) >> 6) << 4);
    *min = (at(s + 4) >> 4) | ((at(s) >> 6) << 4);
  }
}

#if defined(__AVX2__)
// The same for kWidth (8 or 16) lanes from lane0, as bytes (0..63) of epi8 vectors.
template <int kWidth>
inline void scale_min_k4_bytes(const uint8_t* sc, int s, int lane0, __m128i* scale,
                               __m128i* min) {
  const auto at = [&](int k) {
    const auto* p = reinterpret_cast<const __m128i*>(sc + 16 * k + lane0);
    return kWidth == 16 ? _mm_loadu_si128(p) : _mm_loadl_epi64(p);  // never past the bytes
  };
  const __m128i low6 = _mm_set1_epi8(63), low4 = _mm_set1_epi8(0x0F), two = _mm_set1_epi8(3);
  if (s < 4) {
    *scale = _mm_and_si128(at(s), low6);
    *min = _mm_and_si128(at(s + 4), low6);
  } else {
    const __m128i b = at(s + 4);
    // (x >> 6) << 4 per byte: the two top bits, moved within their byte (16-bit shifts).
    const __m128i top_lo = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(at(s - 4), 6), two), 4);
    const __m128i top_hi = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(at(s), 6), two), 4);
    *scale = _mm_or_si128(_mm_and_si128(b, low4), top_lo);
    *min = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(b, 4), low4), top_hi);
  }
}
#endif

// Each tile: rows m0 .. m0 + R - 1 times panels pan[0 .. C - 1] over all blocks;
// sums[(r * C + c) * 16 + lane].
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Group j (values 4j .. 4j + 3 of 32-value sub-block s) of a superblock's 16 rows: 64 bytes,
// lane r at 4r .. 4r + 3, as u (0 .. 255).
template <int64_t kBase>
inline __m512i group_vnni(const uint8_t* sb, int s, int j) {
  using PB = PanelBlock<kBase>;
  if constexpr (kBase == kQ8_0) {
    return _mm512_loadu_si512(sb + 64 * j);
  } else {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512(sb + 256 * s + 64 * (j / 2));
    __m512i u = _mm512_and_si512(j % 2 ? _mm512_srli_epi16(v, 4) : v, nibble);
    if constexpr (kBase == kQ5_K) {  // the fifth bits: a 64-bit mask per group
      uint64_t bits;
      std::memcpy(&bits, sb + PB::high + 64 * s + 8 * j, 8);
      u = _mm512_mask_add_epi8(u, _cvtu64_mask64(bits), u, _mm512_set1_epi8(16));
    } else if constexpr (kBase == kQ6_K) {  // bits 4-5: two per byte of 4 groups
      const __m512i h = _mm512_loadu_si512(sb + PB::high + 128 * s + 64 * (j / 4));
      const int k = j % 4;  // the pair at bits 2k, moved to bits 4-5
      const __m512i t = k == 0   ? _mm512_slli_epi16(h, 4)
                        : k == 1 ? _mm512_slli_epi16(h, 2)
                        : k == 2 ? h
                                 : _mm512_srli_epi16(h, 2);
      u = _mm512_or_si512(u, _mm512_and_si512(t, _mm512_set1_epi8(0x30)));
    }
    return u;
  }
}

// Sub-block s's (half h's for Q6_K) scale and minimum of a superblock's 16 lanes.
template <int64_t kBase>
inline void scales_vnni(const uint8_t* sb, int s, int h, __m512* scale, __m512* min) {
  using PB = PanelBlock<kBase>;
  const __m512 d =
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + PB::d)));
  if constexpr (!PB::k_quant) {
    *scale = d;
    if constexpr (PB::has_min) {
      *min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + PB::m)));
    }
  } else if constexpr (kBase == kQ6_K) {
    const __m128i sc =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + PB::scales + 16 * (2 * s + h)));
    *scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
  } else {
    __m128i sc, mn;
    scale_min_k4_bytes<16>(sb + PB::scales, s, 0, &sc, &mn);
    const __m512 dmin =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + PB::m)));
    *scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
    const __m512 p = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
    *min = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(p), _mm512_set1_epi32(INT32_MIN)));
  }
}

template <int R, int C, int64_t kBase, int kPlanes, int kGroups>
void tile_vnni(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums, int pf) {
  using PB = PanelBlock<kBase>;
  constexpr int H = PB::halves > kGroups ? PB::halves : kGroups, JH = 8 / H;
  constexpr bool kJoin = kGroups == 2 && PB::halves == 1;  // see the header
  constexpr int64_t kBlockBytes = PB::bytes / PB::sub;  // a panel's bytes per 32 inputs
  __m512 acc[R][C], t[kJoin ? R : 1][kJoin ? C : 1];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < A.nb; ++b) {
    const int s = static_cast<int>(b % PB::sub);
    const int8_t* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = A.a + ((m0 + r) * A.nb + b) * 32 * kPlanes;
    const uint8_t* sb[C];
    for (int c = 0; c < C; ++c) sb[c] = pan[c] + b / PB::sub * PB::bytes;
    if constexpr (R < kTileRows) {  // few rows: this block's share of the stream, pf further on
      if (pf > 0) {
        for (int c = 0; c < C; ++c) {
          const uint8_t* at = pan[c] + b * kBlockBytes + pf;
          for (int64_t l = 0; l < kBlockBytes; l += 64) __builtin_prefetch(at + l);
        }
      }
    }
    // One row has too few chains of dependent VPDPBUSDs to hide their latency: its groups j
    // alternate between two sums per plane (integers: exact in any order).
    constexpr int S = R == 1 ? 2 : 1;
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      __m512i ph[S][R][C], pl[S][R][C];
      for (int k = 0; k < S; ++k)
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < C; ++c) ph[k][r][c] = pl[k][r][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int jj = 0; jj < JH; ++jj) {
        const int j = h * JH + jj;
        __m512i u[C];
        for (int c = 0; c < C; ++c) u[c] = group_vnni<kBase>(sb[c], s, j);
        for (int r = 0; r < R; ++r) {
          const __m512i ah = _mm512_set1_epi32(load_i32(ar[r] + 4 * j));
          for (int c = 0; c < C; ++c) {
            ph[jj % S][r][c] = _mm512_dpbusd_epi32(ph[jj % S][r][c], u[c], ah);
          }
          if constexpr (kPlanes == 2) {
            const __m512i al = _mm512_set1_epi32(load_i32(ar[r] + 32 + 4 * j));
            for (int c = 0; c < C; ++c) {
              pl[jj % S][r][c] = _mm512_dpbusd_epi32(pl[jj % S][r][c], u[c], al);
            }
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        __m512 scale, mn = _mm512_setzero_ps();
        if constexpr (!kJoin) scales_vnni<kBase>(sb[c], s, h, &scale, &mn);
        for (int r = 0; r < R; ++r) {
          const int64_t i = (m0 + r) * A.nb + b;
          __m512i p = ph[0][r][c], q = pl[0][r][c];
          if constexpr (S == 2) {
            p = _mm512_add_epi32(p, ph[1][r][c]);
            q = _mm512_add_epi32(q, pl[1][r][c]);
          }
          if constexpr (kPlanes == 2) {  // 255 * (u . hi) + u . lo, exact in int32
            p = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(p, 8), p), q);
          }
          if constexpr (PB::zero != 0) {
            p = _mm512_add_epi32(p, _mm512_set1_epi32(A.corr[i * H + h]));
          }
          const __m512 f = _mm512_cvtepi32_ps(p);
          if constexpr (kJoin) {  // t = P_0 * dx_0, then fma(P_1, dx_1, t)
            const __m512 dxh = _mm512_set1_ps(A.dx[i * 2 + h]);
            t[r][c] = h == 0 ? _mm512_mul_ps(f, dxh) : _mm512_fmadd_ps(f, dxh, t[r][c]);
          } else {
            const float dxi = A.dx[kGroups == 2 ? i * 2 + h : i];
            acc[r][c] = _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(dxi)), acc[r][c]);
            if constexpr (PB::has_min) {
              acc[r][c] = _mm512_fmadd_ps(mn, _mm512_set1_ps(corr_float(A, i)), acc[r][c]);
            }
          }
        }
      }
    }
    if constexpr (kJoin) {  // acc = fma(t, scale, acc), then the minimum's term
      for (int c = 0; c < C; ++c) {
        __m512 scale, mn = _mm512_setzero_ps();
        scales_vnni<kBase>(sb[c], s, 0, &scale, &mn);
        for (int r = 0; r < R; ++r) {
          acc[r][c] = _mm512_fmadd_ps(t[r][c], scale, acc[r][c]);
          if constexpr (PB::has_min) {
            const int64_t i = (m0 + r) * A.nb + b;
            acc[r][c] = _mm512_fmadd_ps(mn, _mm512_set1_ps(corr_float(A, i)), acc[r][c]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(sums + (r * C + c) * 16, acc[r][c]);
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// Group j of sub-block s, lanes 8 * half .. 8 * half + 7 (32 bytes). Q8_0 as q (int8: the
// signed form below), the others as u.
template <int64_t kBase>
inline __m256i group_avx2(const uint8_t* sb, int s, int j, int half) {
  using PB = PanelBlock<kBase>;
  const auto load = [](const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  };
  if constexpr (kBase == kQ8_0) {
    return _mm256_xor_si256(load(sb + 64 * j + 32 * half),
                            _mm256_set1_epi8(static_cast<char>(0x80)));  // q as int8
  } else {
    const __m256i v = load(sb + 256 * s + 64 * (j / 2) + 32 * half);
    __m256i u = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
    if constexpr (kBase == kQ5_K) {  // the half's 32 mask bits, one per byte
      uint32_t bits;
      std::memcpy(&bits, sb + PB::high + 64 * s + 8 * j + 4 * half, 4);
      const __m256i spread = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(bits)),
          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                           2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
      u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)));
    } else if constexpr (kBase == kQ6_K) {
      const __m256i h = load(sb + PB::high + 128 * s + 64 * (j / 4) + 32 * half);
      const int k = j % 4;
      const __m256i t = k == 0   ? _mm256_slli_epi16(h, 4)
                        : k == 1 ? _mm256_slli_epi16(h, 2)
                        : k == 2 ? h
                                 : _mm256_srli_epi16(h, 2);
      u = _mm256_or_si256(u, _mm256_and_si256(t, _mm256_set1_epi8(0x30)));
    }
    return u;
  }
}

template <int64_t kBase>
inline void scales_avx2(const uint8_t* sb, int s, int h, int half, __m256* scale, __m256* min) {
  using PB = PanelBlock<kBase>;
  const auto halfs = [&](int64_t off) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + off + 16 * half)));
  };
  const __m256 d = halfs(PB::d);
  if constexpr (!PB::k_quant) {
    *scale = d;
    if constexpr (PB::has_min) *min = halfs(PB::m);
  } else if constexpr (kBase == kQ6_K) {
    const __m128i sc = _mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(sb + PB::scales + 16 * (2 * s + h) + 8 * half));
    *scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
  } else {
    __m128i sc, mn;
    scale_min_k4_bytes<8>(sb + PB::scales, s, 8 * half, &sc, &mn);
    *scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
    const __m256 p = _mm256_mul_ps(halfs(PB::m), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
    *min = _mm256_castsi256_ps(
        _mm256_xor_si256(_mm256_castps_si256(p), _mm256_set1_epi32(INT32_MIN)));
  }
}

// Half-panels of 8 lanes: VPMADDUBSW + VPMADDWD. Q8_0 through the signed form (|q| times a
// with q's sign: pairs stay within int16), which sums q * a directly (no zero term); the
// other formats as u * a (u <= 63: pairs within int16) plus zero * S.
template <int R, int C, int64_t kBase, int kPlanes, int kGroups>
void tile_avx2(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums, int pf) {
  using PB = PanelBlock<kBase>;
  constexpr int H = PB::halves > kGroups ? PB::halves : kGroups, JH = 8 / H;
  constexpr bool kJoin = kGroups == 2 && PB::halves == 1;
  constexpr int64_t kBlockBytes = PB::bytes / PB::sub;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R][C], t[kJoin ? R : 1][kJoin ? C : 1];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < A.nb; ++b) {
      const int s = static_cast<int>(b % PB::sub);
      const int8_t* ar[R];
      for (int r = 0; r < R; ++r) ar[r] = A.a + ((m0 + r) * A.nb + b) * 32 * kPlanes;
      const uint8_t* sb[C];
      for (int c = 0; c < C; ++c) sb[c] = pan[c] + b / PB::sub * PB::bytes;
      if constexpr (R < kTileRows) {
        if (pf > 0 && half == 0) {
          for (int c = 0; c < C; ++c) {
            const uint8_t* at = pan[c] + b * kBlockBytes + pf;
            for (int64_t l = 0; l < kBlockBytes; l += 64) __builtin_prefetch(at + l);
          }
        }
      }
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) {
        __m256i ph[R][C], pl[R][C];
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < C; ++c) ph[r][c] = pl[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int jj = 0; jj < JH; ++jj) {
          const int j = h * JH + jj;
          __m256i u[C];
          for (int c = 0; c < C; ++c) u[c] = group_avx2<kBase>(sb[c], s, j, half);
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
          __m256 scale, mn = _mm256_setzero_ps();
          if constexpr (!kJoin) scales_avx2<kBase>(sb[c], s, h, half, &scale, &mn);
          for (int r = 0; r < R; ++r) {
            const int64_t i = (m0 + r) * A.nb + b;
            __m256i p = ph[r][c];
            if constexpr (kPlanes == 2) {
              p = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(p, 8), p), pl[r][c]);
            }
            if constexpr (PB::zero != 0 && kBase != kQ8_0) {
              p = _mm256_add_epi32(p, _mm256_set1_epi32(A.corr[i * H + h]));
            }
            const __m256 f = _mm256_cvtepi32_ps(p);
            if constexpr (kJoin) {
              const __m256 dxh = _mm256_set1_ps(A.dx[i * 2 + h]);
              t[r][c] = h == 0 ? _mm256_mul_ps(f, dxh) : _mm256_fmadd_ps(f, dxh, t[r][c]);
            } else {
              const float dxi = A.dx[kGroups == 2 ? i * 2 + h : i];
              acc[r][c] =
                  _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(dxi)), acc[r][c]);
              if constexpr (PB::has_min) {
                acc[r][c] = _mm256_fmadd_ps(mn, _mm256_set1_ps(corr_float(A, i)), acc[r][c]);
              }
            }
          }
        }
      }
      if constexpr (kJoin) {
        for (int c = 0; c < C; ++c) {
          __m256 scale, mn = _mm256_setzero_ps();
          scales_avx2<kBase>(sb[c], s, 0, half, &scale, &mn);
          for (int r = 0; r < R; ++r) {
            acc[r][c] = _mm256_fmadd_ps(t[r][c], scale, acc[r][c]);
            if constexpr (PB::has_min) {
              const int64_t i = (m0 + r) * A.nb + b;
              acc[r][c] = _mm256_fmadd_ps(mn, _mm256_set1_ps(corr_float(A, i)), acc[r][c]);
            }
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(sums + (r * C + c) * 16 + 8 * half, acc[r][c]);
  }
}
#endif

// u of lane r, value v (0..31) of sub-block s of a superblock.
template <int64_t kBase>
inline int value_at(const uint8_t* sb, int s, int lane, int v) {
  using PB = PanelBlock<kBase>;
  const int j = v / 4, pos = 4 * lane + v % 4;
  if constexpr (kBase == kQ8_0) {
    return sb[64 * j + pos];
  } else {
    int u = (sb[256 * s + 64 * (j / 2) + pos] >> (4 * (j % 2))) & 0xF;
    if constexpr (kBase == kQ5_K) {
      u |= ((sb[PB::high + 64 * s + 8 * j + pos / 8] >> (pos % 8)) & 1) << 4;
    } else if constexpr (kBase == kQ6_K) {
      u |= ((sb[PB::high + 128 * s + 64 * (j / 4) + pos] >> (2 * (j % 4))) & 3) << 4;
    }
    return u;
  }
}

// Portable: the same operations per output, one lane at a time.
template <int R, int C, int64_t kBase, int kPlanes, int kGroups>
void tile_scalar(const PanelActs& A, int64_t m0, const uint8_t* const* pan, float* sums, int) {
  using PB = PanelBlock<kBase>;
  constexpr int H = PB::halves > kGroups ? PB::halves : kGroups;
  constexpr bool kJoin = kGroups == 2 && PB::halves == 1;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      for (int lane = 0; lane < kRows; ++lane) {
        float acc = 0.0f;
        for (int64_t b = 0; b < A.nb; ++b) {
          const int s = static_cast<int>(b % PB::sub);
          const int64_t i = (m0 + r) * A.nb + b;
          const int8_t* a = A.a + i * 32 * kPlanes;
          const uint8_t* sb = pan[c] + b / PB::sub * PB::bytes;
          const float d = half_to_float(sb + PB::d + 2 * lane);
          float t = 0.0f, scale = d, mn = 0.0f;
          for (int h = 0; h < H; ++h) {
            int32_t ph = 0, pl = 0;
            for (int v = 32 / H * h; v < 32 / H * (h + 1); ++v) {
              const int u = value_at<kBase>(sb, s, lane, v);
              ph += u * a[v];
              if constexpr (kPlanes == 2) pl += u * a[32 + v];
            }
            int32_t p = kPlanes == 2 ? 255 * ph + pl : ph;
            if constexpr (PB::zero != 0) p += A.corr[i * H + h];
            if constexpr (kBase == kQ6_K) {
              const auto sc = static_cast<int8_t>(sb[PB::scales + 16 * (2 * s + h) + lane]);
              scale = d * static_cast<float>(sc);
            } else if constexpr (PB::k_quant) {
              int sc, m;
              scale_min_k4(sb + PB::scales, s, lane, &sc, &m);
              scale = d * static_cast<float>(sc);
              mn = -(half_to_float(sb + PB::m + 2 * lane) * static_cast<float>(m));
            } else if constexpr (PB::has_min) {
              mn = half_to_float(sb + PB::m + 2 * lane);
            }
            if constexpr (kJoin) {
              const float dxh = A.dx[i * 2 + h];
              t = h == 0 ? static_cast<float>(p) * dxh : std::fma(static_cast<float>(p), dxh, t);
            } else {
              const float dxi = A.dx[kGroups == 2 ? i * 2 + h : i];
              acc = std::fma(static_cast<float>(p), scale * dxi, acc);
              if constexpr (PB::has_min) acc = std::fma(mn, corr_float(A, i), acc);
            }
          }
          if constexpr (kJoin) {
            acc = std::fma(t, scale, acc);
            if constexpr (PB::has_min) acc = std::fma(mn, corr_float(A, i), acc);
          }
        }
        sums[(r * C + c) * 16 + lane] = acc;
      }
    }
  }
}

using TileFn = void (*)(const PanelActs&, int64_t, const uint8_t* const*, float*, int);

template <int R, int C, int64_t kBase, int kPlanes, int kGroups>
TileFn tile_fn(int isa) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == 0) return tile_vnni<R, C, kBase, kPlanes, kGroups>;
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  if (isa <= 1) return tile_avx2<R, C, kBase, kPlanes, kGroups>;
#endif
  (void)isa;
  return tile_scalar<R, C, kBase, kPlanes, kGroups>;
}

// Tile R x 2's sums stored for rows m0 .. of panels p .. (s0: the first of the pair), the
// bias added (+ 0.0f without one, as one value at a time: -0 becomes +0), rounded once.
template <typename O>
void store_tile(const float* sums, int R, int64_t m0, int64_t n_first, int64_t num_panels,
                int64_t N, O* out, int64_t ldo, const float* bias) {
  for (int r = 0; r < R; ++r) {
    O* o = out + (m0 + r) * ldo;
    for (int c = 0; c < num_panels; ++c) {
      const int64_t n0 = n_first + c * kRows;
      const float* sum = sums + (r * 2 + c) * kRows;
      if (n0 + kRows <= N) {  // a whole panel: the same sums and roundings, in vectors
        for (int64_t l = 0; l < kRows; l += vec::kLanes) {
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
}

// An item's rows: 4-row tiles, then one tile of what is left. Fewer than 2 panels: the slot
// past the last repeats it (computed, not stored).
template <typename O, int64_t kBase, int kPlanes, int kGroups, int kIsa>
void panel_rows(const PanelActs& A, int64_t m_begin, int64_t m_end, const uint8_t* const* pan,
                int64_t num_panels, int64_t n0, int64_t N, void* out, int64_t ldo,
                const float* bias, int pf) {
  const TileFn r4 = tile_fn<4, 2, kBase, kPlanes, kGroups>(kIsa);
  const TileFn rest[3] = {tile_fn<1, 2, kBase, kPlanes, kGroups>(kIsa),
                          tile_fn<2, 2, kBase, kPlanes, kGroups>(kIsa),
                          tile_fn<3, 2, kBase, kPlanes, kGroups>(kIsa)};
  const uint8_t* pair[2] = {pan[0], pan[num_panels > 1 ? 1 : 0]};
  O* o = static_cast<O*>(out);
  alignas(64) float sums[kTileRows * 2 * kRows];
  int64_t m0 = m_begin;
  for (; m0 + kTileRows <= m_end; m0 += kTileRows) {
    r4(A, m0, pair, sums, pf);
    store_tile(sums, kTileRows, m0, n0, num_panels, N, o, ldo, bias);
  }
  if (m0 < m_end) {
    const int left = static_cast<int>(m_end - m0);
    rest[left - 1](A, m0, pair, sums, pf);
    store_tile(sums, left, m0, n0, num_panels, N, o, ldo, bias);
  }
}

template <int64_t kBase, int kPlanes, int kGroups, int kIsa>
PanelRowsFn rows_for_isa(bool out_bf16) {
  return out_bf16 ? panel_rows<vec::bf16_t, kBase, kPlanes, kGroups, kIsa>
                  : panel_rows<float, kBase, kPlanes, kGroups, kIsa>;
}

template <int64_t kBase, int kPlanes, int kGroups>
PanelRowsFn rows_for(int isa, bool out_bf16) {
  switch (isa) {
    case 0: return rows_for_isa<kBase, kPlanes, kGroups, 0>(out_bf16);
    case 1: return rows_for_isa<kBase, kPlanes, kGroups, 1>(out_bf16);
    default: return rows_for_isa<kBase, kPlanes, kGroups, 2>(out_bf16);
  }
}

// 16-bit activations (two planes) take one scale per block; 8-bit ones one or two.
template <int64_t kBase>
PanelRowsFn rows_for_planes(int planes, int groups, int isa, bool out_bf16) {
  if (planes == 2) return rows_for<kBase, 2, 1>(isa, out_bf16);
  return groups == 2 ? rows_for<kBase, 1, 2>(isa, out_bf16) : rows_for<kBase, 1, 1>(isa, out_bf16);
}

}  // namespace

PanelRowsFn panel_rows_fn(int64_t base, int planes, int groups, int isa, bool out_bf16) {
  switch (base) {
    case kQ4_0: return rows_for_planes<kQ4_0>(planes, groups, isa, out_bf16);
    case kQ4_1: return rows_for_planes<kQ4_1>(planes, groups, isa, out_bf16);
    case kQ8_0: return rows_for_planes<kQ8_0>(planes, groups, isa, out_bf16);
    case kQ4_K: return rows_for_planes<kQ4_K>(planes, groups, isa, out_bf16);
    case kQ5_K: return rows_for_planes<kQ5_K>(planes, groups, isa, out_bf16);
    case kQ6_K: return rows_for_planes<kQ6_K>(planes, groups, isa, out_bf16);
    default: TORCH_CHECK(false, "no panel kernel for format ", base);
  }
}

}  // namespace pagedllm::quant
