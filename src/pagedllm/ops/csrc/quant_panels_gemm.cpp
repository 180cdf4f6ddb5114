// Many rows of a GGUF panel weight (quant_panels.cpp's layout): the panel kernel's work item
// (a row block x 2 panels of 16 weight rows) in register tiles of 4 rows x 2 panels, on
// AVX512-VNNI (VPDPBUSD) or AVX2 (VPMADDUBSW + VPMADDWD, half-panels of 8 lanes), each tile's
// outputs stored as vectors (bias added, bf16 rounded) instead of one value at a time. The
// scalar path, a partial panel pair and the rows left over (fewer than 4) take the panel
// kernel's own tiles.
//
// Batch invariance: an output takes exactly the panel kernel's operations (quant_panels.cpp's
// header): per block in order, the block's integer sum P (exact: any order) converted to float,
// acc = fma(float(P), d * dx, acc), then acc = fma(m, dx * S, acc) for Q4_1; at the end
// sum + bias (+ 0 without bias, as the panel kernel's stores) rounded once to the output
// type. So a row's bits are the same in a tile here as in the panel kernel's tiles of 1-3 rows
// or in its AVX2 and scalar paths (tests/ops/test_quant_panels_gemm.py checks 1-300 rows).
//
// NOTE: measured in a standalone harness on the 2-core Zen 5 (CPU time, one thread, Q4_1
// with 16-bit activations, K 576): the 4 x 2 tile runs 10.0-10.2 cycles per row x panel x
// block, against a floor of 9.5 (16 VPDPBUSD, one multiply and two FMAs share the two FMA
// pipes); 6 x 2, 4 x 3, 8 x 1 and 5 x 2 tiles with the planes chained in one accumulator (to
// fit the registers) were 5-17% slower (the chain's latency). What the panel kernel spent
// besides its tiles was the per-value stores: 16% of a 256-row call under perf.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

constexpr int64_t kRows = 16;  // weight rows per panel (quant_panels.cpp)
constexpr int kTileRows = 4;

// A panel block's layout (quant_panels.cpp's PanelBlock): values, then d (and Q4_1's m).
template <int64_t kBase>
struct Block {
  static constexpr int64_t values = kBase == kQ8_0 ? 512 : 256;
  static constexpr int64_t bytes = kBase == kQ8_0 ? 16 * 34 : kBase == kQ4_1 ? 16 * 20 : 16 * 18;
  static constexpr bool has_min = kBase == kQ4_1;
  static constexpr int zero = kBase == kQ8_0 ? -128 : kBase == kQ4_0 ? -8 : 0;
};

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

using TileFn = void (*)(const PanelGemmActs&, int64_t, const uint8_t* const*, void*, int64_t,
                        int64_t, const float*);

