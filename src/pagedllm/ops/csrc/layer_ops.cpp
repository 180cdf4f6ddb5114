// Fused elementwise ops of a decoder layer (RMSNorm, residual add + RMSNorm, SiLU-and-mul,
// rotary embedding). Eager PyTorch runs each of them as 4-7 kernels with a temporary each;
// one pass over the data here saves that memory traffic on every layer of every step.
//
// Rounding follows the torch code they replace (see pagedllm/layers/): math in fp32, and for
// bf16 tensors a rounding to bf16 wherever the torch version stores a bf16 intermediate.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16_t;
using vec::load1;
using vec::store1;
template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Rows of work per OpenMP task: small batches (decode) stay on the calling thread.
constexpr int64_t kGrain = 16;

void check_rows(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == width && t.stride(1) == 1,
              name, " must be a CPU [rows, ", width, "] tensor with a contiguous last dim");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

// x, and a second tensor `other` of the same dtype and row count, both [rows, width].
void check_row_pair(const at::Tensor& x, const at::Tensor& other, int64_t width,
                    const char* other_name) {
  check_rows(x, width, "x");
  check_rows(other, width, other_name);
  TORCH_CHECK(other.scalar_type() == x.scalar_type() && other.size(0) == x.size(0), other_name,
              " must match x");
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), row by row, in SIMD vectors. The sum of
// squares is kept in two vectors of partial sums: as one scalar chain of dependent adds it
// was most of the norms' time (0.1 s of a 3.4 s prefill step of 2048 tokens).

// The sum of squares of a row's values value(i) (fp32, as stored in T), in the order above.
template <typename Value>
inline float sum_squares(int64_t width, const Value& value) {
  constexpr int64_t L = vec::kLanes;
  vec::vfloat s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= width; i += 2 * L) {
    const vec::vfloat a = value.vector(i), b = value.vector(i + L);
    s0 += a * a;
    s1 += b * b;
  }
  for (; i + L <= width; i += L) {
    const vec::vfloat a = value.vector(i);
    s0 += a * a;
  }
  float sum = vec::hsum(s0 + s1);
  for (; i < width; ++i) {
    const float v = value.scalar(i);
    sum += v * v;
  }
  return sum;
}

// outr = weight * round(xr * rsqrt(sum / width + eps)).
template <typename T, typename W>
inline void normalize_row(T* outr, const T* xr, const W* weight, int64_t width, float sum,
                          float eps) {
  constexpr int64_t L = vec::kLanes;
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
  const vec::vfloat inv_v = vec::splat(inv);
  int64_t i = 0;
  for (; i + L <= width; i += L) {
    const vec::vfloat normed = vec::round_as<T>(vec::load(xr + i) * inv_v);
    vec::store(outr + i, vec::load(weight + i) * normed);
  }
  for (; i < width; ++i) {
    const float normed = vec::round_as<T>(load1(xr, i) * inv);
    store1(outr, i, load1(weight, i) * normed);
  }
}

// A row's stored values, read back.
template <typename T>
struct RowValues {
  const T* row;
  vec::vfloat vector(int64_t i) const { return vec::load(row + i); }
  float scalar(int64_t i) const { return load1(row, i); }
};

// residual += x, each value stored in T and returned as stored (the add before a norm).
template <typename T>
struct AddedValues {
  T* residual;
  const T* x;
  vec::vfloat vector(int64_t i) const {
    const vec::vfloat v = vec::round_as<T>(vec::load(residual + i) + vec::load(x + i));
    vec::store(residual + i, v);
    return v;
  }
  float scalar(int64_t i) const {
    const float v = vec::round_as<T>(load1(residual, i) + load1(x, i));
    store1(residual, i, v);
    return v;
  }
};

template <typename T, typename W>
void rms_norm_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, const W* weight,
                   int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      normalize_row(out + r * out_stride, xr, weight, width,
                    sum_squares(width, RowValues<T>{xr}), eps);
    }
  });
}

