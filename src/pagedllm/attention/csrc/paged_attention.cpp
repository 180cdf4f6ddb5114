// Fused PagedAttention for CPU: writes the new K/V into their slots, then attends causally
// through the block tables, reading K/V in place from the block pool (no gather, no padding).
//
// Layouts (all row-major):
//   query  [num_tokens, num_heads, head_size]     fp32 or bf16; last dim contiguous
//   key    [num_tokens, num_kv_heads, head_size]  same dtype as the cache; last dim contiguous
//   cache  [2, num_blocks, block_size, num_kv_heads, head_size]  fp32 or bf16, contiguous
//   out    [num_tokens, num_heads, head_size]     query's dtype, contiguous
//
// Work is split into items (sequence, kv head, query tile[, key split]). An item owns the
// G = num_heads / num_kv_heads query heads that share its kv head, for every token of its query
// tile: R = tile_tokens * G rows, so each K/V row read from memory serves all R rows. Keys are
// walked in tiles of kKeyTile logical positions (a tile may span blocks, so any block size
// works), with an online softmax in fp32. Few rows (decode) score keys with dot products;
// many rows (prefill) pack the key tile transposed and score it as a small GEMM.
//
// When there are too few items to keep every thread busy (small-batch decode over a long
// context), an item's key range is split and the partial softmax states are merged afterwards
// (flash-decoding).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int kKeyTile = 32;        // logical key positions per softmax step
constexpr int kMaxTileRows = 64;    // query rows (tokens x grouped heads) per item, roughly
constexpr int kMinSplitKeys = 256;  // never split a key range into parts shorter than this
constexpr int kDotMaxRows = 8;      // up to this many rows, score by dot products (no packing)

using bf16_t = uint16_t;  // raw bfloat16 bits

inline float bf16_to_float(bf16_t x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16.
inline bf16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  return static_cast<bf16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// exp(x) for x <= 0 in softmax, Cephes-style: 2^n * p(r), accurate to ~1 ulp in fp32.
// Plain arithmetic only, so loops calling it auto-vectorise. Inputs below -87 give ~1e-38
// rather than 0; callers never rely on an exact 0 from here.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, e);
}

struct Params {
  // query / out / new key / value
  const void* query;
  int64_t q_stride_t, q_stride_h;
  bool q_bf16;
  void* out;  // contiguous, query's dtype
  // cache halves, contiguous [num_blocks, block_size, num_kv_heads, head_size]
  const void* k_cache;
  const void* v_cache;
  int64_t num_blocks, block_size, num_heads, num_kv_heads, head_size, group;
  const int32_t* block_tables;
  int64_t bt_stride;
  const int64_t* query_start_loc;
  const int64_t* seq_lens;
  float scale;
  int64_t max_rows;  // rows of the largest item: the stride of the partial buffer
};

struct WorkItem {
  int32_t seq, kv_head;
  int32_t q_begin, q_end;  // query tile, offsets within the sequence's new tokens
  int32_t k_begin, k_end;  // logical key positions this item reads
  int32_t part;            // -1: finish and write the output; else slot in the partial buffer
};

struct MergeGroup {
  int32_t seq, kv_head, q_begin, q_end;
  int32_t first_part, num_parts;
};

// Per-thread scratch, sized once per call.
struct Scratch {
  std::vector<float> q, acc, m, l, s, kt, kbuf, vbuf;
  std::vector<int32_t> num_visible;
  std::vector<const float*> krow, vrow;
  std::vector<const void*> kraw, vraw;
  Scratch(int rows, int d)
      : q(rows * d), acc(rows * d), m(rows), l(rows), s(rows * kKeyTile), kt(d * kKeyTile),
        kbuf(kKeyTile * d), vbuf(kKeyTile * d), num_visible(rows), krow(kKeyTile),
        vrow(kKeyTile), kraw(kKeyTile), vraw(kKeyTile) {}
};

