// A bf16 linear layer on CPUs with AMX: out = x @ W.T + b with TDPBF16PS, which multiplies a
// 16 x 32 tile of x by a 32 x 16 tile of W (bf16 pairs, fp32 sums) in one instruction.
//
// Why not oneDNN, whose AMX GEMM is as fast: batch invariance (issue 29). oneDNN picks its
// kernel by the row count (and its K blocking with it), so a row's sums changed with the
// step's size (measured: SmolLM2's LM head at 64+ rows). Here every row count runs one
// arithmetic: each output starts at zero and takes one TDPBF16PS per 32 inputs, in order, in a
// tile of 16 rows (a batch's last, partial tile is padded with zero rows), and the tile's rows
// never mix. Threads share out panels of 32 columns as the other GEMMs do (deal.h).
//
// Layout: packed[p, c, t, kp, 2 * j + e] = W[p * 32 + 16 * t + j, 32 * c + 2 * kp + e] (bf16;
// zero past N and K): per panel p and chunk c of 32 inputs, two 1 KB tiles (t) of 16 input
// pairs (kp) x 16 columns (j), the operand TDPBF16PS takes.
//
// Tiles: C in tmm0-3 (rows 0-15 and 16-31 of x, times the panel's two column tiles), x in
// tmm4-5, W in tmm6-7.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "deal.h"
#include "ops.h"
#include "vec.h"

namespace pagedllm {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

namespace {

using vec::bf16_t;

constexpr int64_t kCols = 32;     // output columns per panel: two tiles of 16
constexpr int64_t kChunk = 32;    // inputs per TDPBF16PS (a tile row of 64 bytes)
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileElems = 512;  // bf16 in a tile of W (1 KB)
// Panels per item past 32 rows, each 32 rows of x taken over them in turn: the output is then
// written in runs of 4 lines per row instead of one (measured in turn, one thread, 1024 rows:
// 0.85x the time of one panel per item; 256 rows even).
constexpr int64_t kGroupPanels = 4;
// Bytes of x rows per block, kept in L2 while a thread's panels pass over it (each block
// streams the weight once): 25/32 of this core's L2, as the panel GEMM's blocks.
int64_t block_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::clamp<int64_t>(l2 / 32 * 25, 128 * 1024, 4 * 1024 * 1024) : 192 * 1024;
  }();
  return bytes;
}

// Linux hands out AMX's tile data state per process, on request (arch_prctl).
bool request_amx() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows of 64 bytes: C (16 fp32), x (32 bf16), W (16 pairs of bf16).
// Held for one call on each thread, released after.
struct Tiles {
  Tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = kTileRows;
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles(Tiles&&) noexcept {}  // moved out of make_state only; the config stays loaded
};

// x as the tiles read it: bf16 rows of a multiple of 32 values (zero-padded), from `rows` up
// to a multiple of 16 rows (zero rows). Stride in elements.
struct TileRows {
  const bf16_t* data;
  int64_t stride;
  at::Tensor storage;  // a padded copy, when x cannot be read in place
};

TileRows tile_rows_of(const at::Tensor& x, int64_t K) {
  const int64_t M = x.size(0), K32 = (K + kChunk - 1) / kChunk * kChunk;
  const int64_t padded_rows = (M + kTileRows - 1) / kTileRows * kTileRows;
  if (x.scalar_type() == at::kBFloat16 && K == K32 && M == padded_rows && x.stride(1) == 1) {
    return {reinterpret_cast<const bf16_t*>(x.data_ptr()), x.stride(0), at::Tensor()};
  }
  at::Tensor padded = at::zeros({padded_rows, K32}, x.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, M).narrow(1, 0, K).copy_(x);  // fp32 rounds to bf16 here
  return {reinterpret_cast<const bf16_t*>(padded.data_ptr()), K32, padded};
}

// For each block of up to 32 rows of x (m0, rows) and panel p, store(m0, rows, p, c) with c
// the fp32 sums [32][32] (row r, column j of the panel at c[r * 32 + j]; rows >= `rows` are
// padding).
template <typename Store>
void run_amx_panels(const TileRows& x, int64_t M, int64_t num_chunks, const bf16_t* packed,
                    int64_t num_panels, const Store& store) {
  const int64_t row_bytes = num_chunks * kChunk * 2;
  const int64_t mb = std::max<int64_t>(2 * kTileRows,
                                       block_bytes() / row_bytes / (2 * kTileRows) * 2 * kTileRows);
  const int64_t num_blocks = (M + mb - 1) / mb;
  // Items: a block of rows x a group of panels, block-major (a block's groups in order).
  const int64_t group = M > 2 * kTileRows ? kGroupPanels : 1;
  const int64_t num_groups = (num_panels + group - 1) / group;
  const int64_t num_items = num_blocks * num_groups;
  const int num_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)));
  const int64_t x_stride_bytes = x.stride * 2;
  deal_in_memory_order(num_items, num_threads, [] { return Tiles(); }, [&](Tiles&, int64_t item) {
    const int64_t m_begin = item / num_groups * mb, m_end = std::min(M, m_begin + mb);
    const int64_t p_begin = item % num_groups * group;
    const int64_t p_end = std::min(num_panels, p_begin + group);
    alignas(64) float c[2 * kTileRows * kCols];
    for (int64_t m0 = m_begin; m0 < m_end; m0 += 2 * kTileRows) {
      const bf16_t* x0 = x.data + m0 * x.stride;
      const bool two = m0 + kTileRows < m_end;  // a second tile of rows
      for (int64_t p = p_begin; p < p_end; ++p) {
        const bf16_t* panel = packed + p * num_chunks * 2 * kTileElems;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          const bf16_t* x1 = x0 + kTileRows * x.stride;
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t k = 0; k < num_chunks; ++k) {
            const bf16_t* w = panel + k * 2 * kTileElems;  // the chunk's two tiles
            _tile_loadd(4, x0 + k * kChunk, x_stride_bytes);
            _tile_loadd(5, x1 + k * kChunk, x_stride_bytes);
            _tile_loadd(6, w, 64);
            _tile_loadd(7, w + kTileElems, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(2, c + kTileRows * kCols, kCols * 4);
          _tile_stored(3, c + kTileRows * kCols + 16, kCols * 4);
        } else {
          for (int64_t k = 0; k < num_chunks; ++k) {
            const bf16_t* w = panel + k * 2 * kTileElems;
            _tile_loadd(4, x0 + k * kChunk, x_stride_bytes);
            _tile_loadd(6, w, 64);
            _tile_loadd(7, w + kTileElems, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
          }
        }
        _tile_stored(0, c, kCols * 4);
        _tile_stored(1, c + 16, kCols * 4);
        store(m0, std::min<int64_t>(2 * kTileRows, m_end - m0), p, c);
      }
    }
  });
}

}  // namespace