template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& weight, F&& body) {
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "weight must be contiguous 1-D");
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  const bool w_bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.scalar_type() == at::kFloat || w_bf16, "weight must be float32 or bfloat16");
  if (x_bf16 && w_bf16) body(bf16_t{}, bf16_t{});
  else if (x_bf16) body(bf16_t{}, float{});
  else if (w_bf16) body(float{}, bf16_t{});
  else body(float{}, float{});
}

}  // namespace

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t width = weight.numel();
  check_row_pair(x, out, width, "out");
  dispatch(x, weight, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    rms_norm_rows<T, W>(mut_ptr<T>(out), out.stride(0), ptr<T>(x), x.stride(0), ptr<W>(weight),
                        x.size(0), width, static_cast<float>(eps));
  });
}

// residual += x; x = rms_norm(residual): the add before each norm of a pre-norm block.
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  const int64_t width = weight.numel();
  check_row_pair(x, residual, width, "residual");
  dispatch(x, weight, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    T* xp = mut_ptr<T>(x);
    T* rp = mut_ptr<T>(residual);
    const W* wp = ptr<W>(weight);
    const int64_t xs = x.stride(0), rs = residual.stride(0);
    // One pass per row: the add, the sum of squares of its stored result, then the norm.
    at::parallel_for(0, x.size(0), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* rr = rp + r * rs;
        T* xr = xp + r * xs;
        const float sum = sum_squares(width, AddedValues<T>{rr, xr});
        normalize_row(xr, rr, wp, width, sum, static_cast<float>(eps));
      }
    });
  });
}

// x[t, h] = rms_norm(x[t, h]) for each head of each token, in place (Qwen3's q/k norms): the
// arithmetic of rms_norm on the rows of x.reshape(-1, head_size), on x where it lies (a view
// of the qkv projection's output).
void head_rms_norm(at::Tensor x, const at::Tensor& weight, double eps) {
  const int64_t width = weight.numel();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(2) == width && x.stride(2) == 1,
              "x must be a CPU [tokens, heads, ", width, "] tensor with a contiguous last dim");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  dispatch(x, weight, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    T* xp = mut_ptr<T>(x);
    const W* wp = ptr<W>(weight);
    const int64_t heads = x.size(1), ts = x.stride(0), hs = x.stride(1);
    at::parallel_for(0, x.size(0) * heads, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* xr = xp + (r / heads) * ts + (r % heads) * hs;
        normalize_row(xr, xr, wp, width, sum_squares(width, RowValues<T>{xr}),
                      static_cast<float>(eps));
      }
    });
  });
}

// out[:, i] = silu(x[:, i]) * x[:, d + i] for x = [gate | up] of width 2d.
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2 * d]");
  const int64_t d = x.size(1) / 2;
  check_rows(x, 2 * d, "x");
  check_rows(out, d, "out");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.size(0) == x.size(0),
              "out must match x");
  const auto body = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(x);
    T* op = mut_ptr<T>(out);
    const int64_t xs = x.stride(0), os = out.stride(0);
    at::parallel_for(0, x.size(0), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = xp + r * xs;
        const T* up = gate + d;
        T* o = op + r * os;
        int64_t i = 0;
        for (; i + vec::kLanes <= d; i += vec::kLanes) {
          vec::store(o + i, vec::silu_mul<T>(vec::load(gate + i), vec::load(up + i)));
        }
        for (; i < d; ++i) store1(o, i, vec::silu_mul<T>(load1(gate, i), load1(up, i)));
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16) body(bf16_t{}); else body(float{});
}