// Points krow/vrow at fp32 rows of the n keys: in place for an fp32 cache, converted into
// kbuf/vbuf for bf16.
template <typename cache_t>
inline void load_key_tile(const Params& p, Scratch& sc, int n, int d) {
  if constexpr (std::is_same_v<cache_t, float>) {
    for (int t = 0; t < n; ++t) {
      sc.krow[t] = static_cast<const float*>(sc.kraw[t]);
      sc.vrow[t] = static_cast<const float*>(sc.vraw[t]);
    }
  } else {
    for (int t = 0; t < n; ++t) {
      const bf16_t* __restrict k = static_cast<const bf16_t*>(sc.kraw[t]);
      const bf16_t* __restrict v = static_cast<const bf16_t*>(sc.vraw[t]);
      float* __restrict kf = sc.kbuf.data() + t * d;
      float* __restrict vf = sc.vbuf.data() + t * d;
#pragma omp simd
      for (int i = 0; i < d; ++i) kf[i] = bf16_to_float(k[i]);
#pragma omp simd
      for (int i = 0; i < d; ++i) vf[i] = bf16_to_float(v[i]);
      sc.krow[t] = kf;
      sc.vrow[t] = vf;
    }
  }
}

// s[r][t] = q[r] . k[t] for few rows: one dot product per (row, key).
template <int kD>
inline void scores_dot(const float* __restrict q, int rows, int d_rt, const float* const* krow,
                       int n, float* __restrict s) {
  const int d = kD > 0 ? kD : d_rt;
  for (int t = 0; t < n; ++t) {
    const float* __restrict k = krow[t];
    for (int r = 0; r < rows; ++r) {
      const float* __restrict qr = q + r * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < d; ++i) dot += qr[i] * k[i];
      s[r * kKeyTile + t] = dot;
    }
  }
}

// s[r][0:kKeyTile] = q[r] @ K^T for many rows: packs K^T once, then one broadcast-FMA sweep
// per row (a rows x kKeyTile x d GEMM). Keys n..kKeyTile-1 are zero-padded.
template <int kD>
inline void scores_gemm(const float* __restrict q, int rows, int d_rt, const float* const* krow,
                        int n, float* __restrict kt, float* __restrict s) {
  const int d = kD > 0 ? kD : d_rt;
  for (int t = 0; t < n; ++t) {
    const float* __restrict k = krow[t];
    for (int i = 0; i < d; ++i) kt[i * kKeyTile + t] = k[i];
  }
  for (int t = n; t < kKeyTile; ++t)
    for (int i = 0; i < d; ++i) kt[i * kKeyTile + t] = 0.f;
  for (int r = 0; r < rows; ++r) {
    const float* __restrict qr = q + r * d;
    float acc[kKeyTile] = {};
    for (int i = 0; i < d; ++i) {
      const float qv = qr[i];
      const float* __restrict kr = kt + i * kKeyTile;
#pragma omp simd
      for (int t = 0; t < kKeyTile; ++t) acc[t] += qv * kr[t];
    }
    float* __restrict sr = s + r * kKeyTile;
#pragma omp simd
    for (int t = 0; t < kKeyTile; ++t) sr[t] = acc[t];
  }
}

// Online-softmax update of one row with its first nv scores of the tile, then acc += p @ V.
template <int kD>
inline void softmax_pv_row(float* __restrict s, int nv, const float* const* vrow, int d_rt,
                           float& m, float& l, float* __restrict acc) {
  const int d = kD > 0 ? kD : d_rt;
  float mx = m;
#pragma omp simd reduction(max : mx)
  for (int t = 0; t < nv; ++t) mx = std::max(mx, s[t]);
  const float corr = exp_approx(m - mx);  // m = -inf on the first tile: ~0, and acc, l are 0
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int t = 0; t < nv; ++t) {
    const float e = exp_approx(s[t] - mx);
    s[t] = e;
    sum += e;
  }
  m = mx;
  l = l * corr + sum;
  if constexpr (kD > 0) {
    // A local copy lets the compiler keep the accumulator row in registers across keys.
    float a[kD];
#pragma omp simd
    for (int i = 0; i < kD; ++i) a[i] = acc[i] * corr;
    for (int t = 0; t < nv; ++t) {
      const float pt = s[t];
      const float* __restrict v = vrow[t];
#pragma omp simd
      for (int i = 0; i < kD; ++i) a[i] += pt * v[i];
    }
#pragma omp simd
    for (int i = 0; i < kD; ++i) acc[i] = a[i];
  } else {
#pragma omp simd
    for (int i = 0; i < d; ++i) acc[i] *= corr;
    for (int t = 0; t < nv; ++t) {
      const float pt = s[t];
      const float* __restrict v = vrow[t];
#pragma omp simd
      for (int i = 0; i < d; ++i) acc[i] += pt * v[i];
    }
  }
}

