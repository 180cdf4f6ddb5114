// A linear layer for a few rows (decode of one to a few sequences): out = x @ weight.T + bias.
//
// With so few rows the layer is bound by reading the weight once, so this kernel streams each
// weight row exactly once for all rows of x, and reads bf16 weights directly (converting in
// registers): half the bytes of fp32, on CPUs where torch's own bf16 GEMM has no fast path.
// Accumulation is fp32, like a bf16 GEMM's; a bf16 output is rounded once at the end.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "ops.h"
#include "vec.h"

namespace pagedllm {
namespace {

using vec::bf16_t;
using vec::kLanes;
using vec::load1;
using vec::vfloat;

constexpr int64_t kMaxRows = 8;  // rows of x per pass over the weight


// Weight rows per inner step: independent dot products hide the FMA latency; one row of x
// leaves registers for eight, more rows of x for four.
template <int M>
constexpr int tile_rows() { return M == 1 ? 8 : 4; }

// out[m, n] for n in [n_begin, n_end), m < M (compile-time, so the accumulators stay in
// registers); x is fp32 [M, K] contiguous.
template <typename W, int M>
void rows_kernel(const float* x, const W* w, const float* bias, float* out, int64_t out_stride,
                 int64_t K, int64_t n_begin, int64_t n_end) {
  constexpr int kTile = tile_rows<M>();
  int64_t n = n_begin;
  for (; n + kTile <= n_end; n += kTile) {
    vfloat acc[M][kTile] = {};
    const W* wr[kTile];
    for (int t = 0; t < kTile; ++t) wr[t] = w + (n + t) * K;
    // The next tile's rows, fetched at the pace this tile is consumed: the rows are short
    // (about a KB each), too short for the hardware prefetcher to ramp up on its own.
    const char* next = reinterpret_cast<const char*>(w + (n + kTile) * K);
    constexpr int64_t kStepBytes = kTile * kLanes * sizeof(W);
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      for (int64_t b = 0; b < kStepBytes; b += 64) {
        __builtin_prefetch(next + k * kTile * sizeof(W) + b);
      }
      vfloat wv[kTile];
      for (int t = 0; t < kTile; ++t) wv[t] = vec::load(wr[t] + k);
      for (int m = 0; m < M; ++m) {
        const vfloat xv = vec::load(x + m * K + k);
        for (int t = 0; t < kTile; ++t) acc[m][t] += xv * wv[t];
      }
    }
    for (int m = 0; m < M; ++m) {
      float sums[kTile];
      for (int t = 0; t < kTile; t += 4) {
        const vec::vfloat4 four = vec::reduce4(acc[m][t], acc[m][t + 1], acc[m][t + 2],
                                               acc[m][t + 3]);
        for (int i = 0; i < 4; ++i) sums[t + i] = four[i];
      }
      for (int t = 0; t < kTile; ++t) {
        float s = sums[t];
        for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * load1(wr[t], kk);
        out[m * out_stride + n + t] = s + (bias ? bias[n + t] : 0.0f);
      }
    }
  }
  for (; n < n_end; ++n) {  // the last N % kTile rows
    const W* wr = w + n * K;
    for (int m = 0; m < M; ++m) {
      vfloat acc = {};
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes) acc += vec::load(x + m * K + k) * vec::load(wr + k);
      float s = vec::hsum(acc);
      for (; k < K; ++k) s += x[m * K + k] * load1(wr, k);
      out[m * out_stride + n] = s + (bias ? bias[n] : 0.0f);
    }
  }
}

template <typename W>
using RowsFn = void (*)(const float*, const W*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t);

template <typename W>
RowsFn<W> rows_fn(int64_t m) {
  switch (m) {
    case 1: return rows_kernel<W, 1>;
    case 2: return rows_kernel<W, 2>;
    case 3: return rows_kernel<W, 3>;
    case 4: return rows_kernel<W, 4>;
    case 5: return rows_kernel<W, 5>;
    case 6: return rows_kernel<W, 6>;
    case 7: return rows_kernel<W, 7>;
    default: return rows_kernel<W, 8>;
  }
}

}  // namespace

// out: [M, N] (x's dtype); x: [M, K] fp32/bf16; weight: [N, K] fp32/bf16 contiguous;
// bias: fp32 [N] or empty.
void linear_few_rows(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 2 && out.dim() == 2,
              "x [M, K], weight [N, K] and out [M, N] must be 2-D CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && weight.is_contiguous(), "weight must be contiguous [N, K]");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              "out must be [M, N] in x's dtype with a contiguous last dim");
  const auto is_float = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(is_float(x) && is_float(weight), "x and weight must be float32 or bfloat16");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                            bias.numel() == N),
              "bias must be contiguous float32 [N] (or empty)");
  if (M == 0 || N == 0) return;

  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // [M, K]: small, read once per row
  const bool out_fp32 = out.scalar_type() == at::kFloat;
  // fp32 results land in out directly when it is fp32; otherwise in a buffer rounded at the end.
  std::vector<float> buffer(out_fp32 ? 0 : M * N);
  float* dst = out_fp32 ? out.data_ptr<float>() : buffer.data();
  const int64_t dst_stride = out_fp32 ? out.stride(0) : N;
  const float* bias_ptr = has_bias ? bias.data_ptr<float>() : nullptr;

  const auto run = [&](auto tag) {
    using W = decltype(tag);
    const W* w = reinterpret_cast<const W*>(weight.data_ptr());
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m0);
      const RowsFn<W> fn = rows_fn<W>(rows);
      const float* xp = x32.data_ptr<float>() + m0 * K;
      float* op = dst + m0 * dst_stride;
      // Grain: 64 weight rows (~72 KB of bf16 at K = 576) per task, a multiple of the tile.
      at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
        fn(xp, w, bias_ptr, op, dst_stride, K, begin * 64, std::min(N, end * 64));
      });
    }
  };
  if (weight.scalar_type() == at::kBFloat16) run(bf16_t{}); else run(float{});

  if (!out_fp32) {
    bf16_t* o = reinterpret_cast<bf16_t*>(out.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) o[m * out.stride(0) + n] = vec::float_to_bf16(buffer[m * N + n]);
    }
  }
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("linear_few_rows(Tensor(a!) out, Tensor x, Tensor weight, Tensor bias) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("linear_few_rows", &pagedllm::linear_few_rows);
}
