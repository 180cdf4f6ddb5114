// GGUF weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) repacked at load into panels of 16 rows,
// the activations quantized for them, and the work shared among threads: gguf_linear on a
// panel format (quant.h). The register tiles that multiply them, for every row count, are in
// quant_panels_gemm.cpp.
//
// Layout (gguf_pack_panels): rows 16p .. 16p + 15 form panel p, stored where those rows were
// (16 * row_bytes bytes), superblock after superblock (a superblock: the 32-value formats'
// block, the K-quants' 256 values); superblock b of a panel holds the 16 rows' block b, as
// quant.h's PanelBlock places its parts:
//   values: per 32-value sub-block, 8 groups j of 4 consecutive values (4j .. 4j + 3), each
//     group as 64 bytes, lane r (row 16p + r) at bytes 4r .. 4r + 3, so that one VPDPBUSD
//     multiplies a group of all 16 rows by 4 activations broadcast: Q8_0 stores q + 128 (group
//     j at 64j); the others two groups in the nibbles of one 64 bytes (group 2t in the low
//     nibbles of bytes 64t .. 64t + 63, group 2t + 1 in the high ones; sub-block s of a
//     K-quant at 256s);
//   Q5_K's fifth bits (at 2048): per sub-block 64 bytes, group j's 8 bytes a 64-bit mask, bit
//     4r + i for lane r's value 4j + i; Q6_K's bits 4-5 (at 2048): per sub-block 128 bytes,
//     groups 4t .. 4t + 3 in bytes 64t .. 64t + 63, group 4t + k's pair at bits 2k of its
//     byte 4r + i;
//   then d of the 16 rows (fp16, 32 bytes), Q4_1's minimums m / Q4_K's and Q5_K's dmin (fp16,
//     32 bytes), and the K-quants' sub-block scales: Q4_K/Q5_K's 12 scale bytes, Q6_K's 16
//     int8 scales, byte k of row r at 16k + r (Q6_K's before its d).
// A panel is as large as its 16 rows in the file; the rows past the last whole panel (N % 16)
// stay as the file has them (each call repacks them into a panel of its own).
//
// Arithmetic (quant_panels_gemm.cpp's header): each output is one lane of a vector
// accumulator over the blocks of 32 inputs in order, the integer sums exact and every float
// operation the same whatever the row count, the tile or the integer path (VNNI, AVX2,
// scalar): the kernel is batch-invariant with no reduction across lanes, and the paths give
// the same bits. Integer work per block and row: one VPDPBUSD per 4-value group per plane, the
// nibbles (and high bits) unpacked in registers, shared by every row of a tile; no scratch
// copies of the weight.

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

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// A superblock's offsets (quant.h's PanelBlock) for a GGML type known at run time.
struct Layout {
  int64_t bytes, sub, high, d, m, scales;
  bool k_quant;
};

template <int64_t kBase>
Layout layout_of() {
  using PB = PanelBlock<kBase>;
  return {PB::bytes, PB::sub, PB::high, PB::d, PB::m, PB::scales, PB::k_quant};
}

Layout layout(int64_t base) {
  switch (base) {
    case kQ4_0: return layout_of<kQ4_0>();
    case kQ4_1: return layout_of<kQ4_1>();
    case kQ8_0: return layout_of<kQ8_0>();
    case kQ4_K: return layout_of<kQ4_K>();
    case kQ5_K: return layout_of<kQ5_K>();
    case kQ6_K: return layout_of<kQ6_K>();
    default: TORCH_CHECK(false, "no panel layout for format ", base);
  }
}

