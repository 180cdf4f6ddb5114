// A linear layer on a weight packed once into column panels, in fp32 or bf16: out = x @ W.T + b.
// Up to kFewRows rows (decode of a few sequences) it makes sequential passes over the panels
// (see "Few rows" below); above, a register-tiled GEMM (decode of many sequences, prefill).
//
// Why not oneDNN alone: on CPUs without bf16 GEMM instructions (AVX2, AVX-512 without
// AVX512_BF16) oneDNN takes only fp32 weights, so a bf16 model would stream twice the weight
// bytes every step and convert every activation to fp32 and back around each call. Here the
// panels stay bf16 in memory; each panel's slice is widened to fp32 once into a small buffer
// and then reused by every row of x, so the conversion costs 1/M of the arithmetic.
//
// Layout: packed[p, k, j] = W[p * P + j, k] with P = 2 vectors of lanes (16 on AVX2), zero
// past N. Each thread owns whole panels (no two threads write the same output column). For a
// panel and a chunk of kKc inputs, a 6 x P register tile of out is updated with broadcast FMAs
// (the classic BLIS AVX2 micro-kernel shape: 12 accumulators, 2 weight vectors, 1 broadcast).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <unistd.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "deal.h"
#include "ops.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16_t;
using vec::kLanes;
using vec::vfloat;

constexpr int kPanel = 2 * kLanes;  // output columns per panel
constexpr int kMr = 6;              // rows of x per register tile
constexpr int64_t kKc = 256;        // inputs per chunk: a chunk of a panel is 16 KB of fp32

// Bytes of a block of x rows, kept in L2: 25/32 of this core's L2 (400 KB of 512 here; 192 KB
// where the size is unknown). Same-process A/B against 192 KB on this 512 KB L2: the down
// projection (K = 1536) at 64 rows 13% faster (all rows fit one block, so the weight streams
// once), 2-6% at 128 and 2048 rows, others even; 480 and 600 KB tie with 400.
int64_t x_block_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::clamp<int64_t>(l2 / 32 * 25, 128 * 1024, 1024 * 1024) : 192 * 1024;
  }();
  return bytes;
}

// acc[0:R, 0:kPanel] (+)= a[0:R, 0:kc] @ b[0:kc, 0:kPanel]; a is a row tile of x, element
// (r, k) at a[k * kMr + r]; acc has row stride kPanel. A bf16 chunk is widened on the way and
// its fp32 copy written to `widened`, where the block's later tiles read it: widening inside the
// first tile overlaps the conversion with that tile's FMAs (same-process A/B against a separate
// widening pass: 3-9% faster at 64-2048 rows).
template <int R, bool kAccumulate, typename B>
void tile(const float* a, const B* b, int64_t kc, float* acc, float* widened) {
  vfloat c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = kAccumulate ? vec::load(acc + r * kPanel) : vfloat{};
    c1[r] = kAccumulate ? vec::load(acc + r * kPanel + kLanes) : vfloat{};
  }
  // Unrolled: same-process A/B at 64 rows 8-12% faster than the plain loop (2048 rows: 6%).
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const vfloat b0 = vec::load(b + k * kPanel), b1 = vec::load(b + k * kPanel + kLanes);
    if constexpr (!std::is_same_v<B, float>) {
      vec::store(widened + k * kPanel, b0);
      vec::store(widened + k * kPanel + kLanes, b1);
    }
    for (int r = 0; r < R; ++r) {
      const vfloat av = vec::splat(a[k * kMr + r]);
      c0[r] = vec::fma(av, b0, c0[r]);
      c1[r] = vec::fma(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    vec::store(acc + r * kPanel, c0[r]);
    vec::store(acc + r * kPanel + kLanes, c1[r]);
  }
}