inline void load_query_rows(const Params& p, const WorkItem& it, float* __restrict q) {
  const int d = static_cast<int>(p.head_size), g = static_cast<int>(p.group);
  const int64_t tok0 = p.query_start_loc[it.seq];
  for (int tok = it.q_begin; tok < it.q_end; ++tok) {
    for (int j = 0; j < g; ++j) {
      const int64_t head = it.kv_head * p.group + j;
      const int64_t off = (tok0 + tok) * p.q_stride_t + head * p.q_stride_h;
      float* __restrict dst = q + ((tok - it.q_begin) * g + j) * d;
      if (p.q_bf16) {
        const bf16_t* __restrict src = static_cast<const bf16_t*>(p.query) + off;
#pragma omp simd
        for (int i = 0; i < d; ++i) dst[i] = bf16_to_float(src[i]) * p.scale;
      } else {
        const float* __restrict src = static_cast<const float*>(p.query) + off;
#pragma omp simd
        for (int i = 0; i < d; ++i) dst[i] = src[i] * p.scale;
      }
    }
  }
}

// Writes acc[r] / l[r] to the output row of (token, head) in the output dtype.
inline void store_out_row(const Params& p, int64_t token, int64_t head, const float* __restrict a,
                          float inv_l) {
  const int d = static_cast<int>(p.head_size);
  const int64_t off = (token * p.num_heads + head) * p.head_size;
  if (p.q_bf16) {
    bf16_t* __restrict dst = static_cast<bf16_t*>(p.out) + off;
    for (int i = 0; i < d; ++i) dst[i] = float_to_bf16(a[i] * inv_l);
  } else {
    float* __restrict dst = static_cast<float*>(p.out) + off;
#pragma omp simd
    for (int i = 0; i < d; ++i) dst[i] = a[i] * inv_l;
  }
}

template <typename cache_t, int kD>
void run_item(const Params& p, const WorkItem& it, Scratch& sc, float* partial) {
  const int d = static_cast<int>(p.head_size), g = static_cast<int>(p.group);
  const int rows = (it.q_end - it.q_begin) * g;
  const int64_t seq_len = p.seq_lens[it.seq];
  const int64_t query_len = p.query_start_loc[it.seq + 1] - p.query_start_loc[it.seq];
  // Query token j of the sequence sits at position seq_len - query_len + j.
  const int64_t first_pos = seq_len - query_len + it.q_begin;
  const int32_t* table = p.block_tables + it.seq * p.bt_stride;
  const int64_t row_stride = p.num_kv_heads * p.head_size;  // elements between slots
  const cache_t* k_base = static_cast<const cache_t*>(p.k_cache) + it.kv_head * p.head_size;
  const cache_t* v_base = static_cast<const cache_t*>(p.v_cache) + it.kv_head * p.head_size;

  load_query_rows(p, it, sc.q.data());
  std::fill_n(sc.acc.data(), rows * d, 0.f);
  std::fill_n(sc.m.data(), rows, -std::numeric_limits<float>::infinity());
  std::fill_n(sc.l.data(), rows, 0.f);

  for (int64_t kb = it.k_begin; kb < it.k_end; kb += kKeyTile) {
    const int n = static_cast<int>(std::min<int64_t>(kKeyTile, it.k_end - kb));
    // Slot of logical key position kb + t: block table[pos / bs] * bs + pos % bs.
    int64_t blk = kb / p.block_size, off = kb % p.block_size;
    for (int t = 0; t < n; ++t) {
      const int64_t slot = static_cast<int64_t>(table[blk]) * p.block_size + off;
      sc.kraw[t] = k_base + slot * row_stride;
      sc.vraw[t] = v_base + slot * row_stride;
      if (++off == p.block_size) off = 0, ++blk;
    }
    load_key_tile<cache_t>(p, sc, n, d);

    float* s = sc.s.data();
    if (rows <= kDotMaxRows) {
      scores_dot<kD>(sc.q.data(), rows, d, sc.krow.data(), n, s);
    } else {
      scores_gemm<kD>(sc.q.data(), rows, d, sc.krow.data(), n, sc.kt.data(), s);
    }
    for (int r = 0; r < rows; ++r) {
      // Row r (token r / g) sees keys up to its own position.
      const int64_t nv = std::min<int64_t>(n, first_pos + r / g - kb + 1);
      if (nv <= 0) continue;
      softmax_pv_row<kD>(s + r * kKeyTile, static_cast<int>(nv), sc.vrow.data(), d, sc.m[r],
                         sc.l[r], sc.acc.data() + r * d);
    }
  }

  if (it.part < 0) {
    const int64_t tok0 = p.query_start_loc[it.seq] + it.q_begin;
    for (int r = 0; r < rows; ++r) {
      store_out_row(p, tok0 + r / g, it.kv_head * p.group + r % g, sc.acc.data() + r * d,
                    1.f / sc.l[r]);
    }
  } else {
    // Partial state per row: [m, l, acc[0:d]].
    float* dst = partial + static_cast<int64_t>(it.part) * p.max_rows * (d + 2);
    for (int r = 0; r < rows; ++r) {
      float* row = dst + r * (d + 2);
      row[0] = sc.m[r];
      row[1] = sc.l[r];
      std::memcpy(row + 2, sc.acc.data() + r * d, d * sizeof(float));
    }
  }
}

