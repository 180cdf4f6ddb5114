// Fused PagedAttention for CPU: writes the new K/V into their slots, then attends causally
// through the block tables, reading K/V in place from the block pool (no gather, no padding).
//
// Layouts (row-major):
//   query  [num_tokens, num_heads, head_size]     fp32 or bf16, last dim contiguous
//   key    [num_tokens, num_kv_heads, head_size]  the cache's dtype (fp32/bf16 for fp8), last
//                                                  dim contiguous
//   cache  [2, num_blocks, block_size, num_kv_heads, head_size]  fp32, bf16 or fp8 e5m2,
//                                                  contiguous (int8: head_size + 4, see below)
//   out    [num_tokens, num_heads, head_size]     query's dtype, contiguous
//
// Work is split into items (sequence, kv heads, query tile[, key split]), run by OpenMP
// threads with dynamic scheduling, biggest first. An item owns, for every token of its query
// tile, the G = num_heads / num_kv_heads query heads that share each of its kv heads, so every
// K/V row read from memory serves all of them:
//   - decode (one query token, G <= kDotMaxRows): one item over all kv heads; per key tile it
//     touches the tile's slots in memory order, then scores and accumulates each kv head's G
//     rows together in registers, straight from the cache (see run_decode_item).
//   - short chunks (query tokens x G <= kDotMaxRows): one item over all kv heads, which reads
//     each slot's heads together, so the cache streams in memory order; keys are scored by dot
//     products, four keys at a time.
//   - longer queries: one item per (kv head, tile of ~kTileRows rows); each key tile is packed
//     transposed and scored as a small GEMM.
// Keys are walked in tiles of kKeyTile logical positions (a tile may span blocks, so any block
// size works) with an online softmax in fp32; the next tile's slots are prefetched, since
// scattered blocks defeat the hardware prefetchers at every block start.
//
// On CPUs with AVX512_BF16, a bf16 query over a bf16 cache (head size a multiple of 32) takes
// dot-product versions of the decode and GEMM-form items (VDPBF16PS: the products in bf16
// pairs, the sums and the softmax in fp32; see the section at the end).
//
// When there are too few items to keep every thread busy (small-batch decode over a long
// context), an item's key range is split and the partial softmax states are merged afterwards
// (flash-decoding).
//
// Batch invariance: a query row's output depends only on its query, its keys and values and
// the model's shapes, never on the work item that computes it (decode, a short chunk, a tile of
// a long prefill chunk, a part of a split range), so a request gets the same bits alone or in
// any batch, prefilled in one chunk or several, with its prefix from the cache or computed. Every
// item kind reduces a row's keys the same way:
//   - a score q . k is summed as the decode sums it: per SIMD lane over the head's chunks, then
//     across lanes in reduce4's tree (reduce16's on the dot-product paths), then the scalar tail
//     in order; the GEMM forms, which hold keys in lanes, sum the same partial sums in the same
//     tree (scores_rows_gemm);
//   - keys go in tiles of kKeyTile logical positions from position 0 with the online softmax,
//     and p @ V adds the tile's keys in order;
//   - tiles are grouped in segments of kSegment positions from 0, whose states are merged in
//     order (merge_state): as an item goes, or, for a split range, after all its parts.
// The bf16 dot-product paths (AVX512_BF16, head size a multiple of 32) take every item of a
// bf16 query over a bf16, fp8 or int8 cache, and the fp32 paths every other; the two differ
// (the dot paths round q and p to bf16), but a model's dtype picks one for all of its steps.
// (An int8 cache under the dot paths is read in place by integer dot products, with AVX512_VNNI;
// elsewhere its tiles are dequantized: see below.)
// Products are added with explicit FMAs (vec::fma, std::fma): left to the compiler's
// contraction, acc * corr + p * v may fuse either product, and two copies of one loop may differ.
//
// Sliding windows and soft caps (paged_attention_windowed; Mistral, Gemma): a query at
// position i sees keys i - window + 1 .. i. An item starts at the key tile holding its first
// token's first key (the tiles before it are invisible to all its rows, and their blocks may
// have been freed), and every row masks the keys before its window as it masks those after
// its position, so a row still walks the same tiles from position 0, in the same segments,
// whichever item computes it: batch invariance holds for windowed layers as stated above
// (a row's tiles before its window add nothing; its empty segments merge as no-ops). Soft
// capping maps each score through soft_cap * tanh(score / soft_cap) (scalar, in order) before
// the masks.
//
// 8-bit cache (kv_cache_dtype="fp8", fp8 e5m2, vLLM's CPU format): the cache holds each K/V
// value as an e5m2 byte (the top byte of its fp16: 5 exponent bits, 2 mantissa bits), written
// from the model's fp32/bf16 key/value by write_kv (round to nearest even, saturating at
// +-57344, as torch's .clamp(-57344, 57344).to(torch.float8_e5m2)). Every e5m2 value is exact
// in bf16 and fp32, so the items read the bytes in place and widen them exactly (byte << 8 is
// the fp16, vcvtph2ps makes it fp32, F16C on AVX2, a scalar decode elsewhere: all the same
// values): each path computes exactly what it computes over a bf16/fp32 cache holding the
// dequantized values, item for item, so batch invariance holds as stated above, and a bf16
// query takes the dot-product paths too (the bytes widened to bf16 pairs in registers).
//
// 8-bit cache (kv_cache_dtype="int8"): each (token, kv head) row of the cache holds head_size
// int8 values and, after them, their fp32 scale (amax / 127; the cache's last dim is head_size
// + 4 bytes, so a block carries its scales through every block move). write_kv rounds x / scale
// to nearest even; the cache streams at 1 + 4 / head_size bytes per value. Two ways to read it:
//   - in place (a bf16 query, head size a multiple of 32 up to kInt8MaxHead, AVX512_BF16 and
//     AVX512_VNNI: run_int8_decode_item, run_int8_item): the int8 values enter 16-bit integer
//     dot products as they lie (the query rows rounded to int16 once per item, each tile's
//     weights p * v_scale to int16 per row), the sums exact in int32 and scaled in fp32 (see
//     that section); exact integer sums make the decode and GEMM-form items agree bit for bit,
//     so batch invariance holds as above. torch_paged's reference is the attention over the
//     dequantized values, which these roundings (finer than the int8 values') approximate.
//   - dequantized (every other case): items dequantize each key tile (value * scale, in fp32,
//     then rounded to bf16 for a bf16 query) into their scratch, which the paths for that dtype
//     then read as they read a cache of it: each path computes exactly what it computes over a
//     cache holding the dequantized values (batch invariance holds as above).
//
// SIMD: see vec.h; head sizes that are not a multiple of the lanes get scalar tails.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace pagedllm {
namespace {

constexpr int kKeyTile = 32;        // logical key positions per softmax step
constexpr int kTileRows = 64;       // query rows (tokens x grouped heads) per item, roughly
constexpr int kSegment = 256;       // keys per segment (see merge_state); a multiple of the tile
constexpr int kDotMaxRows = 8;      // up to this many rows, score by dot products (no packing)
constexpr int kChunk = 8;           // accumulator vectors held in registers by the PV loop

using namespace vec;  // NOLINT: the kernel is written in terms of these helpers
// Brought into this namespace so that the fp8 overloads below add to them, not hide them.
using vec::load;
using vec::load1;

// One fp8 e5m2 value (its raw byte): the 8-bit cache's element (see the file comment).
struct fp8_t {
  uint8_t bits;
};
static_assert(sizeof(fp8_t) == 1, "one byte per cached value");

// An int8 cache row's fp32 scale, after its head_size values.
constexpr int kInt8ScaleBytes = 4;

// e5m2's largest finite value: writes saturate there.
constexpr float kFp8Max = 57344.f;

// The fp32 value of an e5m2 byte (exact): sign, 5 exponent bits (bias 15), 2 mantissa bits.
inline float fp8_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t mag = b & 0x7Fu;
  if (mag < 4) {  // zero or subnormal: mantissa * 2^-16
    const float x = static_cast<float>(mag) * 0x1p-16f;
    return sign ? -x : x;
  }
  const uint32_t exp = mag >> 2, mant = mag & 3u;
  const uint32_t bits = exp == 31 ? 0x7F800000u | mant << 21 : (exp + 112) << 23 | mant << 21;
  return __builtin_bit_cast(float, sign | bits);
}

// The e5m2 byte nearest to f (ties to even), |f| saturated at kFp8Max; NaN stays NaN.
inline uint8_t float_to_fp8(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return sign | 0x7F;
  if (u >= 0x47600000u) return sign | 0x7B;  // >= 57344
  if (u < (113u << 23)) {                    // below 2^-14: a multiple of 2^-16 (exact scaling)
    return sign | static_cast<uint8_t>(std::nearbyint(__builtin_bit_cast(float, u) * 65536.f));
  }
  u += 0xFFFFFu + ((u >> 21) & 1u);  // round the 21 dropped mantissa bits, ties to even
  return sign | static_cast<uint8_t>((u - (112u << 23)) >> 21);
}

inline float load1(const fp8_t* p, int64_t i) { return fp8_to_float(p[i].bits); }

// kLanes e5m2 values as fp32: the bytes shifted into fp16s, widened by vcvtph2ps (exact).
inline vfloat load(const fp8_t* p) {
#if PA_LANES == 16 && defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8)));
#elif PA_LANES == 8 && defined(__F16C__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8)));
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = fp8_to_float(p[i].bits);
  return v;
#endif
}

struct Params {
  const void* query;
  int64_t q_stride_t, q_stride_h;
  bool q_bf16;
  void* out;  // contiguous, query's dtype
  // The cache halves, each contiguous [num_blocks, block_size, num_kv_heads, head_size].
  const void* k_cache;
  const void* v_cache;
  int64_t num_blocks, block_size, num_heads, num_kv_heads, head_size, group;
  const int32_t* block_tables;
  int64_t bt_stride;
  const int64_t* query_start_loc;
  const int64_t* seq_lens;
  float scale;
  // Sliding window: a query at position i sees keys i - window + 1 .. i (0: every key to i).
  int64_t window;
  // Soft cap: scores become soft_cap * tanh(score / soft_cap) before the softmax (0: none).
  float soft_cap;
  int64_t max_rows;  // rows of the largest item: the stride of the partial buffer
  bool dot_items;    // items of a bf16 query over a bf16 cache take the dot-product paths
  // An int8 cache: rows of head_size int8 values, then their fp32 scale (kInt8ScaleBytes).
  bool int8;
  // An int8 cache read in place (run_int8_decode_item, run_int8_item): a bf16 query, head size
  // a multiple of 32 up to kInt8MaxHead, AVX512_BF16 and AVX512_VNNI; else its tiles are
  // dequantized (dequantize_tile).
  bool int8_in_place;
  int64_t row_bytes;  // bytes from one kv head's row of a slot to the next
};

struct WorkItem {
  int32_t seq;
  int32_t h_begin, h_end;  // kv heads
  int32_t q_begin, q_end;  // query tile, offsets within the sequence's new tokens
  int32_t k_begin, k_end;  // logical key positions this item reads
  // -1: finish and write the output; else a part of a split range, whose segments' states go
  // to the partial buffer's slots from this one on.
  int32_t part;
};

// A split item: its segments' states lie in slots first_slot .. first_slot + num_slots - 1.
struct MergeGroup {
  int32_t seq, h_begin, h_end, q_begin, q_end;
  int32_t first_slot, num_slots;
};

// Rows of an item, kv-head-major: row = (h - h_begin) * rows_per_head + token * group + g,
// for query head h * group + g of the tile's token.
// E.g., decode with 3 kv heads, group 3: rows 0-2 -> kv head 0, query heads 0-2; rows 3-5 ->
// kv head 1, query heads 3-5; rows 6-8 -> kv head 2, query heads 6-8.
struct ItemRows {
  int heads, tokens, group, rows_per_head, rows;
  ItemRows(const WorkItem& it, int g)
      : heads(it.h_end - it.h_begin), tokens(it.q_end - it.q_begin), group(g),
        rows_per_head(tokens * g), rows(heads * tokens * g) {}
  int head(int r) const { return r / rows_per_head; }           // kv head - h_begin
  int token(int r) const { return r % rows_per_head / group; }  // token - q_begin
  int q_head(int r, int h_begin) const {                        // query head
    return (h_begin + head(r)) * group + r % group;
  }
};

// Per-thread scratch, sized once per call. acc, m, l: the current segment's softmax state of
// each row of the item; run_acc, run_m, run_l: its earlier segments' states merged.
struct Scratch {
  std::vector<float> q, acc, m, l, run_acc, run_m, run_l, s, kt, kbuf, vbuf;
  std::vector<const float*> krow, vrow;
  std::vector<bf16_t> qb;       // bf16 query rows (the dot-product paths)
  std::vector<int16_t> qi;      // the query rows as int16 (an int8 cache read in place)
  std::vector<float> qscale;    // their scales, times the softmax scale
  std::vector<uint32_t> kpair;  // a key tile in pairs of inputs (run_dot_item)
  std::vector<bf16_t> vpair;    // a value tile in pairs of keys (run_dot_item)
  std::vector<bf16_t> row16;    // one fp8 key row widened to bf16 (run_dot_item)
  // An int8 cache's current key tile, dequantized (kKeyTile slots of the item's kv heads, in
  // the type its paths read: see dequantize_tile); null for other caches and for an int8
  // cache read in place (see run_int8_decode_item). Not zeroed: every
  // slot read is written first.
  std::unique_ptr<float[]> kdq, vdq;
  std::vector<const void*> kraw, vraw, next_kraw, next_vraw;
  int segments_done = 0;  // of the current item
  // decode_only: only what decode items read (run_decode_item, run_dot_decode_item); the key
  // tile buffers of the other items (kt, kbuf, vbuf, krow, vrow, kpair, vpair) stay empty.
  // NOTE: a single stream's decode step calls the kernel once per layer: allocating and zeroing
  // those ~60 KB each time was a measurable part of a call.
  Scratch(int rows, int d, int span, bool decode_only, bool int8)
      : q(rows * d), acc(rows * d), m(rows), l(rows), run_acc(rows * d), run_m(rows),
        run_l(rows), s(rows * kKeyTile), qb(rows * d), qi(rows * d), qscale(rows),
        kraw(kKeyTile), vraw(kKeyTile),
        next_kraw(kKeyTile), next_vraw(kKeyTile) {
    if (int8) {
      kdq.reset(new float[kKeyTile * span]);
      vdq.reset(new float[kKeyTile * span]);
    }
    if (decode_only) return;
    row16.resize(d);
    kt.resize(d * kKeyTile);
    kbuf.resize(kKeyTile * span);
    vbuf.resize(kKeyTile * span);
    krow.resize(kKeyTile);
    vrow.resize(kKeyTile);
    kpair.resize(d / 2 * kKeyTile);
    vpair.resize(d * kKeyTile);
  }
};