// tile<kMr> over two row tiles at once (a0: rows 0-5, a1: rows 6-11 of acc): with AVX-512's 32
// vector registers, 24 accumulators take each weight vector to 12 rows instead of 6 (fp32,
// two threads, SmolLM2's 30 layers, measured in turn: 1024 rows 0.93x the time, 16-256 even).
// Each output's sum is the same as tile's (one chain over k), so a row's bits do not depend
// on which of the two kernels its tile takes.
template <bool kAccumulate, typename B>
void tile12(const float* a0, const float* a1, const B* b, int64_t kc, float* acc,
            float* widened) {
  constexpr int R = 2 * kMr;
  vfloat c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = kAccumulate ? vec::load(acc + r * kPanel) : vfloat{};
    c1[r] = kAccumulate ? vec::load(acc + r * kPanel + kLanes) : vfloat{};
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const vfloat b0 = vec::load(b + k * kPanel), b1 = vec::load(b + k * kPanel + kLanes);
    if constexpr (!std::is_same_v<B, float>) {
      vec::store(widened + k * kPanel, b0);
      vec::store(widened + k * kPanel + kLanes, b1);
    }
    for (int r = 0; r < kMr; ++r) {
      const vfloat av = vec::splat(a0[k * kMr + r]);
      c0[r] = vec::fma(av, b0, c0[r]);
      c1[r] = vec::fma(av, b1, c1[r]);
    }
    for (int r = 0; r < kMr; ++r) {
      const vfloat av = vec::splat(a1[k * kMr + r]);
      c0[kMr + r] = vec::fma(av, b0, c0[kMr + r]);
      c1[kMr + r] = vec::fma(av, b1, c1[kMr + r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    vec::store(acc + r * kPanel, c0[r]);
    vec::store(acc + r * kPanel + kLanes, c1[r]);
  }
}

template <typename B>
using Tile12Fn = void (*)(const float*, const float*, const B*, int64_t, float*, float*);

template <typename B>
Tile12Fn<B> tile12_fn(bool accumulate) {
  return accumulate ? tile12<true, B> : tile12<false, B>;
}

template <typename B>
using TileFn = void (*)(const float*, const B*, int64_t, float*, float*);

template <typename B, bool kAccumulate>
TileFn<B> tile_fn(int64_t rows) {
  switch (rows) {
    case 1: return tile<1, kAccumulate, B>;
    case 2: return tile<2, kAccumulate, B>;
    case 3: return tile<3, kAccumulate, B>;
    case 4: return tile<4, kAccumulate, B>;
    case 5: return tile<5, kAccumulate, B>;
    default: return tile<kMr, kAccumulate, B>;
  }
}

template <typename B>
TileFn<B> tile_fn(int64_t rows, bool accumulate) {
  return accumulate ? tile_fn<B, true>(rows) : tile_fn<B, false>(rows);
}


// SwiGLU's gate silu(gate) * up at k .. k + kLanes - 1 (gate_lanes) or at k (gate_value) of a
// row [gate | up] of 2K values, rounded as the separate silu_and_mul op's store into T rounds
// it (vec::silu_mul is the op's own arithmetic), so the fused paths give the op's bits.
template <typename T>
vfloat gate_lanes(const T* row, int64_t K, int64_t k) {
  return vec::round_as<T>(vec::silu_mul<T>(vec::load(row + k), vec::load(row + K + k)));
}
template <typename T>
float gate_value(const T* row, int64_t K, int64_t k) {
  return vec::round_as<T>(vec::silu_mul<T>(vec::load1(row, k), vec::load1(row, K + k)));
}

// The rows of x as the kernels take them, in fp32: they arrive as T (fp32/bf16, element k of
// row m at src[m * ldx + k * kx]); with `gated`, a row is [gate | up] and its value at k the
// gate (gate_lanes / gate_value), so the gated rows never go through memory (same-process A/B
// against the separate op + the layer, SmolLM2's down projection in bf16: 2048 rows 15%
// faster, 256 rows 3%, 16 rows 5%, 64 rows even).
template <typename T>
struct XRows {
  const T* src;
  int64_t ldx, kx;
  bool gated;
  int64_t M, K;

  // Row m's values at k .. k + kLanes - 1 (for kx == 1).
  vfloat lanes(int64_t m, int64_t k) const {
    return gated ? gate_lanes(src + m * ldx, K, k) : vec::load(src + m * ldx + k);
  }
  float value(int64_t m, int64_t k) const {
    return gated ? gate_value(src + m * ldx, K, k) : vec::load1(src + m * ldx, k * kx);
  }
  // Row m's values from k_begin (a multiple of kLanes) on, value k at dst[(k - k_begin) *
  // stride]: in vectors on the grid the separate silu_and_mul op uses while whole ones fit (its
  // scalar tail may differ from its vectors in the last bit), then one by one.
  void write_row(int64_t m, int64_t k_begin, float* dst, int64_t stride) const {
    int64_t k = k_begin;
    if (kx == 1) {
      for (; k + kLanes <= K; k += kLanes) {
        const vfloat v = lanes(m, k);
        if (stride == 1) {
          vec::store(dst + (k - k_begin), v);
        } else {
          for (int i = 0; i < kLanes; ++i) dst[(k - k_begin + i) * stride] = v[i];
        }
      }
    }
    for (; k < K; ++k) dst[(k - k_begin) * stride] = value(m, k);
  }
};

// x as fp32 row tiles: tile t holds rows t * kMr .. + kMr - 1, element (r, k) at
// [(t * K + k) * kMr + r], so a register tile's broadcasts walk one contiguous stream. A tile's
// rows past M are never read.

// Writes tile t of x (see XRows). Eight k at a time, the tile's rows are loaded as vectors and
// transposed in registers: a scalar copy cost 1-2 cycles per element, 3-20% of a projection
// (the larger share for narrow outputs, where each packed element feeds fewer FMAs).
template <typename T>
void pack_tile(const XRows<T>& x, int64_t t, float* dst) {
  static_assert(kMr == 6, "the transpose below writes 6 rows");
  typedef float v8 __attribute__((vector_size(32)));
  const int64_t m0 = t * kMr, rows = std::min<int64_t>(kMr, x.M - m0), K = x.K;
  int64_t k0 = 0;
  if (x.kx == 1) {
    // Blocks whose 8-float stores may run 2 floats past the block (into the next one, written
    // after) stop short of the tile's last 8 k, which the scalar loop below writes.
    for (; k0 + kLanes + 8 <= K; k0 += kLanes) {
      vfloat v[kMr];
      for (int r = 0; r < kMr; ++r) v[r] = r < rows ? x.lanes(m0 + r, k0) : vfloat{};
      for (int h = 0; h < kLanes; h += 8) {
        v8 w[kMr];
        for (int r = 0; r < kMr; ++r) std::memcpy(&w[r], reinterpret_cast<const float*>(&v[r]) + h, 32);
        // 6 x 8 -> 8 x 6: pairs, then quads, then 128-bit halves (rows 6 and 7 are zero).
        const v8 z{};
        const v8 a0 = __builtin_shufflevector(w[0], w[1], 0, 8, 1, 9, 4, 12, 5, 13);
        const v8 a1 = __builtin_shufflevector(w[0], w[1], 2, 10, 3, 11, 6, 14, 7, 15);
        const v8 a2 = __builtin_shufflevector(w[2], w[3], 0, 8, 1, 9, 4, 12, 5, 13);
        const v8 a3 = __builtin_shufflevector(w[2], w[3], 2, 10, 3, 11, 6, 14, 7, 15);
        const v8 a4 = __builtin_shufflevector(w[4], w[5], 0, 8, 1, 9, 4, 12, 5, 13);
        const v8 a5 = __builtin_shufflevector(w[4], w[5], 2, 10, 3, 11, 6, 14, 7, 15);
        // b_j: rows 0-3 of k = j, j + 4 (j < 4), in the two 128-bit halves.
        const v8 b0 = __builtin_shufflevector(a0, a2, 0, 1, 8, 9, 4, 5, 12, 13);
        const v8 b1 = __builtin_shufflevector(a0, a2, 2, 3, 10, 11, 6, 7, 14, 15);
        const v8 b2 = __builtin_shufflevector(a1, a3, 0, 1, 8, 9, 4, 5, 12, 13);
        const v8 b3 = __builtin_shufflevector(a1, a3, 2, 3, 10, 11, 6, 7, 14, 15);
        // c_j: rows 4-5 (and two zeros) of k = j, j + 4.
        const v8 c0 = __builtin_shufflevector(a4, z, 0, 1, 8, 9, 4, 5, 12, 13);
        const v8 c1 = __builtin_shufflevector(a4, z, 2, 3, 10, 11, 6, 7, 14, 15);
        const v8 c2 = __builtin_shufflevector(a5, z, 0, 1, 8, 9, 4, 5, 12, 13);
        const v8 c3 = __builtin_shufflevector(a5, z, 2, 3, 10, 11, 6, 7, 14, 15);
        const v8 b[4] = {b0, b1, b2, b3}, c[4] = {c0, c1, c2, c3};
        float* out = dst + (k0 + h) * kMr;
        for (int j = 0; j < 8; ++j) {
          const v8& lo = b[j % 4];
          const v8& hi = c[j % 4];
          const v8 col = j < 4 ? __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11)
                               : __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
          std::memcpy(out + j * kMr, &col, 32);  // lanes 6, 7 are overwritten next
        }
      }
    }
  }
  // The rest row by row.
  for (int64_t r = 0; r < rows; ++r) x.write_row(m0 + r, k0, dst + k0 * kMr + r, kMr);
}

// out = x @ W.T + b through the register tiles: x is packed into row tiles (see XRows), then
// blocks of mc rows (kept in L2) meet the panels, items (block, panel) block-major dealt by
// deal_in_memory_order, so that each thread reads its panels in memory order.
template <typename T, typename W, typename O>
void run_panels(O* out, int64_t ldo, const XRows<T>& x, const W* packed, const float* bias,
                int64_t N) {
  const int64_t M = x.M, K = x.K;
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  const int64_t num_tiles = (M + kMr - 1) / kMr;
  // Not zeroed: every element a tile reads is written by pack_tile.
  const std::unique_ptr<float[]> tiles(new float[num_tiles * K * kMr]);
  // Rows per block of x: a block (mc x K fp32) stays in L2 while every panel of the thread
  // passes over it; without blocking, a prefill-sized x would stream from L3 once per panel.
  const int64_t mc = std::max<int64_t>(kMr, x_block_bytes() / (K * 4) / kMr * kMr);
  const int64_t num_blocks = (M + mc - 1) / mc;
  const int64_t num_items = num_blocks * num_panels;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t t = 0; t < num_tiles; ++t) pack_tile(x, t, tiles.get() + t * K * kMr);
  struct Buffers {
    std::vector<float> acc, chunk;
  };
  const auto make_buffers = [&] {
    return Buffers{std::vector<float>(std::min(M, mc) * kPanel),
                   std::vector<float>(std::is_same_v<W, float> ? 0 : kKc * kPanel)};
  };
  deal_in_memory_order(num_items, num_threads, make_buffers, [&](Buffers& buf, int64_t item) {
    const int64_t m_begin = item / num_panels * mc, m_end = std::min(M, m_begin + mc);
    const int64_t p = item % num_panels;
    const W* panel = packed + p * K * kPanel;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const W* chunk_w = panel + k0 * kPanel;
      // The weight bytes that follow this chunk (the rest of the panel, then the next one).
      const char* next = reinterpret_cast<const char*>(panel + (k0 + kc) * kPanel);
      const int64_t next_bytes = p + 1 < num_panels || k0 + kc < K ? kKc * kPanel * sizeof(W) : 0;
      const int64_t block_tiles = (m_end - m_begin + kMr - 1) / kMr;
      const int64_t pf_per_tile = (next_bytes / 64 + block_tiles - 1) / block_tiles;
      int64_t pf = 0;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kMr) {
        for (int64_t i = 0; i < pf_per_tile && pf < next_bytes; ++i, pf += 64) {
          __builtin_prefetch(next + pf);
        }
        const int64_t rows = std::min<int64_t>(kMr, m_end - m0);
        const float* a = tiles.get() + (m0 * K + k0 * kMr);
        float* tile_acc = buf.acc.data() + (m0 - m_begin) * kPanel;
        if (kLanes == 16 && m0 + 2 * kMr <= m_end) {  // two whole tiles: tile12
          for (int64_t i = 0; i < pf_per_tile && pf < next_bytes; ++i, pf += 64) {
            __builtin_prefetch(next + pf);
          }
          const float* a1 = a + kMr * K;
          if (std::is_same_v<W, float> || m0 == m_begin) {
            tile12_fn<W>(k0 > 0)(a, a1, chunk_w, kc, tile_acc, buf.chunk.data());
          } else {
            tile12_fn<float>(k0 > 0)(a, a1, buf.chunk.data(), kc, tile_acc, nullptr);
          }
          m0 += kMr;
          continue;
        }
        if (std::is_same_v<W, float> || m0 == m_begin) {
          tile_fn<W>(rows, k0 > 0)(a, chunk_w, kc, tile_acc, buf.chunk.data());
        } else {
          tile_fn<float>(rows, k0 > 0)(a, buf.chunk.data(), kc, tile_acc, nullptr);
        }
      }
    }
    const int64_t n0 = p * kPanel, width = std::min<int64_t>(kPanel, N - n0);
    for (int64_t m = m_begin; m < m_end; ++m) {
      vec::store_sums<kPanel>(out + m * ldo + n0, buf.acc.data() + (m - m_begin) * kPanel,
                              bias ? bias + n0 : nullptr, width);
    }
  });
}