bool has_amx() {
  static const bool ok = request_amx();
  return ok;
}

// weight [N, K] bf16 -> packed [ceil(N / 32), ceil(K / 32), 2, 16, 32] bf16 (see above).
at::Tensor pack_amx_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kBFloat16,
              "weight must be a 2-D bfloat16 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t num_panels = (N + kCols - 1) / kCols, num_chunks = (K + kChunk - 1) / kChunk;
  at::Tensor packed = at::zeros({num_panels, num_chunks, 2, 16, 32}, w.options());
  const bf16_t* src = reinterpret_cast<const bf16_t*>(w.data_ptr());
  bf16_t* dst = reinterpret_cast<bf16_t*>(packed.data_ptr());
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < kCols && p * kCols + j < N; ++j) {
        const bf16_t* row = src + (p * kCols + j) * K;
        const int64_t t = j / 16, jj = j % 16;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t c = k / kChunk, kp = k % kChunk / 2, e = k % 2;
          dst[(((p * num_chunks + c) * 2 + t) * 16 + kp) * 32 + 2 * jj + e] = row[k];
        }
      }
    }
  });
  return packed;
}

// out [M, N] fp32/bf16 (contiguous last dim); x [M, K] bf16 (fp32 is rounded to bf16 first);
// packed from pack_amx_panels; bias fp32 [N] or empty. With silu_and_mul, x is [M, 2K] =
// [gate | up] and the layer's input is the silu_and_mul op's output.
void amx_panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& bias, bool silu_and_mul) {
  TORCH_CHECK(has_amx(), "amx_panel_linear needs AMX (see has_amx)");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be 2-D fp32/bf16 CPU");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be fp32/bf16 with x's rows and a contiguous last dim");
  TORCH_CHECK(packed.dim() == 5 && packed.size(2) == 2 && packed.size(3) == 16 &&
                  packed.size(4) == 32 && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_amx_panels");
  TORCH_CHECK(!silu_and_mul || x.size(1) % 2 == 0, "silu_and_mul needs x = [gate | up]");
  const int64_t M = x.size(0), K = silu_and_mul ? x.size(1) / 2 : x.size(1), N = out.size(1);
  const int64_t num_chunks = packed.size(1);
  TORCH_CHECK(num_chunks == (K + kChunk - 1) / kChunk, "x has ", K, " columns, the weight ",
              num_chunks * kChunk, " (padded)");
  TORCH_CHECK(packed.size(0) == (N + kCols - 1) / kCols, "out has ", N, " columns, the weight ",
              packed.size(0) * kCols, " (padded)");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                            bias.numel() == N),
              "bias must be contiguous float32 [N] (or empty)");
  if (M == 0 || N == 0) return;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  if (K == 0) {  // an empty sum: the bias alone
    if (bp) out.copy_(bias.unsqueeze(0).expand({M, N})); else out.zero_();
    return;
  }
  at::Tensor xb = x;
  if (silu_and_mul) {  // the separate op's output in x's dtype (rounded below if fp32)
    xb = at::empty({M, K}, x.options());
    pagedllm::silu_and_mul(xb, x);
  }
  const TileRows rows = tile_rows_of(xb, K);
  const bf16_t* wp = reinterpret_cast<const bf16_t*>(packed.data_ptr());
  const auto run = [&](auto* o) {
    const int64_t ldo = out.stride(0);
    run_amx_panels(rows, M, num_chunks, wp, packed.size(0),
                   [&](int64_t m0, int64_t n, int64_t p, const float* c) {
                     const int64_t n0 = p * kCols, width = std::min(kCols, N - n0);
                     for (int64_t r = 0; r < n; ++r) {
                       vec::store_sums<kCols>(o + (m0 + r) * ldo + n0, c + r * kCols,
                                              bp ? bp + n0 : nullptr, width);
                     }
                   });
  };
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>());
  } else {
    run(reinterpret_cast<bf16_t*>(out.data_ptr()));
  }
}

#else  // no AMX: the ops exist, and say why they cannot run

bool has_amx() { return false; }
at::Tensor pack_amx_panels(const at::Tensor&) {
  TORCH_CHECK(false, "pack_amx_panels needs a CPU with AMX (see has_amx)");
}
void amx_panel_linear(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "amx_panel_linear needs a CPU with AMX (see has_amx)");
}

#endif

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("has_amx() -> bool", &pagedllm::has_amx);
  m.def("pack_amx_panels(Tensor weight) -> Tensor");
  m.def(
      "amx_panel_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias, "
      "bool silu_and_mul=False) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_amx_panels", &pagedllm::pack_amx_panels);
  m.impl("amx_panel_linear", &pagedllm::amx_panel_linear);
}