// Addresses of the K and V slots of logical key positions kb .. kb + n - 1, offset to the
// item's first kv head: slot = block_table[pos / block_size] * block_size + pos % block_size.
inline void tile_rows(const Params& p, const int32_t* table, const char* k_base,
                      const char* v_base, int64_t kb, int n, const void** kraw,
                      const void** vraw) {
  const int64_t slot_stride = p.num_kv_heads * p.row_bytes;  // bytes between slots
  int64_t blk = kb / p.block_size, off = kb % p.block_size;
  for (int t = 0; t < n; ++t) {
    const int64_t slot = static_cast<int64_t>(table[blk]) * p.block_size + off;
    kraw[t] = k_base + slot * slot_stride;
    vraw[t] = v_base + slot * slot_stride;
    if (++off == p.block_size) off = 0, ++blk;
  }
}

inline void prefetch(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b);
}

// Points krow/vrow at fp32 copies of the n slots (span elements each: the item's kv heads):
// in place for an fp32 cache, converted into kbuf/vbuf for bf16 and fp8 (once, not per row).
template <typename cache_t>
inline void load_key_tile(Scratch& sc, int n, int span) {
  if constexpr (std::is_same_v<cache_t, float>) {
    for (int t = 0; t < n; ++t) {
      sc.krow[t] = static_cast<const float*>(sc.kraw[t]);
      sc.vrow[t] = static_cast<const float*>(sc.vraw[t]);
    }
  } else {
    for (int t = 0; t < n; ++t) {
      float* kf = sc.kbuf.data() + t * span;
      float* vf = sc.vbuf.data() + t * span;
      widen(static_cast<const cache_t*>(sc.kraw[t]), kf, span);
      widen(static_cast<const cache_t*>(sc.vraw[t]), vf, span);
      sc.krow[t] = kf;
      sc.vrow[t] = vf;
    }
  }
}

// q . k over the head's last d - dv values (past its whole vectors), added to `sum` one at a time
// with one rounding each: the scalar tail of every score.
template <typename T>
inline float score_tail(const float* q, const T* k, int dv, int d, float sum) {
  for (int i = dv; i < d; ++i) sum = std::fma(q[i], load1(k, i), sum);
  return sum;
}

// s[r][t] = q[r] . k[t] for few rows per kv head, four keys at a time, walking each slot's kv
// heads in memory order. Meanwhile it prefetches the V slots of this tile (when pf_v) and the
// K slots of the next (next_k, next_n of them), spread over the keys.
inline void scores_dot(const float* q, const ItemRows& ir, int d, const float* const* krow,
                       int n, float* s, const void* const* pf_v, const void* const* next_k,
                       int next_n, int64_t span_bytes) {
  const int dv = d / kLanes * kLanes;
  for (int t = 0; t < n; t += 4) {
    for (int u = t; u < std::min(t + 4, n); ++u) {
      if (pf_v) prefetch(pf_v[u], span_bytes);
      if (u < next_n) prefetch(next_k[u], span_bytes);
    }
    for (int h = 0; h < ir.heads; ++h) {
      // Past the last key, repeat it: those scores are masked out later.
      const float* k0 = krow[t] + h * d;
      const float* k1 = krow[std::min(t + 1, n - 1)] + h * d;
      const float* k2 = krow[std::min(t + 2, n - 1)] + h * d;
      const float* k3 = krow[std::min(t + 3, n - 1)] + h * d;
      for (int r = h * ir.rows_per_head; r < (h + 1) * ir.rows_per_head; ++r) {
        const float* qr = q + r * d;
        vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int i = 0; i < dv; i += kLanes) {
          const vfloat qv = load(qr + i);
          a0 = vec::fma(qv, load(k0 + i), a0);
          a1 = vec::fma(qv, load(k1 + i), a1);
          a2 = vec::fma(qv, load(k2 + i), a2);
          a3 = vec::fma(qv, load(k3 + i), a3);
        }
        const vfloat4 dots = reduce4(a0, a1, a2, a3);
        const float* k[4] = {k0, k1, k2, k3};
        for (int u = 0; u < 4; ++u) s[r * kKeyTile + t + u] = score_tail(qr, k[u], dv, d, dots[u]);
      }
    }
  }
}

// a[r][j] = lane l's sum of row r's scores over key vector j of a transposed key tile (see
// scores_rows_gemm).
template <int R>
__attribute__((always_inline)) inline void lane_sums(const float* q, int d, int nc,
                                                     const float* kt, int l,
                                                     vfloat (*a)[kKeyTile / kLanes]) {
  constexpr int kV = kKeyTile / kLanes;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kV; ++j) a[r][j] = vfloat{};
  for (int c = 0; c < nc; ++c) {
    const int i = c * kLanes + l;
    for (int j = 0; j < kV; ++j) {
      const vfloat kv = load(kt + i * kKeyTile + j * kLanes);
      for (int r = 0; r < R; ++r) a[r][j] = vec::fma(splat(q[r * d + i]), kv, a[r][j]);
    }
  }
}

// reduce4's b_l (see vec.h): lane l's sums, plus lane l + 8's with 16 lanes.
template <int R>
__attribute__((always_inline)) inline void lane_pair_sums(const float* q, int d, int nc,
                                                          const float* kt, int l,
                                                          vfloat (*b)[kKeyTile / kLanes]) {
  constexpr int kV = kKeyTile / kLanes;
  lane_sums<R>(q, d, nc, kt, l, b);
  if constexpr (kLanes == 16) {
    vfloat a8[R][kV];
    lane_sums<R>(q, d, nc, kt, l + 8, a8);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kV; ++j) b[r][j] += a8[r][j];
  }
}

// (b_l + b_{l+1}) + (b_{l+2} + b_{l+3}).
template <int R>
__attribute__((always_inline)) inline void lane_quad_sums(const float* q, int d, int nc,
                                                          const float* kt, int l,
                                                          vfloat (*out)[kKeyTile / kLanes]) {
  constexpr int kV = kKeyTile / kLanes;
  vfloat x[R][kV], y[R][kV], z[R][kV], w[R][kV];
  lane_pair_sums<R>(q, d, nc, kt, l, x);
  lane_pair_sums<R>(q, d, nc, kt, l + 1, y);
  lane_pair_sums<R>(q, d, nc, kt, l + 2, z);
  lane_pair_sums<R>(q, d, nc, kt, l + 3, w);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kV; ++j) out[r][j] = (x[r][j] + y[r][j]) + (z[r][j] + w[r][j]);
}

// s[r][0:kKeyTile] for R rows from q (row stride d) over a transposed key tile kt[i][t]: the
// scores of scores_dot and decode_scores, bit for bit, with keys in lanes. Lane l of a whole
// vector of q . k there sums q[c * kLanes + l] * k[c * kLanes + l] over c; here that sum for
// kLanes keys at once is one vector (lane_sums), and they are added as reduce4 adds the lanes
// (see vec.h), four at a time so that few are live at once.
template <int R>
inline void scores_rows_gemm(const float* q, int d, const float* kt, float* s) {
  constexpr int kV = kKeyTile / kLanes;
  const int nc = d / kLanes, dv = nc * kLanes;
  vfloat h0[R][kV], h1[R][kV];
  lane_quad_sums<R>(q, d, nc, kt, 0, h0);
  lane_quad_sums<R>(q, d, nc, kt, 4, h1);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kV; ++j) {
      vfloat sum = h0[r][j] + h1[r][j];
      for (int i = dv; i < d; ++i) {
        sum = vec::fma(splat(q[r * d + i]), load(kt + i * kKeyTile + j * kLanes), sum);
      }
      store(s + r * kKeyTile + j * kLanes, sum);
    }
  }
}

// s[r][0:kKeyTile] = q[r] @ K^T for many rows of one kv head (K rows at krow[t] + head_off):
// packs K^T once (zero-padded to kKeyTile keys), then scores two rows at a time with
// broadcast FMAs (a rows x kKeyTile x d GEMM, summed as scores_dot sums; see scores_rows_gemm).
inline void scores_gemm(const float* q, int rows, int d, const float* const* krow,
                        int head_off, int n, float* kt, float* s) {
  for (int t = 0; t < n; ++t) {
    const float* k = krow[t] + head_off;
    for (int i = 0; i < d; ++i) kt[i * kKeyTile + t] = k[i];
  }
  for (int t = n; t < kKeyTile; ++t)
    for (int i = 0; i < d; ++i) kt[i * kKeyTile + t] = 0.f;
  int r = 0;
  for (; r + 2 <= rows; r += 2) scores_rows_gemm<2>(q + r * d, d, kt, s + r * kKeyTile);
  if (r < rows) scores_rows_gemm<1>(q + r * d, d, kt, s + r * kKeyTile);
}

// acc[0 : NV * kLanes] = acc * corr + sum_t<nv p[t] * v[t][0 : NV * kLanes], in registers.
template <int NV>
inline void pv_chunk(float* acc, float corr, const float* p, const float* const* vrow, int nv,
                     int offset) {
  vfloat a[NV];
  for (int j = 0; j < NV; ++j) a[j] = load(acc + j * kLanes) * corr;
  for (int t = 0; t < nv; ++t) {
    const vfloat pt = splat(p[t]);
    const float* v = vrow[t] + offset;
    for (int j = 0; j < NV; ++j) a[j] = vec::fma(pt, load(v + j * kLanes), a[j]);
  }
  for (int j = 0; j < NV; ++j) store(acc + j * kLanes, a[j]);
}

// Online-softmax update of one row with its scores lo .. nv - 1 (lo < nv) of the tile: turns s
// into the tile's weights exp(s - m_new) (0 outside lo .. nv - 1), updates m and l, and returns
// exp(m_old - m_new), the factor that rescales the row's accumulator. With soft_cap > 0 the
// scores are first capped, soft_cap * tanh(s / soft_cap), one key at a time.
inline float softmax_row(float* s, int nv, float& m, float& l, int lo = 0, float soft_cap = 0.f) {
  constexpr int kV = kKeyTile / kLanes;
  if (soft_cap > 0.f) {
    for (int t = lo; t < nv; ++t) s[t] = soft_cap * std::tanh(s[t] / soft_cap);
  }
  vfloat lane = {};
  for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
  vfloat sv[kV];
  vfloat mv = splat(m);
  for (int j = 0; j < kV; ++j) {
    // Keys at and beyond nv are masked (causal, or past the tile's last key), and those
    // before lo (before the row's sliding window).
    const vfloat pos = lane + static_cast<float>(j * kLanes);
    sv[j] = pos < splat(static_cast<float>(nv)) ? load(s + j * kLanes) : splat(-kInf);
    sv[j] = pos < splat(static_cast<float>(lo)) ? splat(-kInf) : sv[j];
    mv = vmax(mv, sv[j]);
  }
  const float m_new = hmax(mv);
  const float corr = vexp(splat(m - m_new))[0];  // m = -inf on the first tile: 0
  vfloat sum = {};
  for (int j = 0; j < kV; ++j) {
    const vfloat e = vexp(sv[j] - m_new);
    store(s + j * kLanes, e);
    sum += e;
  }
  m = m_new;
  l = std::fma(l, corr, hsum(sum));
  return corr;
}

// softmax_row, then acc = acc * exp(m_old - m_new) + p @ V, V rows at vrow[t] + head_off.
inline void softmax_pv_row(float* s, int lo, int nv, float soft_cap, const float* const* vrow,
                           int head_off, int d, float& m, float& l, float* acc) {
  const float corr = softmax_row(s, nv, m, l, lo, soft_cap);
  const int dv = d / kLanes * kLanes;
  int i = 0;
  for (; i + kChunk * kLanes <= dv; i += kChunk * kLanes)
    pv_chunk<kChunk>(acc + i, corr, s, vrow, nv, head_off + i);
  for (; i < dv; i += kLanes) pv_chunk<1>(acc + i, corr, s, vrow, nv, head_off + i);
  for (; i < d; ++i) {
    float a = acc[i] * corr;
    for (int t = 0; t < nv; ++t) a = std::fma(s[t], vrow[t][head_off + i], a);
    acc[i] = a;
  }
}

// ---- Decode: one query token, G query heads per kv head -------------------------------------
//
// The G rows of a kv head are scored and accumulated together, so each K/V element is loaded
// (and, for bf16, widened) once into a register and used G times, straight from the cache: no
// fp32 copy of the tile, no re-reading it per row.

// Keys scored per step: G x kDecodeKeys accumulators, kDecodeKeys key vectors and the query
// vector must fit the 16 vector registers of AVX2. (G = 3 with 4 keys needs 17 and spills:
// same-process A/B, batch 64 bf16, 3 keys 10-16% faster at context 1024, even at 192.)
template <int G>
constexpr int kDecodeKeys = G <= 2 ? 4 : G <= 3 ? 3 : G <= 6 ? 2 : 1;