// ---- Few rows (decode of one to kFewRows sequences) ---------------------------------------
//
// With so few rows a layer is bound by reading its weight, and the GEMM's chunk widening and
// row tiles cost more than they save. Instead each thread walks its panels front to back in one
// sequential stream (which the hardware prefetchers follow at full speed, unlike the many short
// row streams of a row-major weight), widening in registers.
//
// Rows taken by this path, in passes of up to 6 rows per panel (12 accumulators, 2 weight
// vectors and a broadcast in 16 registers; a later pass finds the panel in L1 or L2). Measured
// against the GEMM with its unrolled tile (same-process A/B over SmolLM2's bf16 weights,
// GFLOP/s): 4 rows 66 vs 48, 7 rows 60 vs 51, 6 and 8 rows even, 10 rows 76 vs 82, 12 rows 70
// vs 96, 16 rows 78 vs 114.
constexpr int64_t kFewRows = 8;
constexpr int64_t kFewRowsPerPass = 6;

// acc[r][0:kPanel] = x[r, :] @ panel for R rows of fp32 x (row stride K), each output summed
// over k in order from 0, as the GEMM's tiles sum it (so a row's bits do not depend on how
// many rows the step has). One chain per output: the stream of weights from memory, not the
// FMA latency, bounds these passes (same-process A/B against four chains over k for one row
// and two for two, SmolLM2's 30 layers, one thread: fp32 1-8 rows even, bf16 1 row 10% slower,
// 2-8 rows 2-6% faster).
template <int R, typename W>
inline void few_rows_panel(const float* x, const W* panel, int64_t K, float* acc) {
  vfloat c0[R] = {}, c1[R] = {};
  // Prefetch 1 KB ahead of the stream, one line per line consumed (measured: 1 KB beat 0.5, 2,
  // 4 and 8 KB, and no prefetch by ~25%).
  constexpr int64_t kAheadBytes = 1024;
  constexpr int64_t kStepsPerLine = 64 / (kPanel * sizeof(W)) > 0 ? 64 / (kPanel * sizeof(W)) : 1;
  const char* ahead = reinterpret_cast<const char*>(panel) + kAheadBytes;
  for (int64_t k = 0; k < K; ++k) {
    if (k % kStepsPerLine == 0) __builtin_prefetch(ahead + k * kPanel * sizeof(W));
    const W* b = panel + k * kPanel;
    const vfloat b0 = vec::load(b), b1 = vec::load(b + kLanes);
    for (int r = 0; r < R; ++r) {
      const vfloat av = vec::splat(x[r * K + k]);
      c0[r] = vec::fma(av, b0, c0[r]);
      c1[r] = vec::fma(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    vec::store(acc + r * kPanel, c0[r]);
    vec::store(acc + r * kPanel + kLanes, c1[r]);
  }
}

template <typename W, typename O>
void few_rows(O* out, int64_t ldo, const float* x, const W* packed, const float* bias,
              int64_t M, int64_t K, int64_t N) {
  static_assert(kFewRowsPerPass == 6, "one case per row count");
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  struct Acc {
    alignas(64) float values[kFewRowsPerPass * kPanel];
  };
  const int num_threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_panels)));
  deal_in_memory_order(num_panels, num_threads, [] { return Acc{}; },
                       [&](Acc& state, int64_t p) {
    float* acc = state.values;
    const W* panel = packed + p * K * kPanel;
    const int64_t n0 = p * kPanel, width = std::min<int64_t>(kPanel, N - n0);
    // Up to kFewRowsPerPass rows per pass; later passes find the panel in L1 or L2.
    for (int64_t r0 = 0; r0 < M; r0 += kFewRowsPerPass) {
      const int64_t rows = std::min(kFewRowsPerPass, M - r0);
      const float* xr = x + r0 * K;
      switch (rows) {
        case 1: few_rows_panel<1>(xr, panel, K, acc); break;
        case 2: few_rows_panel<2>(xr, panel, K, acc); break;
        case 3: few_rows_panel<3>(xr, panel, K, acc); break;
        case 4: few_rows_panel<4>(xr, panel, K, acc); break;
        case 5: few_rows_panel<5>(xr, panel, K, acc); break;
        default: few_rows_panel<6>(xr, panel, K, acc); break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        vec::store_sums<kPanel>(out + (r0 + r) * ldo + n0, acc + r * kPanel,
                                bias ? bias + n0 : nullptr, width);
      }
    }
  });
}