void merge_group(const Params& p, const MergeGroup& mg, const float* partial, float* tmp) {
  const int d = static_cast<int>(p.head_size), g = static_cast<int>(p.group);
  const int rows = (mg.q_end - mg.q_begin) * g;
  const int64_t stride = p.max_rows * (d + 2);
  const int64_t tok0 = p.query_start_loc[mg.seq] + mg.q_begin;
  for (int r = 0; r < rows; ++r) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int k = 0; k < mg.num_parts; ++k) {
      const float* row = partial + (mg.first_part + k) * stride + r * (d + 2);
      if (row[1] > 0.f) mx = std::max(mx, row[0]);
    }
    float l = 0.f;
    std::fill_n(tmp, d, 0.f);
    for (int k = 0; k < mg.num_parts; ++k) {
      const float* row = partial + (mg.first_part + k) * stride + r * (d + 2);
      if (!(row[1] > 0.f)) continue;  // no visible key in this part
      const float w = exp_approx(row[0] - mx);
      l += row[1] * w;
#pragma omp simd
      for (int i = 0; i < d; ++i) tmp[i] += row[2 + i] * w;
    }
    store_out_row(p, tok0 + r / g, mg.kv_head * p.group + r % g, tmp, 1.f / l);
  }
}

template <typename cache_t>
void write_kv(const torch::Tensor& key, const torch::Tensor& value, const torch::Tensor& kv_cache,
              const torch::Tensor& slot_mapping, int nt) {
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), d = key.size(2);
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "slot_mapping[", i, "] = ", slots[i],
                " is outside the cache's ", num_slots, " slots");
  }
  const cache_t* k = static_cast<const cache_t*>(key.data_ptr());
  const cache_t* v = static_cast<const cache_t*>(value.data_ptr());
  cache_t* kc = static_cast<cache_t*>(kv_cache.data_ptr());
  cache_t* vc = kc + num_slots * num_kv_heads * d;
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
#pragma omp parallel for num_threads(nt) schedule(static) if (num_tokens >= 64)
  for (int64_t i = 0; i < num_tokens; ++i) {
    cache_t* kdst = kc + slots[i] * num_kv_heads * d;
    cache_t* vdst = vc + slots[i] * num_kv_heads * d;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(kdst + h * d, k + i * ks0 + h * ks1, d * sizeof(cache_t));
      std::memcpy(vdst + h * d, v + i * vs0 + h * vs1, d * sizeof(cache_t));
    }
  }
}

template <typename cache_t, int kD>
void run_attention(const Params& p, const std::vector<WorkItem>& items,
                   const std::vector<MergeGroup>& groups, int nt) {
  const int d = static_cast<int>(p.head_size);
  const int num_parts = groups.empty() ? 0 : groups.back().first_part + groups.back().num_parts;
  std::vector<float> partial(static_cast<size_t>(num_parts) * p.max_rows * (d + 2));
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(nt)
  {
    Scratch sc(static_cast<int>(p.max_rows), d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      run_item<cache_t, kD>(p, items[i], sc, partial.data());
    }
  }
  if (!groups.empty()) {
    const int64_t num_groups = static_cast<int64_t>(groups.size());
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> tmp(d);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < num_groups; ++i) merge_group(p, groups[i], partial.data(), tmp.data());
    }
  }
}