// The values u (0..255) of one file block (block_values of them), as the row kernel's unpacking
// reads them (quant_gguf.cpp), and where its fields are: d, the minimum, the scale bytes.
void block_values(int64_t base, const uint8_t* src, uint8_t* u) {
  switch (base) {
    case kQ8_0:
      for (int i = 0; i < 32; ++i) u[i] = src[2 + i] ^ 0x80;
      return;
    case kQ4_0:
    case kQ4_1: {
      const uint8_t* qs = src + (base == kQ4_1 ? 4 : 2);
      for (int i = 0; i < 32; ++i) u[i] = i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4;
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const uint8_t* qh = base == kQ5_K ? src + 16 : nullptr;
      const uint8_t* qs = src + (base == kQ5_K ? 48 : 16);
      for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
          int v = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
          if (qh) v |= ((qh[l] >> j) & 1) << 4;
          u[32 * j + l] = static_cast<uint8_t>(v);
        }
      }
      return;
    }
    case kQ6_K: {
      const uint8_t* ql = src;
      const uint8_t* qh = src + 128;
      for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < 128; ++j) {
          const int lo = j < 64 ? ql[64 * h + j] & 0xF : ql[64 * h + j - 64] >> 4;
          const int hi = (qh[32 * h + j % 32] >> (2 * (j / 32))) & 3;
          u[128 * h + j] = static_cast<uint8_t>(lo | hi << 4);
        }
      }
      return;
    }
    default: TORCH_CHECK(false, "no panel layout for format ", base);
  }
}

// Packs `rows` (<= 16) rows of file blocks (row r at raw + r * row_bytes) into one panel at
// dst; missing rows are zeros (u 0, d 0).
void pack_panel(int64_t base, const uint8_t* raw, int64_t row_bytes, int64_t rows,
                int64_t num_blocks, uint8_t* dst) {
  const FormatInfo info = format_info(base);
  const Layout L = layout(base);
  uint8_t u[256];
  for (int64_t b = 0; b < num_blocks; ++b) {
    uint8_t* sb = dst + b * L.bytes;
    std::memset(sb, 0, L.bytes);
    if (base == kQ8_0) std::memset(sb, 0x80, 512);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* src = raw + r * row_bytes + b * info.block_bytes;
      block_values(base, src, u);
      for (int64_t v = 0; v < info.block_values; ++v) {
        const int64_t s = v / 32, j = v % 32 / 4, pos = 4 * r + v % 4;
        if (base == kQ8_0) {
          sb[64 * j + pos] = u[v];
          continue;
        }
        sb[256 * s + 64 * (j / 2) + pos] |= static_cast<uint8_t>((u[v] & 0xF) << (4 * (j % 2)));
        if (base == kQ5_K) {
          sb[L.high + 64 * s + 8 * j + pos / 8] |= static_cast<uint8_t>((u[v] >> 4) << (pos % 8));
        } else if (base == kQ6_K) {
          sb[L.high + 128 * s + 64 * (j / 4) + pos] |=
              static_cast<uint8_t>((u[v] >> 4) << (2 * (j % 4)));
        }
      }
      switch (base) {
        case kQ6_K:
          for (int k = 0; k < 16; ++k) sb[L.scales + 16 * k + r] = src[192 + k];
          std::memcpy(sb + L.d + 2 * r, src + 208, 2);
          break;
        case kQ4_K:
        case kQ5_K:
          std::memcpy(sb + L.d + 2 * r, src, 2);
          std::memcpy(sb + L.m + 2 * r, src + 2, 2);
          for (int k = 0; k < 12; ++k) sb[L.scales + 16 * k + r] = src[4 + k];
          break;
        case kQ4_1:
          std::memcpy(sb + L.m + 2 * r, src + 2, 2);
          [[fallthrough]];
        default:
          std::memcpy(sb + L.d + 2 * r, src, 2);
      }
    }
  }
}

// Activation rows quantized per block of 32 for the panel kernel (quant.h's PanelActs): a
// block's values, its scales dx (one, or one per 16 values: groups 2), and its terms: per half
// of 16 values (H = max(halves, groups) = 2) or for the whole block, zero * S (int32) for
// formats with a zero; the block's dx * S (float bits; groups 2: fma(dx_1, S_1, dx_0 * S_0))
// for those with a minimum.
inline void store_corr(int32_t* corr, int64_t b, float d, int sum, int zero, bool has_min) {
  if (has_min) {
    const float t = d * static_cast<float>(sum);
    std::memcpy(corr + b, &t, 4);
  } else {
    corr[b] = zero * sum;
  }
}