// s[g][t] = q[g] . k[t] for the G rows of one kv head (k[t] = kslot[t] + head_off) and keys
// 0 .. n - 1 (scores past n repeat the last key and are masked later). Meanwhile it prefetches
// the K and V slots pf_k[0 .. pf_n - 1], pf_v[...] (span_bytes each), spread over its steps.
template <int G, typename cache_t>
inline void decode_scores(const float* q, int d, const void* const* kslot, int64_t head_off,
                          int n, float* s, const void* const* pf_k, const void* const* pf_v,
                          int pf_n, int64_t span_bytes) {
  constexpr int KS = kDecodeKeys<G>;
  constexpr int kAcc = G * KS, kPadded = (kAcc + 3) / 4 * 4;
  const int dv = d / kLanes * kLanes;
  const int steps = (n + KS - 1) / KS;
  const int pf_per_step = (pf_n + steps - 1) / steps;
  for (int t = 0, step = 0; t < n; t += KS, ++step) {
    for (int u = step * pf_per_step; u < std::min((step + 1) * pf_per_step, pf_n); ++u) {
      prefetch(pf_k[u], span_bytes);
      prefetch(pf_v[u], span_bytes);
    }
    const cache_t* k[KS];
    for (int j = 0; j < KS; ++j)
      k[j] = static_cast<const cache_t*>(kslot[std::min(t + j, n - 1)]) + head_off;
    vfloat a[kPadded] = {};
    for (int i = 0; i < dv; i += kLanes) {
      vfloat kv[KS];
      for (int j = 0; j < KS; ++j) kv[j] = load(k[j] + i);
      for (int g = 0; g < G; ++g) {
        const vfloat qv = load(q + g * d + i);
        for (int j = 0; j < KS; ++j) a[g * KS + j] = vec::fma(qv, kv[j], a[g * KS + j]);
      }
    }
    float dots[kPadded];
    for (int c = 0; c < kPadded; c += 4) {
      const vfloat4 r = reduce4(a[c], a[c + 1], a[c + 2], a[c + 3]);
      std::memcpy(dots + c, &r, sizeof r);
    }
    if (dv < d) {
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < KS; ++j)
          dots[g * KS + j] = score_tail(q + g * d, k[j], dv, d, dots[g * KS + j]);
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < KS && t + j < kKeyTile; ++j) s[g * kKeyTile + t + j] = dots[g * KS + j];
  }
}

// Vectors of the accumulator updated per pass: G x C accumulators, C V vectors and one
// broadcast weight in 16 registers.
template <int G>
constexpr int kDecodeChunk = G <= 2 ? 4 : G <= 4 ? 2 : 1;

// acc[g][i : i + C * kLanes] = acc * corr[g] + sum_t p[g][t] * v[t][i : ...], for the G rows.
template <int G, int C, typename cache_t>
inline void decode_pv_chunk(float* acc, int d, const float* corr, const float* p,
                            const cache_t* const* v, int n, int i) {
  vfloat a[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) a[g][c] = load(acc + g * d + i + c * kLanes) * corr[g];
  for (int t = 0; t < n; ++t) {
    vfloat vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(v[t] + i + c * kLanes);
    for (int g = 0; g < G; ++g) {
      const vfloat pt = splat(p[g * kKeyTile + t]);
      for (int c = 0; c < C; ++c) a[g][c] = vec::fma(pt, vv[c], a[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) store(acc + g * d + i + c * kLanes, a[g][c]);
}

template <int G, typename cache_t>
inline void decode_pv(float* acc, int d, const float* corr, const float* p,
                      const void* const* vslot, int64_t head_off, int n) {
  const cache_t* v[kKeyTile];
  for (int t = 0; t < n; ++t) v[t] = static_cast<const cache_t*>(vslot[t]) + head_off;
  constexpr int C = kDecodeChunk<G>;
  const int dv = d / kLanes * kLanes;
  int i = 0;
  for (; i + C * kLanes <= dv; i += C * kLanes) decode_pv_chunk<G, C>(acc, d, corr, p, v, n, i);
  for (; i < dv; i += kLanes) decode_pv_chunk<G, 1>(acc, d, corr, p, v, n, i);
  for (; i < d; ++i) {
    for (int g = 0; g < G; ++g) {
      float a = acc[g * d + i] * corr[g];
      for (int t = 0; t < n; ++t) a = std::fma(p[g * kKeyTile + t], load1(v[t], i), a);
      acc[g * d + i] = a;
    }
  }
}

// The first key of the tile at kb that a query at position pos sees (0 without a window;
// kKeyTile when its window starts past the tile).
inline int window_start(const Params& p, int64_t pos, int64_t kb) {
  if (p.window <= 0) return 0;
  return static_cast<int>(std::clamp<int64_t>(pos - p.window + 1 - kb, 0, kKeyTile));
}

// Which rows of an item see the key tile at kb (n keys, the item's first token at first_pos):
// a row sees the keys up to its own token's position (and within its window); rows go by
// token, so the rows that see none of the tile come first (and, with a sliding window, maybe
// last), and [begin(), end()) holds every row that sees some of it.
struct TileRows {
  const Params& p;
  const ItemRows& ir;
  int64_t first_pos, kb;
  int n;
  int visible(int r) const {  // keys [0, visible) of the tile are at or before the row's token
    return static_cast<int>(std::min<int64_t>(n, first_pos + ir.token(r) - kb + 1));
  }
  int first_visible(int r) const { return window_start(p, first_pos + ir.token(r), kb); }
  bool sees(int r) const { return visible(r) > first_visible(r); }
  int begin() const {
    int r = 0;
    while (r < ir.rows && visible(r) <= 0) ++r;
    return r;
  }
  int end(int begin) const {
    int e = ir.rows;
    while (e > begin && !sees(e - 1)) --e;
    return e;
  }
};

// The first key position an item reads: the start of the key tile holding the first key its
// first query token (at position pos) sees. Every later row sees no earlier key.
inline int32_t first_key_tile(const Params& p, int64_t pos) {
  if (p.window <= 0) return 0;
  const int64_t first = std::max<int64_t>(0, pos - p.window + 1);
  return static_cast<int32_t>(first / kKeyTile * kKeyTile);
}

// Element offset in p.query of the item's row r (its token and query head).
inline int64_t query_offset(const Params& p, const WorkItem& it, const ItemRows& ir, int r) {
  const int64_t token = p.query_start_loc[it.seq] + it.q_begin + ir.token(r);
  return token * p.q_stride_t + ir.q_head(r, it.h_begin) * p.q_stride_h;
}

inline void load_query_rows(const Params& p, const WorkItem& it, const ItemRows& ir, float* q) {
  const int d = static_cast<int>(p.head_size);
  for (int r = 0; r < ir.rows; ++r) {
    const int64_t off = query_offset(p, it, ir, r);
    float* dst = q + r * d;
    if (p.q_bf16) {
      const bf16_t* src = static_cast<const bf16_t*>(p.query) + off;
      for (int i = 0; i < d; ++i) dst[i] = bf16_to_float(src[i]) * p.scale;
    } else {
      const float* src = static_cast<const float*>(p.query) + off;
      for (int i = 0; i < d; ++i) dst[i] = src[i] * p.scale;
    }
  }
}

// Writes a / l to the output row of (token, head), in the output dtype.
inline void store_out_row(const Params& p, int64_t token, int64_t head, const float* a,
                          float l) {
  const int d = static_cast<int>(p.head_size);
  const float inv_l = 1.f / l;
  const int64_t off = (token * p.num_heads + head) * p.head_size;
  const auto store_row = [&](auto* dst) {
    int i = 0;
    for (; i + kLanes <= d; i += kLanes) store(dst + i, load(a + i) * splat(inv_l));
    for (; i < d; ++i) store1(dst, i, a[i] * inv_l);
  };
  if (p.q_bf16) {
    store_row(static_cast<bf16_t*>(p.out) + off);
  } else {
    store_row(static_cast<float*>(p.out) + off);
  }
}

// kLanes int8 values as fp32 (exact).
inline vfloat load_i8(const int8_t* p) {
#if PA_LANES == 16 && defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
#elif PA_LANES == 8 && defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// An int8 cache's tile (n slots at kraw/vraw, `heads` kv heads each) dequantized into
// sc.kdq/vdq as cache_t (value * scale in fp32, then, for bf16, rounded to nearest even), laid
// out as a cache_t cache's slots; kraw/vraw then point there. Elementwise, one rounding each:
// the same values in any build.
template <typename cache_t>
inline void dequantize_tile(const Params& p, Scratch& sc, int n, int heads) {
  const int d = static_cast<int>(p.head_size);
  for (auto [raw, buf] : {std::pair{sc.kraw.data(), sc.kdq.get()},
                          std::pair{sc.vraw.data(), sc.vdq.get()}}) {
    cache_t* out = reinterpret_cast<cache_t*>(buf);
    for (int t = 0; t < n; ++t) {
      cache_t* dst = out + static_cast<int64_t>(t) * heads * d;
      for (int h = 0; h < heads; ++h) {
        const int8_t* row = static_cast<const int8_t*>(raw[t]) + h * p.row_bytes;
        float scale;
        std::memcpy(&scale, row + d, sizeof scale);
        cache_t* o = dst + h * d;
        // (vec.h's bf16 store rounds as float_to_bf16: the same bits as the tail's.)
        const vfloat sv = splat(scale);
        int i = 0;
        for (; i + kLanes <= d; i += kLanes) store(o + i, load_i8(row + i) * sv);
        for (; i < d; ++i) {
          const float x = static_cast<float>(row[i]) * scale;
          if constexpr (std::is_same_v<cache_t, float>) {
            o[i] = x;
          } else {
            o[i] = float_to_bf16(x);
          }
        }
      }
      raw[t] = dst;
    }
  }
}

// Walks the item's keys in tiles of kKeyTile logical positions. When body(kb, n, next_n) runs
// for the tile at kb, sc.kraw/sc.vraw hold the addresses of its n K/V slots (at the item's first
// kv head) and sc.next_kraw/sc.next_vraw those of the next tile's next_n slots: blocks are
// scattered, so hardware prefetchers miss each block's start, and the body prefetches them.
// Before the first tile of each segment but the item's first, segment_end() closes the last.
template <typename cache_t, typename Body, typename SegmentEnd>
inline void for_each_key_tile(const Params& p, const WorkItem& it, Scratch& sc, Body&& body,
                              SegmentEnd&& segment_end) {
  const int32_t* table = p.block_tables + it.seq * p.bt_stride;
  const char* k_base = static_cast<const char*>(p.k_cache) + it.h_begin * p.row_bytes;
  const char* v_base = static_cast<const char*>(p.v_cache) + it.h_begin * p.row_bytes;
  int n = static_cast<int>(std::min<int64_t>(kKeyTile, it.k_end - it.k_begin));
  tile_rows(p, table, k_base, v_base, it.k_begin, n, sc.kraw.data(), sc.vraw.data());
  for (int64_t kb = it.k_begin; kb < it.k_end; kb += kKeyTile) {
    if (kb > it.k_begin && kb % kSegment == 0) segment_end();
    const int64_t next_kb = kb + kKeyTile;
    const int next_n = static_cast<int>(std::clamp<int64_t>(it.k_end - next_kb, 0, kKeyTile));
    tile_rows(p, table, k_base, v_base, next_kb, next_n, sc.next_kraw.data(),
              sc.next_vraw.data());
    if constexpr (std::is_same_v<cache_t, float> || std::is_same_v<cache_t, bf16_t>) {
      if (p.int8) dequantize_tile<cache_t>(p, sc, n, it.h_end - it.h_begin);
    }
    body(kb, n, next_n);
    std::swap(sc.kraw, sc.next_kraw);
    std::swap(sc.vraw, sc.next_vraw);
    n = next_n;
  }
}

// A fresh segment: no key seen by any of the rows.
inline void reset_segment(Scratch& sc, int rows, int d) {
  std::fill_n(sc.acc.data(), rows * d, 0.f);
  std::fill_n(sc.m.data(), rows, -kInf);
  std::fill_n(sc.l.data(), rows, 0.f);
}

// Loads the item's query rows and resets its softmax state.
// With raw_bf16 (the dot-product paths), the rows go to sc.qb as the projection wrote them
// (bf16, unscaled) instead of scaled fp32 rows to sc.q.
inline void start_item(const Params& p, const WorkItem& it, const ItemRows& ir, Scratch& sc,
                       bool raw_bf16 = false) {
  const int d = static_cast<int>(p.head_size);
  if (raw_bf16) {
    for (int r = 0; r < ir.rows; ++r) {
      std::memcpy(sc.qb.data() + r * d,
                  static_cast<const bf16_t*>(p.query) + query_offset(p, it, ir, r),
                  d * sizeof(bf16_t));
    }
  } else {
    load_query_rows(p, it, ir, sc.q.data());
  }
  reset_segment(sc, ir.rows, d);
  sc.segments_done = 0;
}

// Merges a segment's softmax state (m2, l2, acc2[0:d]) into the state (m, l, acc) of the
// segments before it: the one merge of the kernel, so that every split of a row's keys into
// work items sums the same numbers in the same order. A state with l = 0 saw no key.
// NOTE: not inlined, so that its arithmetic is one piece of code wherever it is called.
__attribute__((noinline)) void merge_state(float& m, float& l, float* acc, float m2, float l2,
                                           const float* acc2, int d) {
  if (!(l2 > 0.f)) return;
  if (!(l > 0.f)) {
    m = m2;
    l = l2;
    std::memcpy(acc, acc2, d * sizeof(float));
    return;
  }
  const float mx = std::max(m, m2);
  const float a = std::exp(m - mx), b = std::exp(m2 - mx);
  l = std::fma(l, a, l2 * b);
  for (int i = 0; i < d; ++i) acc[i] = std::fma(acc[i], a, acc2[i] * b);
  m = mx;
}

// Puts each row of acc (rows x d, chunks as the dot-product paths' p @ V leaves them:
// see dot_decode_pv) back in value order.
inline void unpermute_acc(float* acc, int rows, int d) {
  float tmp[32];
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < d; c += 32) {
      float* chunk = acc + r * d + c;
      for (int j = 0; j < 16; ++j) {
        tmp[8 * (j / 4) + j % 4] = chunk[j];
        tmp[8 * (j / 4) + 4 + j % 4] = chunk[16 + j];
      }
      std::memcpy(chunk, tmp, sizeof tmp);
    }
  }
}

// Closes the item's current segment: a part of a split range writes its rows' states [m, l,
// acc[0:d]] to the segment's slot of the partial buffer; a whole range merges them into the
// run state (the first by swapping buffers). `permuted`: acc holds the dot-product paths'
// chunk order (elementwise merges do not mind; the partial buffer holds value order).
inline void end_segment(const Params& p, const WorkItem& it, const ItemRows& ir, Scratch& sc,
                        float* partial, bool permuted, bool reset = true) {
  const int d = static_cast<int>(p.head_size);
  if (it.part >= 0) {
    if (permuted) unpermute_acc(sc.acc.data(), ir.rows, d);
    const int64_t slot = it.part + sc.segments_done;
    float* dst = partial + slot * p.max_rows * (d + 2);
    for (int r = 0; r < ir.rows; ++r) {
      float* row = dst + r * (d + 2);
      row[0] = sc.m[r];
      row[1] = sc.l[r];
      std::memcpy(row + 2, sc.acc.data() + r * d, d * sizeof(float));
    }
  } else if (sc.segments_done == 0) {
    std::swap(sc.acc, sc.run_acc);
    std::swap(sc.m, sc.run_m);
    std::swap(sc.l, sc.run_l);
  } else {
    for (int r = 0; r < ir.rows; ++r) {
      merge_state(sc.run_m[r], sc.run_l[r], sc.run_acc.data() + r * d, sc.m[r], sc.l[r],
                  sc.acc.data() + r * d, d);
    }
  }
  ++sc.segments_done;
  if (reset) reset_segment(sc, ir.rows, d);
}

// Closes the item's last segment, then writes its rows to the output (a whole range).
inline void finish_item(const Params& p, const WorkItem& it, const ItemRows& ir, Scratch& sc,
                        float* partial, bool permuted = false) {
  end_segment(p, it, ir, sc, partial, permuted, /*reset=*/false);
  if (it.part >= 0) return;
  const int d = static_cast<int>(p.head_size);
  if (permuted) unpermute_acc(sc.run_acc.data(), ir.rows, d);
  const int64_t tok0 = p.query_start_loc[it.seq] + it.q_begin;
  for (int r = 0; r < ir.rows; ++r) {
    store_out_row(p, tok0 + ir.token(r), ir.q_head(r, it.h_begin), sc.run_acc.data() + r * d,
                  sc.run_l[r]);
  }
}

// Reads one byte of every cache line of the n slots (K, then V) in memory order, so that their
// misses overlap and the hardware prefetchers see runs; the scoring and p @ V passes, which read
// each slot once per kv head, then hit the cache.
inline void touch_tile(const void* const* kraw, const void* const* vraw, int n,
                       int64_t span_bytes) {
  uint32_t sink = 0;
  for (const void* const* rows : {kraw, vraw}) {
    for (int t = 0; t < n; ++t) {
      const char* row = static_cast<const char*>(rows[t]);
      for (int64_t b = 0; b < span_bytes; b += 64) {
        sink += *reinterpret_cast<const volatile uint8_t*>(row + b);
      }
    }
  }
  (void)sink;
}

// A decode item (one query token, G = group <= kDotMaxRows). Per key tile: touch its slots,
// then per kv head score the G rows, update their softmax and accumulate p @ V in registers,
// reading K/V in place (bf16 widened in registers), while prefetching the next tile (a third
// of it during each head's scoring, for 3 kv heads).
//
// NOTE: measured on a 2-core znver3 (batch 64, context 1024, bf16): touching the tile first
// and prefetching the next one beat reading the cache per head straight from memory by 2x,
// and copying the tile into a buffer by ~20%.
template <typename cache_t, int G>
void run_decode_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size);
  const ItemRows ir(it, G);
  const int64_t span_bytes = ir.heads * d * static_cast<int64_t>(sizeof(cache_t));
  const int64_t pos = p.seq_lens[it.seq] - 1;  // the query token's position
  start_item(p, it, ir, sc);
  for_each_key_tile<cache_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    touch_tile(sc.kraw.data(), sc.vraw.data(), n, span_bytes);
    const int lo = window_start(p, pos, kb);
    for (int h = 0; h < ir.heads; ++h) {
      float* s = sc.s.data() + h * G * kKeyTile;
      const int pf0 = h * next_n / ir.heads, pf1 = (h + 1) * next_n / ir.heads;
      decode_scores<G, cache_t>(sc.q.data() + h * G * d, d, sc.kraw.data(), h * d, n, s,
                                sc.next_kraw.data() + pf0, sc.next_vraw.data() + pf0, pf1 - pf0,
                                span_bytes);
      float corr[G];
      for (int g = 0; g < G; ++g) {
        corr[g] = softmax_row(s + g * kKeyTile, n, sc.m[h * G + g], sc.l[h * G + g], lo,
                              p.soft_cap);
      }
      decode_pv<G, cache_t>(sc.acc.data() + h * G * d, d, corr, s, sc.vraw.data(), h * d, n);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, false); });
  finish_item(p, it, ir, sc, partial);
}