namespace {

// NeoX-style (rotate-half) RoPE, in place: for each head, with h = head_size / 2,
//   x[i] <- x[i] * cos[i] - x[i + h] * sin[i],  x[i + h] <- x[i + h] * cos[i + h] + x[i] * sin[i + h]
// cos/sin: a token's table rows, already rounded to T (as the torch version multiplies by
// tables in T), shared by all its heads.
template <typename T>
void rotate_heads(T* base, int64_t head_stride, int64_t num_heads, int64_t head_size,
                  const float* c, const float* s) {
  const int64_t h = head_size / 2;
  for (int64_t head = 0; head < num_heads; ++head) {
    T* x = base + head * head_stride;
    int64_t i = 0;
    for (; i + vec::kLanes <= h; i += vec::kLanes) {
      const vec::vfloat a = vec::load(x + i), b = vec::load(x + i + h);
      const vec::vfloat ca = vec::load(c + i), sa = vec::load(s + i);
      const vec::vfloat cb = vec::load(c + i + h), sb = vec::load(s + i + h);
      vec::store(x + i, vec::round_as<T>(a * ca) + vec::round_as<T>(-b * sa));
      vec::store(x + i + h, vec::round_as<T>(b * cb) + vec::round_as<T>(a * sb));
    }
    for (; i < h; ++i) {
      const float a = load1(x, i), b = load1(x, i + h);
      // The torch version: x * cos + rotate_half(x) * sin, each product stored in T.
      store1(x, i, vec::round_as<T>(a * c[i]) + vec::round_as<T>(-b * s[i]));
      store1(x, i + h, vec::round_as<T>(b * c[i + h]) + vec::round_as<T>(a * s[i + h]));
    }
  }
}

// The query's and key's heads of each token, in one pass over the tokens.
template <typename T>
void rotate_tokens(const at::Tensor& query, const at::Tensor& key, const float* cos,
                   const float* sin, const int64_t* positions, int64_t num_tokens) {
  const int64_t head_size = query.size(2);
  T* q = mut_ptr<T>(query);
  T* k = mut_ptr<T>(key);
  at::parallel_for(0, num_tokens, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> tables(2 * head_size);  // the token's cos and sin rows, rounded to T
    float* c = tables.data();
    float* s = c + head_size;
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = cos + positions[t] * head_size;
      const float* st = sin + positions[t] * head_size;
      for (int64_t i = 0; i < head_size; ++i) {
        c[i] = vec::round_as<T>(ct[i]);
        s[i] = vec::round_as<T>(st[i]);
      }
      rotate_heads<T>(q + t * query.stride(0), query.stride(1), query.size(1), head_size, c, s);
      rotate_heads<T>(k + t * key.stride(0), key.stride(1), key.size(1), head_size, c, s);
    }
  });
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor query, at::Tensor key,
                      const at::Tensor& cos_cache, const at::Tensor& sin_cache) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.dim() == 1,
              "positions must be contiguous int64 [num_tokens]");
  const int64_t num_tokens = positions.numel();
  for (const at::Tensor* t : {&query, &key}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->size(0) == num_tokens &&
                    t->stride(2) == 1,
                "query/key must be CPU [num_tokens, heads, head_size] with a contiguous last dim");
    TORCH_CHECK(t->scalar_type() == query.scalar_type() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                "query and key must both be float32 or both bfloat16");
  }
  const int64_t head_size = query.size(2);
  TORCH_CHECK(key.size(2) == head_size && head_size % 2 == 0, "head_size must be even");
  for (const at::Tensor* t : {&cos_cache, &sin_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(1) == head_size,
                "cos/sin caches must be contiguous float32 [max_position, head_size]");
  }
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_position = cos_cache.size(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "position ", pos[t], " out of range");
  }
  const float* c = cos_cache.data_ptr<float>();
  const float* s = sin_cache.data_ptr<float>();
  if (query.scalar_type() == at::kBFloat16) {
    rotate_tokens<bf16_t>(query, key, c, s, pos, num_tokens);
  } else {
    rotate_tokens<float>(query, key, c, s, pos, num_tokens);
  }
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_cache, "
      "Tensor sin_cache) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("rms_norm", &pagedllm::rms_norm);
  m.impl("fused_add_rms_norm", &pagedllm::fused_add_rms_norm);
  m.impl("silu_and_mul", &pagedllm::silu_and_mul);
  m.impl("rotary_embedding", &pagedllm::rotary_embedding);
}