// Block b's terms from its halves' scales and sums (groups 2, or Q6_K's two halves).
inline void store_corr_halves(int32_t* corr, int64_t b, const float* d, const int* sum,
                              int zero, bool has_min, int groups) {
  if (!has_min) {
    corr[2 * b] = zero * sum[0];
    corr[2 * b + 1] = zero * sum[1];
  } else if (groups == 2) {
    const float t = std::fma(d[1], static_cast<float>(sum[1]), d[0] * static_cast<float>(sum[0]));
    std::memcpy(corr + b, &t, 4);
  } else {
    store_corr(corr, b, d[0], sum[0] + sum[1], zero, has_min);
  }
}

template <typename T>
void quantize_row_blocks(const T* x, int64_t K, int planes, int groups, int zero, bool has_min,
                         int halves, int8_t* a, float* dx, int32_t* corr) {
  const int qmax = planes == 2 ? kQ16Max : 127;
  const bool split = groups == 2 || halves == 2;  // terms per half of 16 values
#if defined(__AVX512F__) && defined(__AVX512BW__) && PA_LANES == 16
  // The scalar code below, 16 values at a time: the same operations (VCVTPS2DQ rounds to
  // nearest even, as nearbyint; h is the nearest integer to q / 255, never a tie), the same
  // bytes.
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i lim = _mm512_set1_epi32(qmax), neg_lim = _mm512_set1_epi32(-qmax);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 v[2] = {reinterpret_cast<__m512>(vec::load(x + b * 32)),
                         reinterpret_cast<__m512>(vec::load(x + b * 32 + 16))};
    float d[2];
    __m512i q[2];
    if (groups == 2) {
      for (int i = 0; i < 2; ++i) {
        const float amax = _mm512_reduce_max_ps(_mm512_and_ps(v[i], abs_mask));
        d[i] = amax / static_cast<float>(qmax);
        const float id = d[i] != 0.0f ? 1.0f / d[i] : 0.0f;
        q[i] = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(id)));
      }
    } else {
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_and_ps(v[0], abs_mask), _mm512_and_ps(v[1], abs_mask)));
      d[0] = d[1] = amax / static_cast<float>(qmax);
      const float id = d[0] != 0.0f ? 1.0f / d[0] : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      q[0] = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], vid));
      q[1] = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], vid));
    }
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
    for (int g = 0; g < groups; ++g) dx[b * groups + g] = d[g];
    if (split) {  // q[0], q[1]: the block's halves of 16 values
      const int sum[2] = {_mm512_reduce_add_epi32(q[0]), _mm512_reduce_add_epi32(q[1])};
      store_corr_halves(corr, b, d, sum, zero, has_min, groups);
    } else {
      store_corr(corr, b, d[0], _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1])), zero,
                 has_min);
    }
  }
  return;
#endif
  const int width = 32 / groups;  // values per scale
  for (int64_t b = 0; b < K / 32; ++b) {
    float v[32], d[2];
    int sum[2] = {0, 0};
    for (int g = 0; g < groups; ++g) {
      float amax = 0.0f;
      for (int i = g * width; i < (g + 1) * width; ++i) {
        v[i] = vec::load1(x, b * 32 + i);
        amax = std::max(amax, std::abs(v[i]));
      }
      d[g] = amax / static_cast<float>(qmax);
    }
    if (groups == 1) d[1] = d[0];
    int8_t* hi = a + b * 32 * planes;
    for (int i = 0; i < 32; ++i) {
      const float id = d[i / 16] != 0.0f ? 1.0f / d[i / 16] : 0.0f;
      const int q = std::clamp(static_cast<int>(std::nearbyint(v[i] * id)), -qmax, qmax);
      if (planes == 2) {
        const int h = q >= 0 ? (q + 127) / 255 : -((127 - q) / 255);
        hi[i] = static_cast<int8_t>(h);
        hi[32 + i] = static_cast<int8_t>(q - 255 * h);
      } else {
        hi[i] = static_cast<int8_t>(q);
      }
      sum[i / 16] += q;
    }
    for (int g = 0; g < groups; ++g) dx[b * groups + g] = d[g];
    if (split) {
      store_corr_halves(corr, b, d, sum, zero, has_min, groups);
    } else {
      store_corr(corr, b, d[0], sum[0] + sum[1], zero, has_min);
    }
  }
}