template <typename cache_t>
void run_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size);
  const ItemRows ir(it, static_cast<int>(p.group));
  const int span = ir.heads * d;  // elements of a slot this item reads
  const int64_t span_bytes = span * static_cast<int64_t>(sizeof(cache_t));
  const int64_t seq_len = p.seq_lens[it.seq];
  const int64_t query_len = p.query_start_loc[it.seq + 1] - p.query_start_loc[it.seq];
  // Query token j of the sequence sits at position seq_len - query_len + j.
  const int64_t first_pos = seq_len - query_len + it.q_begin;
  const bool few_rows = ir.rows_per_head <= kDotMaxRows;

  start_item(p, it, ir, sc);
  for_each_key_tile<cache_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    load_key_tile<cache_t>(sc, n, span);
    float* s = sc.s.data();
    if (few_rows) {
      // An fp32 cache has V read in place, after K: prefetch it. (bf16 V is converted already.)
      const void* const* pf_v = std::is_same_v<cache_t, float> ? sc.vraw.data() : nullptr;
      scores_dot(sc.q.data(), ir, d, sc.krow.data(), n, s, pf_v, sc.next_kraw.data(), next_n,
                 span_bytes);
    } else {
      for (int t = 0; t < next_n; ++t) {
        prefetch(sc.next_kraw[t], span_bytes);
        prefetch(sc.next_vraw[t], span_bytes);
      }
      for (int h = 0; h < ir.heads; ++h) {
        const int r0 = h * ir.rows_per_head;
        scores_gemm(sc.q.data() + r0 * d, ir.rows_per_head, d, sc.krow.data(), h * d, n,
                    sc.kt.data(), s + r0 * kKeyTile);
      }
    }
    for (int r = 0; r < ir.rows; ++r) {
      // A row sees the keys up to its own token's position (and within its window).
      const int64_t pos = first_pos + ir.token(r);
      const int64_t nv = std::min<int64_t>(n, pos - kb + 1);
      const int lo = window_start(p, pos, kb);
      if (nv <= lo) continue;
      softmax_pv_row(s + r * kKeyTile, lo, static_cast<int>(nv), p.soft_cap, sc.vrow.data(),
                     ir.head(r) * d, d, sc.m[r], sc.l[r], sc.acc.data() + r * d);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, false); });
  finish_item(p, it, ir, sc, partial);
}

// Merges the segments' states of a split item in order, as an item over the whole range merges
// them as it goes (end_segment), and writes its rows.
void merge_group(const Params& p, const MergeGroup& mg, const float* partial, float* tmp) {
  const int d = static_cast<int>(p.head_size);
  const WorkItem it{mg.seq, mg.h_begin, mg.h_end, mg.q_begin, mg.q_end, 0, 0, 0};
  const ItemRows ir(it, static_cast<int>(p.group));
  const int64_t stride = p.max_rows * (d + 2);
  const int64_t tok0 = p.query_start_loc[mg.seq] + mg.q_begin;
  for (int r = 0; r < ir.rows; ++r) {
    float m = -kInf, l = 0.f;
    for (int k = 0; k < mg.num_slots; ++k) {
      const float* row = partial + (mg.first_slot + k) * stride + r * (d + 2);
      merge_state(m, l, tmp, row[0], row[1], row + 2, d);
    }
    store_out_row(p, tok0 + ir.token(r), ir.q_head(r, mg.h_begin), tmp, l);
  }
}

// One head's d values of a new key/value into the cache: a copy, or (fp8) each rounded.
// One (token, kv head) row of the cache from the model's key or value row: copied; rounded to
// fp8 e5m2; or, for an int8 cache, int8 values x / scale rounded to nearest even, scale =
// max |x| / 127 in fp32 (0 for a row of zeros: all values 0), stored after them.
template <typename src_t, typename cache_t>
inline void write_row(cache_t* dst, const src_t* src, int64_t d) {
  if constexpr (std::is_same_v<src_t, cache_t>) {
    std::memcpy(dst, src, d * sizeof(cache_t));
  } else if constexpr (std::is_same_v<cache_t, int8_t>) {
    float amax = 0.f;
    for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(load1(src, i)));
    const float scale = amax / 127.f;
    for (int64_t i = 0; i < d; ++i) {
      const float q = scale > 0.f ? std::nearbyint(load1(src, i) / scale) : 0.f;
      dst[i] = static_cast<int8_t>(std::clamp(q, -127.f, 127.f));
    }
    std::memcpy(dst + d, &scale, sizeof scale);
  } else {
    static_assert(std::is_same_v<cache_t, fp8_t>, "only the fp8 and int8 caches convert");
    for (int64_t i = 0; i < d; ++i) dst[i].bits = float_to_fp8(load1(src, i));
  }
}

// Each token's key and value rows into its slot (a row of the cache holds head_size elements,
// or head_size int8 values and their scale: kv_cache.size(4)).
template <typename src_t, typename cache_t>
void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_cache,
              const at::Tensor& slot_mapping, int nt) {
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), d = key.size(2);
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t row = kv_cache.size(4);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "slot_mapping[", i, "] = ", slots[i],
                " is outside the cache's ", num_slots, " slots");
  }
  const src_t* k = static_cast<const src_t*>(key.data_ptr());
  const src_t* v = static_cast<const src_t*>(value.data_ptr());
  cache_t* kc = static_cast<cache_t*>(kv_cache.data_ptr());
  cache_t* vc = kc + num_slots * num_kv_heads * row;
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
  const auto write_token = [&](int64_t i) {
    cache_t* kdst = kc + slots[i] * num_kv_heads * row;
    cache_t* vdst = vc + slots[i] * num_kv_heads * row;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      write_row(kdst + h * row, k + i * ks0 + h * ks1, d);
      write_row(vdst + h * row, v + i * vs0 + h * vs1, d);
    }
  };
  if (num_tokens < 256) {  // NOTE: no parallel region (an if(false) one still sets up a team)
    for (int64_t i = 0; i < num_tokens; ++i) write_token(i);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < num_tokens; ++i) write_token(i);
}

#if defined(__AVX512BF16__)
// ---- Decode with VDPBF16PS (bf16 query and cache, AVX512_BF16) -----------------------------
//
// The same item as run_decode_item, with the two products done by bf16 pair dot products
// (fp32 sums): q . k on the bf16 query as the projection wrote it, scaled after the dot product,
// and p @ V on the softmax weights rounded to bf16, as torch's bf16 attention (its flash kernel
// and the eager softmax(...).to(bf16) @ V) computes them; the softmax itself (max, exp, sum)
// stays fp32. No widening of K or V, and half the multiply instructions.

// Lane j of the result = the sum of v[4 * (j % 4) + j / 4]'s lanes: a transposing tree of
// 128-bit, then 32-bit shuffles (15 adds for 16 sums). Callers store key j's vector at that
// index, so that lane j holds key j's score.
inline __m512 reduce16(const __m512* v) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512bh load_bh(const bf16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// 32 cached values as bf16 (for fp8, exact: the bytes as fp16s, widened to fp32, narrowed).
inline __m512i load_bf16x32(const bf16_t* p) { return _mm512_loadu_si512(p); }
inline __m512i load_bf16x32(const fp8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(b), 8);
  const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Prefetches into L2, not L1: same-process A/B on a 2-core Zen 4 (64 sequences x 192 keys, 30
// layers' caches), the next tile prefetched into L2 was 5-14% faster than into L1 (whose few
// miss buffers the prefetches then hold while the current tile is being read); prefetching the
// whole next tile at once, or two tiles ahead, was not faster.
inline void prefetch_l2(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T1);
  }
}

// s[g][t] = scale * q[g] . k[t] for the G rows of one kv head, keys 0 .. n - 1. D2 = d / 32
// when known at compile time (0: read d), so that the loops unroll; each key's chunks are loaded
// once for the G rows.
template <int G, int D2, typename cache_t>
inline void dot_decode_scores(const bf16_t* q, int d, const void* const* kslot, int64_t head_off,
                              int n, float scale, float* s) {
  const int d2 = D2 > 0 ? D2 : d / 32;
  const __m512 sv = _mm512_set1_ps(scale);
  for (int t0 = 0; t0 < n; t0 += 16) {
    __m512 v[G][16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      // Past the last key, repeat it: those scores are masked out by the softmax.
      const cache_t* k = static_cast<const cache_t*>(kslot[std::min(t0 + j, n - 1)]) + head_off;
      __m512 a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
      for (int c = 0; c < d2; ++c) {
        const __m512bh kc = (__m512bh)load_bf16x32(k + 32 * c);
        for (int g = 0; g < G; ++g) a[g] = _mm512_dpbf16_ps(a[g], load_bh(q + g * d + 32 * c), kc);
      }
      for (int g = 0; g < G; ++g) v[g][4 * (j % 4) + j / 4] = a[g];
    }
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(s + g * kKeyTile + t0, _mm512_mul_ps(reduce16(v[g]), sv));
    }
  }
}