// weight [N, K] fp32/bf16 -> packed [ceil(N / P), K, P] in the weight's dtype.
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "weight must be a 2-D float32 or bfloat16 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), num_panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({num_panels, K, kPanel}, w.options());
  const int64_t element = w.element_size();
  const char* src = static_cast<const char*>(w.data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const char* row = src + (p * kPanel + j) * K * element;
        for (int64_t k = 0; k < K; ++k) {
          std::memcpy(dst + ((p * K + k) * kPanel + j) * element, row + k * element, element);
        }
      }
    }
  });
  return packed;
}

// kernel(out data, packed data) with both pointers typed by their tensors' dtypes (fp32/bf16).
template <typename Kernel>
void with_dtypes(at::Tensor& out, const at::Tensor& packed, Kernel&& kernel) {
  const auto with_weight = [&](auto* o) {
    if (packed.scalar_type() == at::kBFloat16) {
      kernel(o, reinterpret_cast<const bf16_t*>(packed.data_ptr()));
    } else {
      kernel(o, packed.data_ptr<float>());
    }
  };
  if (out.scalar_type() == at::kFloat) {
    with_weight(out.data_ptr<float>());
  } else {
    with_weight(reinterpret_cast<bf16_t*>(out.data_ptr()));
  }
}

}  // namespace