template <typename O, typename X>
void run_panels(O* out, int64_t ldo, const X* x, int64_t ldx, int64_t M, const Weight& w,
                const float* bias, int planes, int groups) {
  const int64_t base = w.format - kPanelFormat;
  const FormatInfo info = format_info(base);
  const int64_t K = w.K, nb = K / 32, N = w.N;
  const int64_t full = N / kRows, num_panels = (N + kRows - 1) / kRows;
  const int64_t panel_bytes = kRows * w.row_bytes;
  // The rows past the last whole panel, repacked for this call.
  std::vector<uint8_t> tail;
  if (num_panels > full) {
    tail.resize(panel_bytes);
    pack_panel(base, w.data + full * panel_bytes, w.row_bytes, N - full * kRows,
               K / info.block_values, tail.data());
  }
  // The calling thread's buffers, kept between calls (no allocation, no page faults per call).
  thread_local std::vector<int8_t> a_buf;
  thread_local std::vector<float> dx_buf;
  thread_local std::vector<int32_t> corr_buf;
  const int halves = base == kQ6_K ? 2 : 1;  // PanelBlock::halves
  if (a_buf.size() < static_cast<size_t>(M * K * planes)) a_buf.resize(M * K * planes);
  const int terms = std::max(halves, groups);  // corr entries per block (at most)
  if (dx_buf.size() < static_cast<size_t>(M * nb * groups)) dx_buf.resize(M * nb * groups);
  if (corr_buf.size() < static_cast<size_t>(M * nb * terms)) corr_buf.resize(M * nb * terms);
  int8_t* a = a_buf.data();
  float* dx = dx_buf.data();
  int32_t* corr = corr_buf.data();
  const auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row_blocks(x + m * ldx, K, planes, groups, info.zero, info.has_min, halves,
                          a + m * K * planes, dx + m * nb * groups,
                          corr + m * nb * (info.has_min ? 1 : terms));
    }
  };
  if (M * K < 16384) {
    quantize(0, M);
  } else {
    at::parallel_for(0, M, 1, quantize);
  }
  const PanelActs acts{a, dx, corr, nb};
  const PanelRowsFn rows_fn =
      panel_rows_fn(base, planes, groups, active_quant_isa(), std::is_same_v<O, vec::bf16_t>);
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
    rows_fn(acts, m_begin, m_end, pan, p1 - p0, p0 * kRows, N, out, ldo, bias, pf);
  });
}