// w[j] = the tile's weights p[2j], p[2j + 1] rounded to bf16, one pair per 32-bit word (the
// broadcast operand of VDPBF16PS). w is 64-byte aligned.
inline void weight_pairs(const float* p, uint32_t* w) {
  static_assert(kKeyTile == 32, "one conversion of 32 weights");
  const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
  _mm512_store_si512(w, (__m512i)h);
}

// acc[g] = acc[g] * corr[g] + p[g] @ V for the G rows of one kv head over keys 0 .. n - 1 (the
// weights past n are 0). Keys go in pairs: unpacking two V rows interleaves them into the pairs
// VDPBF16PS takes, which permutes the lanes within each 32-value chunk of a row: acc holds
// chunk c as [lo | hi], lo lane j being value 8 * (j / 4) + j % 4 and hi lane j that + 4
// (unpermute_acc restores the order).
template <int G, int D2, typename cache_t>
inline void dot_decode_pv(float* acc, int d, const float* corr, const float* p,
                          const void* const* vslot, int64_t head_off, int n) {
  // Chunks per pass: <= 12 accumulator pairs, of the 32 vector registers.
  constexpr int kChunks = std::max(1, std::min(D2 > 0 ? D2 : 4, 12 / G));
  const int d2 = D2 > 0 ? D2 : d / 32, pairs = (n + 1) / 2;
  alignas(64) uint32_t w[G][kKeyTile / 2];
  for (int g = 0; g < G; ++g) weight_pairs(p + g * kKeyTile, w[g]);
  for (int c0 = 0; c0 < d2; c0 += kChunks) {
    const int cn = std::min(kChunks, d2 - c0);
    __m512 lo[G][kChunks], hi[G][kChunks];
    for (int g = 0; g < G; ++g) {
      const __m512 cg = _mm512_set1_ps(corr[g]);
      for (int c = 0; c < cn; ++c) {
        lo[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * d + 32 * (c0 + c)), cg);
        hi[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * d + 32 * (c0 + c) + 16), cg);
      }
    }
    for (int j = 0; j < pairs; ++j) {
      const cache_t* v0 = static_cast<const cache_t*>(vslot[2 * j]) + head_off;
      const cache_t* v1 = static_cast<const cache_t*>(vslot[std::min(2 * j + 1, n - 1)]) + head_off;
      for (int c = 0; c < cn; ++c) {
        const __m512i a = load_bf16x32(v0 + 32 * (c0 + c));
        const __m512i b = load_bf16x32(v1 + 32 * (c0 + c));
        const __m512bh pl = (__m512bh)_mm512_unpacklo_epi16(a, b);
        const __m512bh ph = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int g = 0; g < G; ++g) {
          const __m512bh pw = (__m512bh)_mm512_set1_epi32(static_cast<int>(w[g][j]));
          lo[g][c] = _mm512_dpbf16_ps(lo[g][c], pw, pl);
          hi[g][c] = _mm512_dpbf16_ps(hi[g][c], pw, ph);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < cn; ++c) {
        _mm512_storeu_ps(acc + g * d + 32 * (c0 + c), lo[g][c]);
        _mm512_storeu_ps(acc + g * d + 32 * (c0 + c) + 16, hi[g][c]);
      }
    }
  }
}

// Whether the dot-product decode applies: bf16 query and cache, head size a multiple of 32.
inline bool dot_decode_applies(const Params& p) { return p.q_bf16 && p.head_size % 32 == 0; }

template <typename cache_t, int G, int D2>
void run_dot_decode_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size);
  const ItemRows ir(it, G);
  const int64_t span_bytes = ir.heads * d * static_cast<int64_t>(sizeof(cache_t));
  const int64_t pos = p.seq_lens[it.seq] - 1;  // the query token's position
  start_item(p, it, ir, sc, /*raw_bf16=*/true);
  const bf16_t* qb = sc.qb.data();
  for_each_key_tile<cache_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    touch_tile(sc.kraw.data(), sc.vraw.data(), n, span_bytes);
    const int lo = window_start(p, pos, kb);
    for (int h = 0; h < ir.heads; ++h) {
      for (int u = h * next_n / ir.heads; u < (h + 1) * next_n / ir.heads; ++u) {
        prefetch_l2(sc.next_kraw[u], span_bytes);
        prefetch_l2(sc.next_vraw[u], span_bytes);
      }
      float* s = sc.s.data() + h * G * kKeyTile;
      dot_decode_scores<G, D2, cache_t>(qb + h * G * d, d, sc.kraw.data(), h * d, n, p.scale, s);
      float corr[G];
      for (int g = 0; g < G; ++g) {
        corr[g] = softmax_row(s + g * kKeyTile, n, sc.m[h * G + g], sc.l[h * G + g], lo,
                              p.soft_cap);
      }
      dot_decode_pv<G, D2, cache_t>(sc.acc.data() + h * G * d, d, corr, s, sc.vraw.data(), h * d,
                                    n);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, true); });
  finish_item(p, it, ir, sc, partial, true);
}

// ---- Longer queries (prefill, chunks) with VDPBF16PS ------------------------------------------
//
// run_item's GEMM form for bf16: per key tile, K is packed once into pairs of inputs per key
// (kpair[i][t] = K[t][2i], K[t][2i + 1]) and V into pairs of keys (as dot_decode_pv pairs
// them), then four rows at a time score all the tile's keys and, after each row's softmax,
// accumulate p @ V, with the same rounding as the dot-product decode.

// s[r][0:32] = scale * q[r] . k[0:32] for R rows (kpair as above, zero past the keys), the
// bits dot_decode_scores gives: there lane l of a key's accumulator sums the pairs c * 16 + l
// of the head's chunks c, and reduce16 adds the lanes as (F0 + F2) + (F1 + F3), F_e = (a_e +
// a_{8+e}) + (a_{4+e} + a_{12+e}); here the same sums go with 16 keys in the lanes. R is a
// compile-time count so that the accumulators stay in registers.
template <int R>
inline void dot_scores_rows(const bf16_t* q, int d, const uint32_t* kpair, __m512 scale,
                            float* s) {
  const int d2 = d / 32;
  // Lane l's sum over the chunks, for the R rows and the 16 keys from key0.
  const auto lane_sums = [&](int l, int key0, __m512* a) {
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int c = 0; c < d2; ++c) {
      const int i = c * 16 + l;  // the pair
      const __m512bh b = (__m512bh)_mm512_loadu_si512(kpair + i * kKeyTile + key0);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, q + r * d + 2 * i, sizeof pair);
        a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(pair), b);
      }
    }
  };
  for (int key0 = 0; key0 < kKeyTile; key0 += 16) {
    __m512 f[4][R];
    for (int e = 0; e < 4; ++e) {
      __m512 a0[R], a8[R], a4[R], a12[R];
      lane_sums(e, key0, a0);
      lane_sums(8 + e, key0, a8);
      lane_sums(4 + e, key0, a4);
      lane_sums(12 + e, key0, a12);
      for (int r = 0; r < R; ++r) {
        f[e][r] = _mm512_add_ps(_mm512_add_ps(a0[r], a8[r]), _mm512_add_ps(a4[r], a12[r]));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(f[0][r], f[2][r]),
                                       _mm512_add_ps(f[1][r], f[3][r]));
      _mm512_storeu_ps(s + r * kKeyTile + key0, _mm512_mul_ps(sum, scale));
    }
  }
}

// dot_scores_rows for any number of rows: four at a time, then the rest.
inline void dot_scores_all_rows(const bf16_t* q, int rows, int d, const uint32_t* kpair,
                                float scale, float* s) {
  const __m512 sc = _mm512_set1_ps(scale);
  int r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) dot_scores_rows<4>(q + r0 * d, d, kpair, sc, s + r0 * kKeyTile);
  switch (rows - r0) {
    case 1: return dot_scores_rows<1>(q + r0 * d, d, kpair, sc, s + r0 * kKeyTile);
    case 2: return dot_scores_rows<2>(q + r0 * d, d, kpair, sc, s + r0 * kKeyTile);
    case 3: return dot_scores_rows<3>(q + r0 * d, d, kpair, sc, s + r0 * kKeyTile);
    default: return;
  }
}

// acc[r * d + 32 * c0 .. + 32 * CN] = acc * corr[r] + p_r @ V over the tile's first `pairs`
// key pairs for R rows (weights w[r] in pairs; vpair as below; acc chunks permuted as in
// dot_decode_pv), CN chunks from c0: compile-time counts, so the accumulators stay in
// registers, and each V load serves the R rows. Each row runs the products it would alone, in
// the same order, plus pairs past its own keys, whose weights softmax_row stored as 0.
template <int R, int CN>
inline void dot_pv_rows_chunks(float* acc, int d, int d2, int c0, const float* corr,
                               const uint32_t (*w)[kKeyTile / 2], const bf16_t* vpair,
                               int pairs) {
  __m512 lo[R][CN], hi[R][CN];
  for (int r = 0; r < R; ++r) {
    const __m512 cr = _mm512_set1_ps(corr[r]);
    for (int c = 0; c < CN; ++c) {
      lo[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + 32 * (c0 + c)), cr);
      hi[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + 32 * (c0 + c) + 16), cr);
    }
  }
  for (int j = 0; j < pairs; ++j) {
    const bf16_t* vj = vpair + (j * d2 + c0) * 64;
    __m512bh vl[CN], vh[CN];
    for (int c = 0; c < CN; ++c) vl[c] = load_bh(vj + 64 * c), vh[c] = load_bh(vj + 64 * c + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh pw = (__m512bh)_mm512_set1_epi32(static_cast<int>(w[r][j]));
      for (int c = 0; c < CN; ++c) {
        lo[r][c] = _mm512_dpbf16_ps(lo[r][c], pw, vl[c]);
        hi[r][c] = _mm512_dpbf16_ps(hi[r][c], pw, vh[c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < CN; ++c) {
      _mm512_storeu_ps(acc + r * d + 32 * (c0 + c), lo[r][c]);
      _mm512_storeu_ps(acc + r * d + 32 * (c0 + c) + 16, hi[r][c]);
    }
  }
}

// acc = acc * corr + p @ V for one row over the tile's key pairs (vpair: pair j, chunk c at
// vpair + (j * d2 + c) * 64 as [lo | hi]; acc chunks permuted as in dot_decode_pv).
inline void dot_pv_row(float* acc, int d, float corr, const float* p, const bf16_t* vpair,
                       int pairs) {
  alignas(64) uint32_t w[1][kKeyTile / 2];
  weight_pairs(p, w[0]);
  const int d2 = d / 32;
  int c0 = 0;
  for (; c0 + 4 <= d2; c0 += 4) dot_pv_rows_chunks<1, 4>(acc, d, d2, c0, &corr, w, vpair, pairs);
  switch (d2 - c0) {
    case 1: return dot_pv_rows_chunks<1, 1>(acc, d, d2, c0, &corr, w, vpair, pairs);
    case 2: return dot_pv_rows_chunks<1, 2>(acc, d, d2, c0, &corr, w, vpair, pairs);
    case 3: return dot_pv_rows_chunks<1, 3>(acc, d, d2, c0, &corr, w, vpair, pairs);
    default: return;
  }
}

// acc = acc * corr + p @ V for 4 rows over the tile's first `pairs` key pairs (as dot_pv_row
// does for one row), two chunks at a time.
inline void dot_pv_4rows(float* acc, int d, const float* corr, const uint32_t (*w)[kKeyTile / 2],
                         const bf16_t* vpair, int pairs) {
  const int d2 = d / 32;
  int c0 = 0;
  for (; c0 + 2 <= d2; c0 += 2) dot_pv_rows_chunks<4, 2>(acc, d, d2, c0, corr, w, vpair, pairs);
  if (c0 < d2) dot_pv_rows_chunks<4, 1>(acc, d, d2, c0, corr, w, vpair, pairs);
}

// Whether run_dot_item applies: the dot-product paths, for items of one kv head (which is every
// item of those paths past one token: see plan_items).
inline bool dot_item_applies(const Params& p, const WorkItem& it) {
  return p.dot_items && it.h_end - it.h_begin == 1;
}

// A tile's values as key pairs for the p @ V dot products: pair j holds keys 2j and 2j + 1
// (the last key again where n is odd) interleaved 16 bits at a time, 32 lanes per chunk c of
// d2; `load` widens 32 cached values to 16-bit lanes (bf16, or int16 from int8).
template <typename cache_t, typename out_t, typename Load>
inline void interleave_value_pairs(const void* const* vraw, int n, int d2, out_t* vpair,
                                   Load load) {
  const int pairs = (n + 1) / 2;
  for (int j = 0; j < pairs; ++j) {
    const cache_t* v0 = static_cast<const cache_t*>(vraw[2 * j]);
    const cache_t* v1 = static_cast<const cache_t*>(vraw[std::min(2 * j + 1, n - 1)]);
    for (int c = 0; c < d2; ++c) {
      const __m512i a = load(v0 + 32 * c), b = load(v1 + 32 * c);
      _mm512_storeu_si512(vpair + (j * d2 + c) * 64, _mm512_unpacklo_epi16(a, b));
      _mm512_storeu_si512(vpair + (j * d2 + c) * 64 + 32, _mm512_unpackhi_epi16(a, b));
    }
  }
}

template <typename cache_t>
void run_dot_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size), d2 = d / 32;
  const ItemRows ir(it, static_cast<int>(p.group));
  const int64_t seq_len = p.seq_lens[it.seq];
  const int64_t query_len = p.query_start_loc[it.seq + 1] - p.query_start_loc[it.seq];
  const int64_t first_pos = seq_len - query_len + it.q_begin;
  start_item(p, it, ir, sc, /*raw_bf16=*/true);
  const bf16_t* qb = sc.qb.data();
  uint32_t* kpair = sc.kpair.data();
  bf16_t* vpair = sc.vpair.data();
  const int64_t span_bytes = d * static_cast<int64_t>(sizeof(cache_t));
  for_each_key_tile<cache_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    for (int t = 0; t < next_n; ++t) {
      prefetch_l2(sc.next_kraw[t], span_bytes);
      prefetch_l2(sc.next_vraw[t], span_bytes);
    }
    for (int t = 0; t < kKeyTile; ++t) {
      const char* k = static_cast<const char*>(sc.kraw[std::min(t, n - 1)]);
      if constexpr (std::is_same_v<cache_t, fp8_t>) {  // the row as bf16 first
        const fp8_t* k8 = static_cast<const fp8_t*>(sc.kraw[std::min(t, n - 1)]);
        for (int c = 0; c < d2; ++c) {
          _mm512_storeu_si512(sc.row16.data() + 32 * c, load_bf16x32(k8 + 32 * c));
        }
        k = reinterpret_cast<const char*>(sc.row16.data());
      }
      for (int i = 0; i < d / 2; ++i) {
        uint32_t pair = 0;
        if (t < n) std::memcpy(&pair, k + 4 * i, sizeof pair);
        kpair[i * kKeyTile + t] = pair;
      }
    }
    interleave_value_pairs<cache_t>(sc.vraw.data(), n, d2, vpair,
                                    [](const cache_t* v) { return load_bf16x32(v); });
    float* s = sc.s.data();
    dot_scores_all_rows(qb, ir.rows, d, kpair, p.scale, s);
    const TileRows rows{p, ir, first_pos, kb, n};
    int r = rows.begin();
    const int end = rows.end(r);
    for (; r + 4 <= end; r += 4) {  // four rows share each V load
      float corr[4];
      alignas(64) uint32_t w[4][kKeyTile / 2];
      for (int i = 0; i < 4; ++i) {
        float* si = s + (r + i) * kKeyTile;
        corr[i] = softmax_row(si, rows.visible(r + i), sc.m[r + i], sc.l[r + i],
                              rows.first_visible(r + i), p.soft_cap);
        weight_pairs(si, w[i]);
      }
      dot_pv_4rows(sc.acc.data() + r * d, d, corr, w, vpair, (rows.visible(r + 3) + 1) / 2);
    }
    for (; r < end; ++r) {
      const int nv = rows.visible(r);
      const float corr = softmax_row(s + r * kKeyTile, nv, sc.m[r], sc.l[r],
                                     rows.first_visible(r), p.soft_cap);
      dot_pv_row(sc.acc.data() + r * d, d, corr, s + r * kKeyTile, vpair, (nv + 1) / 2);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, true); });
  finish_item(p, it, ir, sc, partial, true);
}