// out[0:kWidth] = v + bias (+ 0 without one: -0 sums store as +0), rounded once to O: the
// panel kernel's store of each value, kLanes at a time where they fit.
template <int kWidth, typename O>
inline void store_sums(O* out, const float* v, const float* bias) {
  if constexpr (kWidth % vec::kLanes == 0) {
    for (int i = 0; i < kWidth; i += vec::kLanes) {
      const vec::vfloat b = bias ? vec::load(bias + i) : vec::vfloat{};
      vec::store(out + i, vec::load(v + i) + b);
    }
  } else {  // AVX2's 8 lanes forced on an AVX-512 build (a test hook)
    for (int i = 0; i < kWidth; ++i) vec::store1(out, i, v[i] + (bias ? bias[i] : 0.0f));
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && PA_LANES == 16
template <int64_t kBase, int kPlanes, typename O>
void tile_vnni(const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, O* out, int64_t ldo,
          int64_t n0, const float* bias) {
  using PB = Block<kBase>;
  constexpr int R = kTileRows, C = 2;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < A.nb; ++b) {
    const int8_t* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = A.a + ((m0 + r) * A.nb + b) * 32 * kPlanes;
    const uint8_t* blk[C];
    for (int c = 0; c < C; ++c) blk[c] = pan[c] + b * PB::bytes;
    __m512i ph[R][C], pl[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) ph[r][c] = pl[r][c] = _mm512_setzero_si512();
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
        for (int c = 0; c < C; ++c) ph[r][c] = _mm512_dpbusd_epi32(ph[r][c], u[c], ah);
        if constexpr (kPlanes == 2) {
          const __m512i al = _mm512_set1_epi32(load_i32(ar[r] + 32 + 4 * j));
          for (int c = 0; c < C; ++c) pl[r][c] = _mm512_dpbusd_epi32(pl[r][c], u[c], al);
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
        __m512i p = ph[r][c];
        if constexpr (kPlanes == 2) {  // 255 * (u . hi) + u . lo, exact in int32
          p = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(p, 8), p), pl[r][c]);
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
  alignas(64) float sums[16];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(sums, acc[r][c]);
      store_sums<16>(out + (m0 + r) * ldo + n0 + kRows * c, sums,
                     bias ? bias + n0 + kRows * c : nullptr);
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// The panel kernel's AVX2 arithmetic (quant_panels.cpp's tile_avx2): half-panels of 8 lanes,
// VPMADDUBSW + VPMADDWD; Q8_0 through the signed form (|q| times a with q's sign), the nibble
// formats as u * a plus zero * S.
template <int64_t kBase, int kPlanes, typename O>
void tile_avx2(const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, O* out,
               int64_t ldo, int64_t n0, const float* bias) {
  using PB = Block<kBase>;
  constexpr int R = kTileRows, C = 2;
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
    alignas(32) float sums[8];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        const int64_t n = n0 + kRows * c + 8 * half;
        _mm256_store_ps(sums, acc[r][c]);
        store_sums<8>(out + (m0 + r) * ldo + n, sums, bias ? bias + n : nullptr);
      }
    }
  }
}
#endif

template <int64_t kBase, int kPlanes, typename O>
TileFn tile_fn(int isa) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && PA_LANES == 16
  if (isa == 0) {
    return [](const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, void* out,
              int64_t ldo, int64_t n0, const float* bias) {
      tile_vnni<kBase, kPlanes>(A, m0, pan, static_cast<O*>(out), ldo, n0, bias);
    };
  }
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  if (isa == 1) {
    return [](const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, void* out,
              int64_t ldo, int64_t n0, const float* bias) {
      tile_avx2<kBase, kPlanes>(A, m0, pan, static_cast<O*>(out), ldo, n0, bias);
    };
  }
#endif
  (void)isa;
  return nullptr;  // scalar: the panel kernel's tiles
}

template <typename O>
TileFn tile_for(int64_t base, int planes, int isa) {
  switch (base * 2 + planes - 1) {
    case kQ4_0 * 2: return tile_fn<kQ4_0, 1, O>(isa);
    case kQ4_0 * 2 + 1: return tile_fn<kQ4_0, 2, O>(isa);
    case kQ4_1 * 2: return tile_fn<kQ4_1, 1, O>(isa);
    case kQ4_1 * 2 + 1: return tile_fn<kQ4_1, 2, O>(isa);
    case kQ8_0 * 2: return tile_fn<kQ8_0, 1, O>(isa);
    case kQ8_0 * 2 + 1: return tile_fn<kQ8_0, 2, O>(isa);
    default: return nullptr;
  }
}

}  // namespace

int64_t panel_gemm_rows(int64_t base, int planes, const PanelGemmActs& acts, int64_t m0,
                        int64_t m_end, const uint8_t* const* pan, int64_t num_panels,
                        int64_t n0, int64_t N, void* out, bool out_bf16, int64_t ldo,
                        const float* bias) {
  // Whole tiles of two whole panels only; the panel kernel's own tiles take the rest.
  if (num_panels != 2 || n0 + 2 * kRows > N) return m0;
  const int isa = active_quant_isa();
  const TileFn fn = out_bf16 ? tile_for<vec::bf16_t>(base, planes, isa)
                             : tile_for<float>(base, planes, isa);
  if (fn == nullptr) return m0;
  for (; m0 + kTileRows <= m_end; m0 += kTileRows) fn(acts, m0, pan, out, ldo, n0, bias);
  return m0;
}

}  // namespace pagedllm::quant
