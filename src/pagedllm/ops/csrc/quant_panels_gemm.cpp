// Many rows of a GGUF panel weight (quant_panels.cpp's layout) on AVX512-VNNI: the panel
// kernel's work item (a row block x 2 panels of 16 weight rows) in register tiles of 4 rows x
// 2 panels, each tile's outputs stored from its accumulators as vectors (bias added, bf16
// rounded) instead of one value at a time.
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && PA_LANES == 16

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

// Rows m0 .. m0 + 3 times panels pan[0], pan[1] (32 weight rows from n0), stored to out.
template <int64_t kBase, int kPlanes, typename O>
void tile(const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, O* out, int64_t ldo,
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
  // sum + bias (+ 0 without one: -0 sums store as +0, as the panel kernel's stores do).
  __m512 bv[C];
  for (int c = 0; c < C; ++c) {
    bv[c] = bias ? _mm512_loadu_ps(bias + n0 + kRows * c) : _mm512_setzero_ps();
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const __m512 v = _mm512_add_ps(acc[r][c], bv[c]);
      vec::store(out + (m0 + r) * ldo + n0 + kRows * c, reinterpret_cast<vec::vfloat>(v));
    }
  }
}

using TileFn = void (*)(const PanelGemmActs&, int64_t, const uint8_t* const*, void*, int64_t,
                        int64_t, const float*);

template <int64_t kBase, int kPlanes, typename O>
void tile_erased(const PanelGemmActs& A, int64_t m0, const uint8_t* const* pan, void* out,
                 int64_t ldo, int64_t n0, const float* bias) {
  tile<kBase, kPlanes, O>(A, m0, pan, static_cast<O*>(out), ldo, n0, bias);
}

template <typename O>
TileFn tile_for(int64_t base, int planes) {
  switch (base * 2 + planes - 1) {
    case kQ4_0 * 2: return tile_erased<kQ4_0, 1, O>;
    case kQ4_0 * 2 + 1: return tile_erased<kQ4_0, 2, O>;
    case kQ4_1 * 2: return tile_erased<kQ4_1, 1, O>;
    case kQ4_1 * 2 + 1: return tile_erased<kQ4_1, 2, O>;
    case kQ8_0 * 2: return tile_erased<kQ8_0, 1, O>;
    case kQ8_0 * 2 + 1: return tile_erased<kQ8_0, 2, O>;
    default: return nullptr;
  }
}

#endif

}  // namespace

int64_t panel_gemm_rows(int64_t base, int planes, const PanelGemmActs& acts, int64_t m0,
                        int64_t m_end, const uint8_t* const* pan, int64_t num_panels,
                        int64_t n0, int64_t N, void* out, bool out_bf16, int64_t ldo,
                        const float* bias) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && PA_LANES == 16
  // Whole tiles of two whole panels only; the panel kernel's own tiles take the rest.
  if (active_quant_isa() != 0 || num_panels != 2 || n0 + 2 * kRows > N) return m0;
  const TileFn fn = out_bf16 ? tile_for<vec::bf16_t>(base, planes) : tile_for<float>(base, planes);
  if (fn == nullptr) return m0;
  for (; m0 + kTileRows <= m_end; m0 += kTileRows) fn(acts, m0, pan, out, ldo, n0, bias);
#else
  (void)base, (void)planes, (void)acts, (void)m_end, (void)pan, (void)num_panels, (void)n0,
      (void)N, (void)out, (void)out_bf16, (void)ldo, (void)bias;
#endif
  return m0;
}

}  // namespace pagedllm::quant