#if defined(__AVX512VNNI__)
// ---- An int8 cache read in place (bf16 query, AVX512_VNNI) ----------------------------------
//
// The int8 values go into the products as they are, in integer arithmetic: each query row is
// rounded once per item to int16 values with a scale (round(q / qs), qs = max |q| / 32767, the
// query as the projection wrote it), and per key tile each row's softmax weights times the
// values' scales, p[t] * vs[t], to int16 values with a scale of their own (max / 32767); the
// products and their sums are then exact 32-bit integer sums (VPDPWSSD: K and V sign-extended
// to int16 in registers, no dequantized copy), and only their totals are scaled in fp32:
//   s[t] = ((float) sum_i qi[i] * k[t][i] * ks[t]) * (qs * scale)
//   acc  = acc * corr + (float) sum_t wi[t] * v[t] * ws,  wi[t] = round(p[t] * vs[t] / ws)
// An exact integer sum is the same in any order, so the decode item and the GEMM-form item give
// a row the same bits whatever keys past the row's they also sum (with weight 0). The roundings
// (q to 16 bits per row, the weights to 16 bits per tile) are far finer than the int8 values'.
// Sums fit 32 bits for head sizes up to kInt8MaxHead: d * 32767 * 127 < 2^31.
constexpr int kInt8MaxHead = 512;

// Lane j of the result = the sum of v[4 * (j % 4) + j / 4]'s lanes (reduce16's tree, on int32:
// any order gives the same sum).
inline __m512i reduce16i(const __m512i* v) {
  const auto f = [](__m512i x) { return _mm512_castsi512_ps(x); };
  const auto i = [](__m512 x) { return _mm512_castps_si512(x); };
  __m512i b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k) {
    b[k] = _mm512_add_epi32(
        i(_mm512_shuffle_f32x4(f(v[2 * k]), f(v[2 * k + 1]), _MM_SHUFFLE(1, 0, 1, 0))),
        i(_mm512_shuffle_f32x4(f(v[2 * k]), f(v[2 * k + 1]), _MM_SHUFFLE(3, 2, 3, 2))));
  }
  for (int k = 0; k < 4; ++k) {
    c[k] = _mm512_add_epi32(
        i(_mm512_shuffle_f32x4(f(b[2 * k]), f(b[2 * k + 1]), _MM_SHUFFLE(2, 0, 2, 0))),
        i(_mm512_shuffle_f32x4(f(b[2 * k]), f(b[2 * k + 1]), _MM_SHUFFLE(3, 1, 3, 1))));
  }
  for (int k = 0; k < 2; ++k) {
    d[k] = _mm512_add_epi32(
        i(_mm512_shuffle_ps(f(c[2 * k]), f(c[2 * k + 1]), _MM_SHUFFLE(1, 0, 1, 0))),
        i(_mm512_shuffle_ps(f(c[2 * k]), f(c[2 * k + 1]), _MM_SHUFFLE(3, 2, 3, 2))));
  }
  return _mm512_add_epi32(i(_mm512_shuffle_ps(f(d[0]), f(d[1]), _MM_SHUFFLE(2, 0, 2, 0))),
                          i(_mm512_shuffle_ps(f(d[0]), f(d[1]), _MM_SHUFFLE(3, 1, 3, 1))));
}

// 32 int8 values sign-extended to int16.
inline __m512i load_i16x32(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// An int8 cache row's scale (after its d values).
inline float int8_row_scale(const void* row, int d) {
  float s;
  std::memcpy(&s, static_cast<const char*>(row) + d, sizeof s);
  return s;
}

// The item's bf16 query rows (sc.qb, as start_item(raw_bf16) leaves them) as int16 rows in
// sc.qi, each with its scale times the softmax scale in sc.qscale.
inline void quantize_query_rows(const Params& p, int rows, Scratch& sc) {
  const int d = static_cast<int>(p.head_size);
  for (int r = 0; r < rows; ++r) {
    const bf16_t* src = sc.qb.data() + r * d;
    int16_t* dst = sc.qi.data() + r * d;
    float amax = 0.f;
    for (int i = 0; i < d; ++i) amax = std::max(amax, std::fabs(bf16_to_float(src[i])));
    const float qs = amax / 32767.f;
    for (int i = 0; i < d; ++i) {
      const float x = qs > 0.f ? std::nearbyint(bf16_to_float(src[i]) / qs) : 0.f;
      dst[i] = static_cast<int16_t>(std::clamp(x, -32767.f, 32767.f));
    }
    sc.qscale[r] = qs * p.scale;
  }
}

// w[j] = the int16 pair round(x[2j] / ws), round(x[2j + 1] / ws) of the tile's weights x[t] =
// p[t] * vs[t] (>= 0), ws = max x / 32767; returns ws (0, and w all 0, when every x is 0).
inline float int8_weight_pairs(const float* p, const float* vs, uint32_t* w) {
  static_assert(kKeyTile == 32, "two vectors of weights");
  const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(vs));
  const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(vs + 16));
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
  if (!(mx > 0.f)) {
    std::memset(w, 0, kKeyTile / 2 * sizeof(uint32_t));
    return 0.f;
  }
  const float ws = mx / 32767.f;
  const __m512 wv = _mm512_set1_ps(ws);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i ha = _mm512_cvtsepi32_epi16(_mm512_cvt_roundps_epi32(_mm512_div_ps(a, wv), kRound));
  const __m256i hb = _mm512_cvtsepi32_epi16(_mm512_cvt_roundps_epi32(_mm512_div_ps(b, wv), kRound));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), ha);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 8), hb);
  return ws;
}

// The scales of the n rows at slot[t] + head_off (d values each), 0 past n.
inline void int8_tile_scales(const void* const* slot, int64_t head_off, int d, int n,
                             float* out) {
  for (int t = 0; t < kKeyTile; ++t) {
    out[t] = t < n ? int8_row_scale(static_cast<const int8_t*>(slot[t]) + head_off, d) : 0.f;
  }
}

// s[g][t] for the G rows of one kv head and keys 0 .. n - 1 (as in the section comment; past
// n the last key repeats, masked later). D2 = d / 32 when known at compile time (0: read d).
template <int G, int D2>
inline void int8_decode_scores(const int16_t* q, const float* qscale, int d,
                               const void* const* kslot, int64_t head_off, int n,
                               const float* ks, float* s) {
  const int d2 = D2 > 0 ? D2 : d / 32;
  for (int t0 = 0; t0 < n; t0 += 16) {
    __m512i v[G][16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const int8_t* k = static_cast<const int8_t*>(kslot[std::min(t0 + j, n - 1)]) + head_off;
      __m512i a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_si512();
      for (int c = 0; c < d2; ++c) {
        const __m512i kc = load_i16x32(k + 32 * c);
        for (int g = 0; g < G; ++g) {
          a[g] = _mm512_dpwssd_epi32(a[g], _mm512_loadu_si512(q + g * d + 32 * c), kc);
        }
      }
      for (int g = 0; g < G; ++g) v[g][4 * (j % 4) + j / 4] = a[g];
    }
    // Past n the scales are 0 (the scores, masked anyway, stay finite).
    const __m512 kv = _mm512_loadu_ps(ks + t0);
    for (int g = 0; g < G; ++g) {
      const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(reduce16i(v[g])), kv);
      _mm512_storeu_ps(s + g * kKeyTile + t0, _mm512_mul_ps(x, _mm512_set1_ps(qscale[g])));
    }
  }
}

// acc = acc * corr + (float) isum * ws for one vector of accumulators.
inline __m512 int8_pv_close(const float* acc, float corr, __m512i isum, float ws) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(ws),
                         _mm512_mul_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(corr)));
}

// acc[g] = acc[g] * corr[g] + p[g] @ V for the G rows of one kv head over keys 0 .. n - 1, V's
// int8 rows at vslot[t] + head_off with their scales vs (acc chunks permuted as in
// dot_decode_pv: the same pairing of two keys' values).
template <int G, int D2>
inline void int8_decode_pv(float* acc, int d, const float* corr, const float* p,
                           const float* vs, const void* const* vslot, int64_t head_off, int n) {
  constexpr int kChunks = std::max(1, std::min(D2 > 0 ? D2 : 4, 12 / G));
  const int d2 = D2 > 0 ? D2 : d / 32, pairs = (n + 1) / 2;
  alignas(64) uint32_t w[G][kKeyTile / 2];
  float ws[G];
  for (int g = 0; g < G; ++g) ws[g] = int8_weight_pairs(p + g * kKeyTile, vs, w[g]);
  for (int c0 = 0; c0 < d2; c0 += kChunks) {
    const int cn = std::min(kChunks, d2 - c0);
    __m512i lo[G][kChunks], hi[G][kChunks];
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < cn; ++c) lo[g][c] = hi[g][c] = _mm512_setzero_si512();
    }
    for (int j = 0; j < pairs; ++j) {
      const int8_t* v0 = static_cast<const int8_t*>(vslot[2 * j]) + head_off;
      const int8_t* v1 = static_cast<const int8_t*>(vslot[std::min(2 * j + 1, n - 1)]) + head_off;
      for (int c = 0; c < cn; ++c) {
        const __m512i a = load_i16x32(v0 + 32 * (c0 + c));
        const __m512i b = load_i16x32(v1 + 32 * (c0 + c));
        const __m512i pl = _mm512_unpacklo_epi16(a, b), ph = _mm512_unpackhi_epi16(a, b);
        for (int g = 0; g < G; ++g) {
          const __m512i pw = _mm512_set1_epi32(static_cast<int>(w[g][j]));
          lo[g][c] = _mm512_dpwssd_epi32(lo[g][c], pw, pl);
          hi[g][c] = _mm512_dpwssd_epi32(hi[g][c], pw, ph);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < cn; ++c) {
        float* a = acc + g * d + 32 * (c0 + c);
        _mm512_storeu_ps(a, int8_pv_close(a, corr[g], lo[g][c], ws[g]));
        _mm512_storeu_ps(a + 16, int8_pv_close(a + 16, corr[g], hi[g][c], ws[g]));
      }
    }
  }
}