// weight [N, row_bytes] (GGML type `format`: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K) -> the
// same bytes as panels (the layout above): returns the panel format's id.
int64_t gguf_pack_panels_(at::Tensor weight, int64_t format) {
  TORCH_CHECK(is_panel_format(kPanelFormat + format),
              "panels take Q4_0 (2), Q4_1 (3), Q8_0 (8), Q4_K (12), Q5_K (13) and Q6_K (14) "
              "weights, not format ", format);
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
  Weight raw = w;
  raw.format = base;
  const int64_t Kp = padded_k(w.K);
  std::vector<uint8_t> tmp(Kp);
  if (n >= full * kRows) {  // stored as in the file
    const uint8_t* v = unpack_row(raw, n, tmp.data(), ws, wm);
    std::memcpy(u, v, w.K);
    return;
  }
  // The row's file blocks rebuilt from its panel (pack_panel undone), then unpacked as the
  // file's: the same values, scales and minimums as the row kernel's.
  const FormatInfo info = format_info(base);
  const Layout L = layout(base);
  const uint8_t* panel = w.data + n / kRows * kRows * w.row_bytes;
  const int64_t r = n % kRows;
  std::vector<uint8_t> row(w.row_bytes, 0);
  for (int64_t b = 0; b < w.K / info.block_values; ++b) {
    const uint8_t* sb = panel + b * L.bytes;
    uint8_t* dst = row.data() + b * info.block_bytes;
    for (int64_t v = 0; v < info.block_values; ++v) {
      const int64_t s = v / 32, j = v % 32 / 4, pos = 4 * r + v % 4;
      int val;
      if (base == kQ8_0) {
        val = sb[64 * j + pos];
      } else {
        val = (sb[256 * s + 64 * (j / 2) + pos] >> (4 * (j % 2))) & 0xF;
        if (base == kQ5_K) val |= ((sb[L.high + 64 * s + 8 * j + pos / 8] >> (pos % 8)) & 1) << 4;
        if (base == kQ6_K) {
          val |= ((sb[L.high + 128 * s + 64 * (j / 4) + pos] >> (2 * (j % 4))) & 3) << 4;
        }
      }
      switch (base) {
        case kQ8_0: dst[2 + v] = static_cast<uint8_t>(val ^ 0x80); break;
        case kQ4_0:
        case kQ4_1:
          dst[(base == kQ4_1 ? 4 : 2) + v % 16] |= static_cast<uint8_t>(val << (v < 16 ? 0 : 4));
          break;
        case kQ4_K:
        case kQ5_K: {
          const int64_t qs = base == kQ5_K ? 48 : 16, sub = v / 32, l = v % 32;
          dst[qs + 32 * (sub / 2) + l] |= static_cast<uint8_t>((val & 0xF) << (4 * (sub % 2)));
          if (base == kQ5_K) dst[16 + l] |= static_cast<uint8_t>((val >> 4) << sub);
          break;
        }
        default: {  // Q6_K
          const int64_t h = v / 128, i = v % 128;
          dst[64 * h + i % 64] |= static_cast<uint8_t>((val & 0xF) << (i < 64 ? 0 : 4));
          dst[128 + 32 * h + i % 32] |= static_cast<uint8_t>((val >> 4) << (2 * (i / 32)));
        }
      }
    }
    switch (base) {
      case kQ6_K:
        for (int k = 0; k < 16; ++k) dst[192 + k] = sb[L.scales + 16 * k + r];
        std::memcpy(dst + 208, sb + L.d + 2 * r, 2);
        break;
      case kQ4_K:
      case kQ5_K:
        std::memcpy(dst, sb + L.d + 2 * r, 2);
        std::memcpy(dst + 2, sb + L.m + 2 * r, 2);
        for (int k = 0; k < 12; ++k) dst[4 + k] = sb[L.scales + 16 * k + r];
        break;
      case kQ4_1:
        std::memcpy(dst + 2, sb + L.m + 2 * r, 2);
        [[fallthrough]];
      default:
        std::memcpy(dst, sb + L.d + 2 * r, 2);
    }
  }
  raw.data = row.data();
  raw.N = 1;
  const uint8_t* v = unpack_row(raw, 0, tmp.data(), ws, wm);
  std::memcpy(u, v, w.K);
}

void panel_linear(at::Tensor out, const at::Tensor& x, const Weight& w, const at::Tensor& bias,
                  int64_t activation_bits, int64_t activation_group) {
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16,
              "activation_bits must be 8 or 16, got ", activation_bits);
  TORCH_CHECK(activation_group == 32 || (activation_group == 16 && activation_bits == 8),
              "activation_group must be 32, or 16 with 8-bit activations; got ",
              activation_group, " with ", activation_bits, "-bit activations");
  const int planes = activation_bits == 16 ? 2 : 1;
  const int groups = activation_group == 16 ? 2 : 1;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be 2-D fp32/bf16 CPU with a contiguous last dim");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the weight ", w.K, " inputs");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == w.N &&
                  out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be fp32/bf16 [M, N] with a contiguous last dim");
  TORCH_CHECK(w.row_bytes == w.K / format_info(w.format).block_values *
                                 format_info(w.format).block_bytes,
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
      run_panels(op, ldo, x.data_ptr<float>(), ldx, M, w, bp, planes, groups);
    } else {
      run_panels(op, ldo, reinterpret_cast<const vec::bf16_t*>(x.data_ptr()), ldx, M, w, bp,
                 planes, groups);
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