// Plans the work items: query tiles per (sequence, kv head), and key splits when there are too
// few items for the threads. Also validates the metadata, so the kernel never reads out of
// bounds.
int plan_items(const Params& p, int64_t num_seqs, int64_t bt_width, int nt,
               std::vector<WorkItem>& items, std::vector<MergeGroup>& groups) {
  const int g = static_cast<int>(p.group);
  const int tile_tokens = std::max(1, std::min(32, kMaxTileRows / g));
  int max_rows = 0;
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
    const int64_t num_cached = seq_len - query_len;
    for (int64_t qb = 0; qb < query_len; qb += tile_tokens) {
      const int64_t qe = std::min<int64_t>(query_len, qb + tile_tokens);
      max_rows = std::max<int>(max_rows, static_cast<int>(qe - qb) * g);
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(h),
                         static_cast<int32_t>(qb), static_cast<int32_t>(qe), 0,
                         static_cast<int32_t>(num_cached + qe), -1});
      }
    }
  }
  // Split key ranges when there are fewer items than ~2 per thread: aim at ~8 per thread.
  const int64_t num_base = static_cast<int64_t>(items.size());
  if (num_base > 0 && num_base < 2 * nt) {
    const int64_t want = (8 * nt + num_base - 1) / num_base;
    std::vector<WorkItem> split;
    int32_t next_part = 0;
    for (const WorkItem& it : items) {
      const int64_t num_keys = it.k_end - it.k_begin;
      const int64_t parts = std::min<int64_t>(want, num_keys / kMinSplitKeys);
      if (parts <= 1) {
        split.push_back(it);
        continue;
      }
      // Parts of whole key tiles: E.g., 1000 keys in 3 parts -> chunk 352 -> 352, 352, 296.
      const int64_t chunk = ((num_keys + parts - 1) / parts + kKeyTile - 1) / kKeyTile * kKeyTile;
      MergeGroup mg{it.seq, it.kv_head, it.q_begin, it.q_end, next_part, 0};
      for (int64_t kb = it.k_begin; kb < it.k_end; kb += chunk) {
        WorkItem part = it;
        part.k_begin = static_cast<int32_t>(kb);
        part.k_end = static_cast<int32_t>(std::min<int64_t>(it.k_end, kb + chunk));
        part.part = next_part++;
        ++mg.num_parts;
        split.push_back(part);
      }
      groups.push_back(mg);
    }
    items.swap(split);
  }
  // Longest items first, so that dynamic scheduling ends with the short ones.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) {
    return static_cast<int64_t>(a.k_end - a.k_begin) * (a.q_end - a.q_begin) >
           static_cast<int64_t>(b.k_end - b.k_begin) * (b.q_end - b.q_begin);
  });
  return max_rows;
}

void paged_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key,
                     torch::Tensor value, torch::Tensor kv_cache, torch::Tensor slot_mapping,
                     torch::Tensor query_start_loc, torch::Tensor seq_lens,
                     torch::Tensor block_tables, double scale) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && kv_cache.dim() == 5,
              "expected query/key/value [T, H, D] and kv_cache [2, blocks, block_size, H, D]");
  const auto cache_dtype = kv_cache.scalar_type();
  TORCH_CHECK(cache_dtype == at::kFloat || cache_dtype == at::kBFloat16,
              "kv_cache must be float32 or bfloat16, got ", cache_dtype);
  TORCH_CHECK(key.scalar_type() == cache_dtype && value.scalar_type() == cache_dtype,
              "key/value must have the cache's dtype");
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
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == d && num_heads % num_kv_heads == 0,
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
  if (cache_dtype == at::kFloat) {
    write_kv<float>(key, value, kv_cache, slot_mapping, nt);
  } else {
    write_kv<bf16_t>(key, value, kv_cache, slot_mapping, nt);
  }
  if (num_tokens == 0) return;

  Params p;
  p.query = query.data_ptr();
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.q_bf16 = query.scalar_type() == at::kBFloat16;
  p.out = out.data_ptr();
  p.k_cache = kv_cache[0].data_ptr();
  p.v_cache = kv_cache[1].data_ptr();
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

  std::vector<WorkItem> items;
  std::vector<MergeGroup> groups;
  p.max_rows = plan_items(p, num_seqs, block_tables.size(1), nt, items, groups);

  auto dispatch = [&](auto cache_tag) {
    using cache_t = decltype(cache_tag);
    if (d == 64) {
      run_attention<cache_t, 64>(p, items, groups, nt);
    } else if (d == 128) {
      run_attention<cache_t, 128>(p, items, groups, nt);
    } else {
      run_attention<cache_t, 0>(p, items, groups, nt);
    }
  };
  if (cache_dtype == at::kFloat) {
    dispatch(float{});
  } else {
    dispatch(bf16_t{});
  }
}

}  // namespace
}  // namespace pagedllm

TORCH_LIBRARY(pagedllm_cpu, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, "
      "Tensor(b!) kv_cache, Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, "
      "Tensor block_tables, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("paged_attention", &pagedllm::paged_attention);
}