// run_dot_decode_item over an int8 cache, read in place.
template <int G, int D2>
void run_int8_decode_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size);
  const ItemRows ir(it, G);
  const int64_t span_bytes = ir.heads * p.row_bytes;
  const int64_t pos = p.seq_lens[it.seq] - 1;  // the query token's position
  start_item(p, it, ir, sc, /*raw_bf16=*/true);
  quantize_query_rows(p, ir.rows, sc);
  for_each_key_tile<int8_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    touch_tile(sc.kraw.data(), sc.vraw.data(), n, span_bytes);
    const int lo = window_start(p, pos, kb);
    for (int h = 0; h < ir.heads; ++h) {
      for (int u = h * next_n / ir.heads; u < (h + 1) * next_n / ir.heads; ++u) {
        prefetch_l2(sc.next_kraw[u], span_bytes);
        prefetch_l2(sc.next_vraw[u], span_bytes);
      }
      const int64_t head_off = h * p.row_bytes;
      alignas(64) float ks[kKeyTile], vs[kKeyTile];
      int8_tile_scales(sc.kraw.data(), head_off, d, n, ks);
      int8_tile_scales(sc.vraw.data(), head_off, d, n, vs);
      float* s = sc.s.data() + h * G * kKeyTile;
      int8_decode_scores<G, D2>(sc.qi.data() + h * G * d, sc.qscale.data() + h * G, d,
                                sc.kraw.data(), head_off, n, ks, s);
      float corr[G];
      for (int g = 0; g < G; ++g) {
        corr[g] = softmax_row(s + g * kKeyTile, n, sc.m[h * G + g], sc.l[h * G + g], lo,
                              p.soft_cap);
      }
      int8_decode_pv<G, D2>(sc.acc.data() + h * G * d, d, corr, s, vs, sc.vraw.data(),
                            head_off, n);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, true); });
  finish_item(p, it, ir, sc, partial, true);
}

template <int D2>
void run_int8_decode(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  switch (p.group) {
    case 1: return run_int8_decode_item<1, D2>(p, it, sc, partial);
    case 2: return run_int8_decode_item<2, D2>(p, it, sc, partial);
    case 3: return run_int8_decode_item<3, D2>(p, it, sc, partial);
    case 4: return run_int8_decode_item<4, D2>(p, it, sc, partial);
    case 5: return run_int8_decode_item<5, D2>(p, it, sc, partial);
    case 6: return run_int8_decode_item<6, D2>(p, it, sc, partial);
    case 7: return run_int8_decode_item<7, D2>(p, it, sc, partial);
    default: return run_int8_decode_item<8, D2>(p, it, sc, partial);
  }
}

// s[r][0:32] for R rows over a key tile in int16 pairs (kpair[i][t] = k[t][2i], k[t][2i + 1],
// zero past the keys): the integer sums of int8_decode_scores (in another order: the same
// sums), then the same two multiplies.
template <int R>
inline void int8_scores_rows(const int16_t* q, const float* qscale, int d,
                             const uint32_t* kpair, const float* ks, float* s) {
  for (int key0 = 0; key0 < kKeyTile; key0 += 16) {
    __m512i a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
    for (int i = 0; i < d / 2; ++i) {
      const __m512i b = _mm512_loadu_si512(kpair + i * kKeyTile + key0);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, q + r * d + 2 * i, sizeof pair);
        a[r] = _mm512_dpwssd_epi32(a[r], _mm512_set1_epi32(pair), b);
      }
    }
    const __m512 kv = _mm512_loadu_ps(ks + key0);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(a[r]), kv);
      _mm512_storeu_ps(s + r * kKeyTile + key0, _mm512_mul_ps(x, _mm512_set1_ps(qscale[r])));
    }
  }
}

// acc = acc * corr + p @ V for R rows over the tile's first `pairs` key pairs (weights w[r]
// in int16 pairs with scale ws[r]; vpair: int16 pairs laid out as run_dot_item's bf16 ones),
// CN chunks from c0.
template <int R, int CN>
inline void int8_pv_rows_chunks(float* acc, int d, int d2, int c0, const float* corr,
                                const uint32_t (*w)[kKeyTile / 2], const float* ws,
                                const int16_t* vpair, int pairs) {
  __m512i lo[R][CN], hi[R][CN];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < CN; ++c) lo[r][c] = hi[r][c] = _mm512_setzero_si512();
  }
  for (int j = 0; j < pairs; ++j) {
    const int16_t* vj = vpair + (j * d2 + c0) * 64;
    __m512i vl[CN], vh[CN];
    for (int c = 0; c < CN; ++c) {
      vl[c] = _mm512_loadu_si512(vj + 64 * c);
      vh[c] = _mm512_loadu_si512(vj + 64 * c + 32);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i pw = _mm512_set1_epi32(static_cast<int>(w[r][j]));
      for (int c = 0; c < CN; ++c) {
        lo[r][c] = _mm512_dpwssd_epi32(lo[r][c], pw, vl[c]);
        hi[r][c] = _mm512_dpwssd_epi32(hi[r][c], pw, vh[c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < CN; ++c) {
      float* a = acc + r * d + 32 * (c0 + c);
      _mm512_storeu_ps(a, int8_pv_close(a, corr[r], lo[r][c], ws[r]));
      _mm512_storeu_ps(a + 16, int8_pv_close(a + 16, corr[r], hi[r][c], ws[r]));
    }
  }
}

// int8_pv_rows_chunks over all of a row's chunks, R rows at a time (R = 4 or 1).
template <int R>
inline void int8_pv_rows(float* acc, int d, const float* corr, const uint32_t (*w)[kKeyTile / 2],
                         const float* ws, const int16_t* vpair, int pairs) {
  const int d2 = d / 32;
  int c0 = 0;
  for (; c0 + 2 <= d2; c0 += 2) {
    int8_pv_rows_chunks<R, 2>(acc, d, d2, c0, corr, w, ws, vpair, pairs);
  }
  if (c0 < d2) int8_pv_rows_chunks<R, 1>(acc, d, d2, c0, corr, w, ws, vpair, pairs);
}

// run_dot_item over an int8 cache: per key tile, K packed into int16 pairs and V into pairs
// of keys (sign-extended in registers), then the decode item's integer sums and roundings.
void run_int8_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size), d2 = d / 32;
  const ItemRows ir(it, static_cast<int>(p.group));
  const int64_t seq_len = p.seq_lens[it.seq];
  const int64_t query_len = p.query_start_loc[it.seq + 1] - p.query_start_loc[it.seq];
  const int64_t first_pos = seq_len - query_len + it.q_begin;
  start_item(p, it, ir, sc, /*raw_bf16=*/true);
  quantize_query_rows(p, ir.rows, sc);
  uint32_t* kpair = sc.kpair.data();
  int16_t* vpair = reinterpret_cast<int16_t*>(sc.vpair.data());
  const int64_t span_bytes = p.row_bytes;
  for_each_key_tile<int8_t>(p, it, sc, [&](int64_t kb, int n, int next_n) {
    for (int t = 0; t < next_n; ++t) {
      prefetch_l2(sc.next_kraw[t], span_bytes);
      prefetch_l2(sc.next_vraw[t], span_bytes);
    }
    alignas(64) float ks[kKeyTile], vs[kKeyTile];
    int8_tile_scales(sc.kraw.data(), 0, d, n, ks);
    int8_tile_scales(sc.vraw.data(), 0, d, n, vs);
    for (int t = 0; t < kKeyTile; ++t) {
      const int8_t* k = static_cast<const int8_t*>(sc.kraw[std::min(t, n - 1)]);
      for (int i = 0; i < d / 2; ++i) {
        const uint16_t lo = static_cast<uint16_t>(static_cast<int16_t>(k[2 * i]));
        const uint16_t hi = static_cast<uint16_t>(static_cast<int16_t>(k[2 * i + 1]));
        kpair[i * kKeyTile + t] = t < n ? static_cast<uint32_t>(hi) << 16 | lo : 0u;
      }
    }
    interleave_value_pairs<int8_t>(sc.vraw.data(), n, d2, vpair, load_i16x32);
    float* s = sc.s.data();
    int r0 = 0;
    for (; r0 + 4 <= ir.rows; r0 += 4) {
      int8_scores_rows<4>(sc.qi.data() + r0 * d, sc.qscale.data() + r0, d, kpair, ks,
                          s + r0 * kKeyTile);
    }
    for (; r0 < ir.rows; ++r0) {
      int8_scores_rows<1>(sc.qi.data() + r0 * d, sc.qscale.data() + r0, d, kpair, ks,
                          s + r0 * kKeyTile);
    }
    const TileRows rows{p, ir, first_pos, kb, n};
    int r = rows.begin();
    const int end = rows.end(r);
    for (; r + 4 <= end; r += 4) {  // four rows share each V load
      float corr[4], ws[4];
      alignas(64) uint32_t w[4][kKeyTile / 2];
      for (int i = 0; i < 4; ++i) {
        float* si = s + (r + i) * kKeyTile;
        corr[i] = softmax_row(si, rows.visible(r + i), sc.m[r + i], sc.l[r + i],
                              rows.first_visible(r + i), p.soft_cap);
        ws[i] = int8_weight_pairs(si, vs, w[i]);
      }
      int8_pv_rows<4>(sc.acc.data() + r * d, d, corr, w, ws, vpair,
                      (rows.visible(r + 3) + 1) / 2);
    }
    for (; r < end; ++r) {
      const int nv = rows.visible(r);
      float* si = s + r * kKeyTile;
      const float corr = softmax_row(si, nv, sc.m[r], sc.l[r], rows.first_visible(r), p.soft_cap);
      alignas(64) uint32_t w[1][kKeyTile / 2];
      const float ws = int8_weight_pairs(si, vs, w[0]);
      int8_pv_rows<1>(sc.acc.data() + r * d, d, &corr, w, &ws, vpair, (nv + 1) / 2);
    }
  }, [&] { end_segment(p, it, ir, sc, partial, true); });
  finish_item(p, it, ir, sc, partial, true);
}
#define PA_INT8_IN_PLACE 1
#endif  // __AVX512VNNI__
#endif  // __AVX512BF16__

#if defined(__AVX512BF16__)
// run_dot_decode_item for the model's group size (1 .. kDotMaxRows); D2 = head_size / 32 for
// the common head sizes, 0 for the others.
template <typename cache_t, int D2>
void run_dot_decode(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  switch (p.group) {
    case 1: return run_dot_decode_item<cache_t, 1, D2>(p, it, sc, partial);
    case 2: return run_dot_decode_item<cache_t, 2, D2>(p, it, sc, partial);
    case 3: return run_dot_decode_item<cache_t, 3, D2>(p, it, sc, partial);
    case 4: return run_dot_decode_item<cache_t, 4, D2>(p, it, sc, partial);
    case 5: return run_dot_decode_item<cache_t, 5, D2>(p, it, sc, partial);
    case 6: return run_dot_decode_item<cache_t, 6, D2>(p, it, sc, partial);
    case 7: return run_dot_decode_item<cache_t, 7, D2>(p, it, sc, partial);
    default: return run_dot_decode_item<cache_t, 8, D2>(p, it, sc, partial);
  }
}
#endif

// run_decode for the caches other than an int8 one read in place.
template <typename cache_t>
void run_decode_widened(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
#if defined(__AVX512BF16__)
  if constexpr (!std::is_same_v<cache_t, float>) {
    if (dot_decode_applies(p)) {
      switch (p.head_size) {
        case 64: return run_dot_decode<cache_t, 2>(p, it, sc, partial);
        case 128: return run_dot_decode<cache_t, 4>(p, it, sc, partial);
        default: return run_dot_decode<cache_t, 0>(p, it, sc, partial);
      }
    }
  }
#endif
  switch (p.group) {
    case 1: return run_decode_item<cache_t, 1>(p, it, sc, partial);
    case 2: return run_decode_item<cache_t, 2>(p, it, sc, partial);
    case 3: return run_decode_item<cache_t, 3>(p, it, sc, partial);
    case 4: return run_decode_item<cache_t, 4>(p, it, sc, partial);
    case 5: return run_decode_item<cache_t, 5>(p, it, sc, partial);
    case 6: return run_decode_item<cache_t, 6>(p, it, sc, partial);
    case 7: return run_decode_item<cache_t, 7>(p, it, sc, partial);
    default: return run_decode_item<cache_t, 8>(p, it, sc, partial);
  }
}

// run_decode_item (or, for bf16 on AVX512_BF16, run_dot_decode_item; for an int8 cache read in
// place, run_int8_decode_item) for the model's group size (1 .. kDotMaxRows).
template <typename cache_t>
void run_decode(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  static_assert(kDotMaxRows == 8, "one case per group size");
#if defined(PA_INT8_IN_PLACE)
  if constexpr (std::is_same_v<cache_t, int8_t>) {  // only with p.int8_in_place
    switch (p.head_size) {
      case 64: return run_int8_decode<2>(p, it, sc, partial);
      case 128: return run_int8_decode<4>(p, it, sc, partial);
      default: return run_int8_decode<0>(p, it, sc, partial);
    }
  } else
#endif
  {
    run_decode_widened<cache_t>(p, it, sc, partial);
  }
}

// Whether a work item takes the decode paths (run_decode): one query token, a group of at most
// kDotMaxRows query heads per kv head.
inline bool is_decode_item(const Params& p, const WorkItem& it) {
  return it.q_end - it.q_begin == 1 && p.group <= kDotMaxRows;
}

// A work item past the decode paths, for the caches other than an int8 one read in place.
template <typename cache_t>
void run_widened_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
#if defined(__AVX512BF16__)
  if constexpr (!std::is_same_v<cache_t, float>) {
    if (dot_item_applies(p, it)) {
      run_dot_item<cache_t>(p, it, sc, partial);
      return;
    }
  }
#endif
  run_item<cache_t>(p, it, sc, partial);
}