// out [M, N] fp32/bf16 (contiguous last dim); x [M, K] fp32/bf16; packed from pack_panels;
// bias fp32 [N] or empty. With silu_and_mul, x is [M, 2K] = [gate | up] and the layer's input
// is silu(gate) * up (SwiGLU's down projection).
void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                  const at::Tensor& bias, bool silu_and_mul) {
  const auto is_float = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && is_float(x), "x must be 2-D fp32/bf16 CPU");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  is_float(packed),
              "packed must come from pack_panels of this build");
  TORCH_CHECK(!silu_and_mul || (x.size(1) % 2 == 0 && x.stride(1) == 1),
              "silu_and_mul needs x = [gate | up] with a contiguous last dim");
  const int64_t M = x.size(0), K = silu_and_mul ? x.size(1) / 2 : x.size(1), N = out.size(1);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.stride(1) == 1 && is_float(out) &&
                  packed.size(0) == (N + kPanel - 1) / kPanel,
              "out must be [M, N] fp32/bf16 with a contiguous last dim, N the weight's rows");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                            bias.numel() == N),
              "bias must be contiguous float32 [N] (or empty)");
  if (M == 0 || N == 0) return;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), kx = x.stride(1);
  if (M <= kFewRows) {
    // x as fp32 rows [M, K].
    std::vector<float> x_rows(M * K);
    float* xr = x_rows.data();
    const auto widen = [&](auto tag) {
      using T = decltype(tag);
      const XRows<T> rows{reinterpret_cast<const T*>(x.data_ptr()), ldx, kx, silu_and_mul, M, K};
      for (int64_t m = 0; m < M; ++m) rows.write_row(m, 0, xr + m * K, 1);
    };
    if (x.scalar_type() == at::kBFloat16) widen(bf16_t{}); else widen(float{});
    with_dtypes(out, packed, [&](auto* o, const auto* w) {
      few_rows(o, out.stride(0), xr, w, bp, M, K, N);
    });
    return;
  }
  const auto gemm = [&](auto tag) {
    using T = decltype(tag);
    const XRows<T> rows{reinterpret_cast<const T*>(x.data_ptr()), ldx, kx, silu_and_mul, M, K};
    with_dtypes(out, packed, [&](auto* o, const auto* w) {
      run_panels(o, out.stride(0), rows, w, bp, N);
    });
  };
  if (x.scalar_type() == at::kBFloat16) gemm(bf16_t{}); else gemm(float{});
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("pack_panels(Tensor weight) -> Tensor");
  m.def(
      "panel_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias, "
      "bool silu_and_mul=False) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_panels", &pagedllm::pack_panels);
  m.impl("panel_linear", &pagedllm::panel_linear);
}