template <typename cache_t>
void run_attention(const Params& p, const std::vector<WorkItem>& items,
                   const std::vector<MergeGroup>& groups, int nt) {
  const int d = static_cast<int>(p.head_size);
  const int num_slots = groups.empty() ? 0 : groups.back().first_slot + groups.back().num_slots;
  std::vector<float> partial(static_cast<size_t>(num_slots) * p.max_rows * (d + 2));
  const int64_t num_items = static_cast<int64_t>(items.size());
  const bool decode_only = std::all_of(items.begin(), items.end(), [&](const WorkItem& it) {
    return is_decode_item(p, it);
  });
  const auto run_one = [&](const WorkItem& it, Scratch& sc) {
    if (is_decode_item(p, it)) {
      run_decode<cache_t>(p, it, sc, partial.data());
      return;
    }
#if defined(PA_INT8_IN_PLACE)
    if constexpr (std::is_same_v<cache_t, int8_t>) {  // every item is one kv head's
      run_int8_item(p, it, sc, partial.data());
      return;
    } else
#endif
    {
      run_widened_item<cache_t>(p, it, sc, partial.data());
    }
  };
  const int span = static_cast<int>(p.num_kv_heads * p.head_size);
  const bool dequantize = p.int8 && !std::is_same_v<cache_t, int8_t>;
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  nt = static_cast<int>(std::min<int64_t>(nt, num_items));
  if (nt <= 1) {
    // One thread (e.g. a single stream's decode at a short context): no parallel region, whose
    // team set-up costs about a microsecond per call, 30 calls per step.
    Scratch sc(static_cast<int>(p.max_rows), d, span, decode_only, dequantize);
    for (const WorkItem& it : items) run_one(it, sc);
    std::vector<float> tmp(d);
    for (const MergeGroup& mg : groups) merge_group(p, mg, partial.data(), tmp.data());
    return;
  }
  // The split items' merges in the same region, after the items' loop and its barrier (not a
  // second region: one rendezvous fewer per call).
#pragma omp parallel num_threads(nt)
  {
    Scratch sc(static_cast<int>(p.max_rows), d, span, decode_only, dequantize);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_one(items[i], sc);
    if (num_groups > 0) {
      std::vector<float> tmp(d);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < num_groups; ++i) {
        merge_group(p, groups[i], partial.data(), tmp.data());
      }
    }
  }
}

// Plans the work items and validates the metadata, so the kernel never reads out of bounds.
// Returns the rows of the largest item.
//
// A query of few rows per kv head (decode, short chunks) is one item over all kv heads, so it
// reads each slot's heads together: the cache is then streamed in memory order. Longer queries
// are tiled per kv head, so that each K/V tile serves a bigger GEMM. When there are fewer than
// ~2 items per thread (and more than one thread), key ranges are split, aiming at ~8 items per
// thread.
int64_t plan_items(const Params& p, int64_t num_seqs, int64_t bt_width, int nt,
                   std::vector<WorkItem>& items, std::vector<MergeGroup>& groups) {
  const int g = static_cast<int>(p.group);
  const int kvh = static_cast<int>(p.num_kv_heads);
  const int tile_tokens = std::max(1, std::min(32, kTileRows / g));
  int64_t max_rows = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t query_len = p.query_start_loc[i + 1] - p.query_start_loc[i];
    const int64_t seq_len = p.seq_lens[i];
    TORCH_CHECK(query_len >= 0 && query_len <= seq_len, "sequence ", i, ": query_len ", query_len,
                " must be in 0..seq_len (", seq_len, ")");
    const int64_t num_blocks = (seq_len + p.block_size - 1) / p.block_size;
    TORCH_CHECK(num_blocks <= bt_width, "sequence ", i, ": seq_len ", seq_len, " needs ",
                num_blocks, " blocks but block_tables has ", bt_width, " columns");
    const int32_t* table = p.block_tables + i * p.bt_stride;
    for (int64_t b = 0; b < num_blocks; ++b) {
      TORCH_CHECK(table[b] >= 0 && table[b] < p.num_blocks, "sequence ", i, ": block id ",
                  table[b], " is outside the cache's ", p.num_blocks, " blocks");
    }
    const int32_t seq = static_cast<int32_t>(i);
    const int32_t num_cached = static_cast<int32_t>(seq_len - query_len);
    if (query_len == 0) continue;
    // The dot-product paths score per kv head past one token (run_dot_item).
    if (query_len * g <= kDotMaxRows && (query_len == 1 || !p.dot_items)) {
      const int32_t ql = static_cast<int32_t>(query_len);
      items.push_back({seq, 0, kvh, 0, ql, first_key_tile(p, num_cached), num_cached + ql, -1});
      max_rows = std::max<int64_t>(max_rows, query_len * g * kvh);
      continue;
    }
    for (int32_t qb = 0; qb < query_len; qb += tile_tokens) {
      const int32_t qe = static_cast<int32_t>(std::min<int64_t>(query_len, qb + tile_tokens));
      max_rows = std::max<int64_t>(max_rows, (qe - qb) * g);
      for (int32_t h = 0; h < kvh; ++h) {
        items.push_back({seq, h, h + 1, qb, qe, first_key_tile(p, num_cached + qb),
                         num_cached + qe, -1});
      }
    }
  }
  const auto work = [](const WorkItem& it) {
    return static_cast<int64_t>(it.k_end - it.k_begin) * (it.q_end - it.q_begin) *
           (it.h_end - it.h_begin);
  };
  const int64_t num_base = static_cast<int64_t>(items.size());
  // One thread gains nothing from a split (its parts would run one after another, then merge).
  if (nt > 1 && num_base > 0 && num_base < 2 * nt) {
    const int64_t want = (8 * nt + num_base - 1) / num_base;
    std::vector<WorkItem> split;
    int32_t next_slot = 0;
    for (const WorkItem& it : items) {
      // Segments counted from position 0: an item starting inside one (a sliding window)
      // reads the rest of it.
      const int64_t first_segment = it.k_begin / kSegment;
      const int64_t num_segments = (it.k_end + kSegment - 1) / kSegment - first_segment;
      const int64_t parts = std::min<int64_t>(want, num_segments);
      if (parts <= 1 || it.k_end - it.k_begin < 2 * kSegment) {  // not worth a merge
        split.push_back(it);
        continue;
      }
      // Parts of whole segments: E.g., 1000 keys (4 segments) in 3 parts -> 2 segments a part
      // -> 512, 488.
      const int64_t chunk = (num_segments + parts - 1) / parts * kSegment;
      MergeGroup mg{it.seq, it.h_begin, it.h_end, it.q_begin, it.q_end, next_slot,
                    static_cast<int32_t>(num_segments)};
      for (int64_t base = first_segment * kSegment; base < it.k_end; base += chunk) {
        WorkItem part = it;
        part.k_begin = static_cast<int32_t>(std::max<int64_t>(base, it.k_begin));
        part.k_end = static_cast<int32_t>(std::min<int64_t>(it.k_end, base + chunk));
        part.part = static_cast<int32_t>(next_slot + (base / kSegment - first_segment));
        split.push_back(part);
      }
      next_slot += mg.num_slots;
      groups.push_back(mg);
    }
    items.swap(split);
  }
  // Biggest items first, so that dynamic scheduling ends with the small ones.
  std::stable_sort(items.begin(), items.end(),
                   [&](const WorkItem& a, const WorkItem& b) { return work(a) > work(b); });
  return max_rows;
}

}  // namespace

void paged_attention_windowed(at::Tensor out, at::Tensor query, at::Tensor key,
                              at::Tensor value, at::Tensor kv_cache, at::Tensor slot_mapping,
                              at::Tensor query_start_loc, at::Tensor seq_lens,
                              at::Tensor block_tables, double scale, int64_t window,
                              double soft_cap) {
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(soft_cap >= 0, "soft_cap must be >= 0 (0: none), got ", soft_cap);
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && kv_cache.dim() == 5,
              "expected query/key/value [T, H, D] and kv_cache [2, blocks, block_size, H, D]");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu() &&
                  kv_cache.device().is_cpu(),
              "the cpu_paged kernel takes CPU tensors");
  const auto cache_dtype = kv_cache.scalar_type();
  const bool fp8 = cache_dtype == at::kFloat8_e5m2, int8 = cache_dtype == at::kChar;
  TORCH_CHECK(cache_dtype == at::kFloat || cache_dtype == at::kBFloat16 || fp8 || int8,
              "kv_cache must be float32, bfloat16, float8_e5m2 or int8, got ", cache_dtype);
  const auto kv_dtype = key.scalar_type();
  TORCH_CHECK(value.scalar_type() == kv_dtype &&
                  (fp8 || int8 ? kv_dtype == at::kFloat || kv_dtype == at::kBFloat16
                               : kv_dtype == cache_dtype),
              "key/value must have the cache's dtype (float32 or bfloat16 for a float8_e5m2 "
              "or int8 cache), got ", kv_dtype, " and ", value.scalar_type(), " for a ",
              cache_dtype, " cache");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16,
              "query must be float32 or bfloat16");
  TORCH_CHECK(out.scalar_type() == query.scalar_type() && out.is_contiguous() &&
                  out.sizes() == query.sizes(),
              "out must be a contiguous tensor like query");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1,
              "query/key/value need a contiguous last dimension");
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), d = query.size(2);
  const int64_t num_kv_heads = kv_cache.size(3);
  const int64_t row_size = int8 ? d + kInt8ScaleBytes : d;  // an int8 row: values, scale
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == row_size &&
                  num_heads % num_kv_heads == 0,
              "kv_cache shape ", kv_cache.sizes(), " does not match query ", query.sizes());
  TORCH_CHECK(key.size(0) == num_tokens && key.size(1) == num_kv_heads && key.size(2) == d &&
                  value.sizes() == key.sizes(),
              "key/value must be [num_tokens, num_kv_heads, head_size]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == num_tokens,
              "slot_mapping must be contiguous int64 [num_tokens]");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kLong && query_start_loc.is_contiguous() &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(),
              "query_start_loc and seq_lens must be contiguous int64");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1,
              "block_tables must be int32 [num_seqs, max_blocks] with contiguous rows");
  const int64_t num_seqs = seq_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "query_start_loc must be [num_seqs + 1] and block_tables [num_seqs, ...]");
  TORCH_CHECK(query_start_loc.data_ptr<int64_t>()[0] == 0 &&
                  query_start_loc.data_ptr<int64_t>()[num_seqs] == num_tokens,
              "query_start_loc must run from 0 to num_tokens");

  const int nt = std::max(1, at::get_num_threads());
  if (int8 && kv_dtype == at::kFloat) {
    write_kv<float, int8_t>(key, value, kv_cache, slot_mapping, nt);
  } else if (int8) {
    write_kv<bf16_t, int8_t>(key, value, kv_cache, slot_mapping, nt);
  } else if (fp8 && kv_dtype == at::kFloat) {
    write_kv<float, fp8_t>(key, value, kv_cache, slot_mapping, nt);
  } else if (fp8) {
    write_kv<bf16_t, fp8_t>(key, value, kv_cache, slot_mapping, nt);
  } else if (cache_dtype == at::kFloat) {
    write_kv<float, float>(key, value, kv_cache, slot_mapping, nt);
  } else {
    write_kv<bf16_t, bf16_t>(key, value, kv_cache, slot_mapping, nt);
  }
  if (num_tokens == 0) return;

  Params p;
  p.query = query.data_ptr();
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.q_bf16 = query.scalar_type() == at::kBFloat16;
  p.out = out.data_ptr();
  p.k_cache = kv_cache.data_ptr();
  p.v_cache = static_cast<const char*>(kv_cache.data_ptr()) +
              kv_cache.stride(0) * kv_cache.element_size();
  p.num_blocks = kv_cache.size(1);
  p.block_size = kv_cache.size(2);
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_size = d;
  p.group = num_heads / num_kv_heads;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.query_start_loc = query_start_loc.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.scale = static_cast<float>(scale);
  p.window = window;
  p.soft_cap = static_cast<float>(soft_cap);
  p.int8 = int8;
  p.row_bytes = row_size * kv_cache.element_size();
#if defined(__AVX512BF16__)
  p.dot_items = cache_dtype != at::kFloat && p.q_bf16 && d % 32 == 0;
#else
  p.dot_items = false;
#endif
#if defined(PA_INT8_IN_PLACE)
  p.int8_in_place = int8 && p.dot_items && d <= kInt8MaxHead;
#else
  p.int8_in_place = false;
#endif

  std::vector<WorkItem> items;
  std::vector<MergeGroup> groups;
  p.max_rows = plan_items(p, num_seqs, block_tables.size(1), nt, items, groups);
  if (items.empty()) return;
  // An int8 cache is read in place where it can be, else its tiles are dequantized to the
  // query's dtype (see dequantize_tile).
  if (cache_dtype == at::kFloat || (int8 && !p.q_bf16)) {
    run_attention<float>(p, items, groups, nt);
#if defined(PA_INT8_IN_PLACE)
  } else if (p.int8_in_place) {
    run_attention<int8_t>(p, items, groups, nt);
#endif
  } else if (fp8) {
    run_attention<fp8_t>(p, items, groups, nt);
  } else {
    run_attention<bf16_t>(p, items, groups, nt);
  }
}

// Whether this build reads an int8 cache in place for a bf16 query of head size `head_size`
// (else it dequantizes its tiles: see the file comment).
bool int8_kv_read_in_place(int64_t head_size) {
#if defined(PA_INT8_IN_PLACE)
  return head_size % 32 == 0 && head_size <= kInt8MaxHead;
#else
  (void)head_size;
  return false;
#endif
}

void paged_attention(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value,
                     at::Tensor kv_cache, at::Tensor slot_mapping, at::Tensor query_start_loc,
                     at::Tensor seq_lens, at::Tensor block_tables, double scale) {
  paged_attention_windowed(out, query, key, value, kv_cache, slot_mapping, query_start_loc,
                           seq_lens, block_tables, scale, 0, 0.0);
}

}  // namespace pagedllm

TORCH_LIBRARY(pagedllm_cpu, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, "
      "Tensor(b!) kv_cache, Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, "
      "Tensor block_tables, float scale) -> ()");
  m.def(
      "paged_attention_windowed(Tensor(a!) out, Tensor query, Tensor key, Tensor value, "
      "Tensor(b!) kv_cache, Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, "
      "Tensor block_tables, float scale, int window, float soft_cap) -> ()");
  m.def("int8_kv_read_in_place(int head_size) -> bool", &pagedllm::int8_kv_read_in_place);
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("paged_attention", &pagedllm::paged_attention);
  m.impl("paged_attention_windowed", &pagedllm::paged_attention_windowed);
}
