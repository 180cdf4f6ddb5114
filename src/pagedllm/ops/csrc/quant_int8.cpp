// Linear layers on symmetric int8 weights (quantization="int8"): W[n, k] = scale * q[n, k]
// with q in -127..127 and a scale per output channel, or per group of consecutive inputs of
// each, stored as q + 128 in bytes, each row padded to whole 64-value chunks
// (pack_int8_weight), so the quantized kernel (quant_dot.cpp) reads the rows in place; or
// the same values packed into panels for the W8A8 GEMM (pack_int8_panels, int8_gemm.cpp).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "int8_gemm.h"
#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

// weight [N, K] fp32/bf16 -> (bytes [N, padded_k(K)] uint8 = q + 128 (128 past K), scales
// fp32): q = W / scale rounded to nearest even and clipped to +-127, each scale chosen for the
// least squared error (see below). group_size 0: a scale per row, scales [N]; else a scale per
// group_size consecutive inputs (a multiple of 16 dividing padded_k(K)), scales [N, groups].
std::tuple<at::Tensor, at::Tensor> pack_int8_weight(const at::Tensor& weight, int64_t group_size) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "weight must be a 2-D fp32/bf16 CPU tensor");
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1), Kp = padded_k(K);
  const int64_t g = group_size == 0 ? Kp : group_size;
  TORCH_CHECK(g > 0 && g % 16 == 0 && Kp % g == 0, "group_size must be 0 (per row) or a multiple "
              "of 16 dividing ", Kp, " (the input dimension ", K, " padded to 64), got ",
              group_size);
  const int64_t groups = Kp / g;
  at::Tensor bytes = at::full({N, Kp}, 128, w.options().dtype(at::kByte));
  at::Tensor scales =
      group_size == 0 ? at::empty({N}, w.options()) : at::empty({N, groups}, w.options());
  const float* src = w.data_ptr<float>();
  uint8_t* dst = bytes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / groups, k0 = item % groups * g, k1 = std::min(K, k0 + g);
      const float* row = src + n * K;
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(row[k]));
      // The scale with the least squared error among max |W| / 127 and 15 clipped ones
      // (large weights clipped to +-127 steps, the rest rounded more finely).
      float s = amax / 127.0f;
      double best = -1.0;
      for (int c = 0; c < 16; ++c) {
        const float scale = amax * (1.0f - 0.02f * c) / 127.0f;
        const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        double err = 0.0;
        for (int64_t k = k0; k < k1; ++k) {
          const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[k] * inv)));
          const double e = static_cast<double>(row[k]) - static_cast<double>(q) * scale;
          err += e * e;
        }
        if (best < 0.0 || err < best) best = err, s = scale;
      }
      const float inv = s != 0.0f ? 1.0f / s : 0.0f;
      sp[item] = s;
      for (int64_t k = k0; k < k1; ++k) {
        const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[k] * inv)));
        dst[n * Kp + k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
      }
    }
  });
  return {bytes, scales};
}

// pack_int8_weight's quantization (group_size > 0) packed for the W8A8 GEMM: bytes [N,
// padded_k(K)] uint8 in panels, scales [panels, groups, 32] (int8_gemm.h).
std::tuple<at::Tensor, at::Tensor> pack_int8_panels(const at::Tensor& weight,
                                                    int64_t group_size) {
  TORCH_CHECK(group_size > 0, "the W8A8 GEMM takes a scale per group of inputs, got group_size ",
              group_size);
  const auto [bytes, scales] = pack_int8_weight(weight, group_size);
  return int8_panels_from_rows(bytes, scales);
}

}  // namespace

// activation_bits 0: the layout's own (16 for rows; panels take only their own: 8, 16 with
// 4-D scales and one weight plane).
void int8_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& bytes,
                 const at::Tensor& scales, const at::Tensor& bias, bool quantize_activations,
                 int64_t activation_bits) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  const int64_t K = x.size(1);
  if (scales.dim() == 3 || scales.dim() == 4) {  // pack_int8_panels (int8_gemm.h)
    // 4-D scales: 16-bit activations, or 16-bit weights (two planes: twice the bytes).
    const int64_t bits = scales.dim() == 4 && bytes.size(-1) == padded_k(K) ? 16 : 8;
    TORCH_CHECK(activation_bits == 0 || activation_bits == bits, "these int8 panels take ",
                bits, "-bit activations, got activation_bits ", activation_bits);
    const float* bp = nullptr;
    if (bias.numel() != 0) {
      TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                      bias.numel() == bytes.size(0),
                  "bias must be contiguous float32 [N] (or empty)");
      bp = bias.data_ptr<float>();
    }
    int8_panel_linear(out, x, bytes, scales, bp, quantize_activations);
    return;
  }
  if (activation_bits == 0) activation_bits = kDefaultActivationBits;
  TORCH_CHECK(bytes.device().is_cpu() && bytes.dim() == 2 && bytes.scalar_type() == at::kByte &&
                  bytes.is_contiguous() && bytes.size(1) == padded_k(K),
              "the int8 weight must come from pack_int8_weight for ", K, " inputs");
  const int64_t groups = scales.dim() == 2 ? scales.size(1) : 1;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  (scales.dim() == 1 || scales.dim() == 2) && scales.size(0) == bytes.size(0) &&
                  groups > 0 && bytes.size(1) % (16 * groups) == 0,
              "scales must be contiguous float32 [N] or [N, groups] from pack_int8_weight");
  Weight w{kInt8Channel, bytes.data_ptr<uint8_t>(), bytes.size(1), bytes.size(0), K,
           scales.data_ptr<float>()};
  w.scale_groups = groups;
  linear(out, x, w, bias, quantize_activations, activation_bits);
}

namespace {

// Row r of hidden [M, K] times row t of table [V, K], each product in fp32 (exact for bf16
// inputs) summed in fp64: product k into lane k % 16, the 16 lanes then summed in order.
// The AVX-512 and scalar forms give the same value.
template <typename H, typename W>
float exact_dot(const H* h, const W* w, int64_t K) {
  alignas(64) double lanes[16] = {0.0};
#if defined(__AVX512F__)
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  const auto load = [](const auto* p, int64_t n) {
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, float>) {
      return n >= 16 ? _mm512_loadu_ps(p)
                     : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
    } else {
      const __m256i bits =
          n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                  : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
  };
  for (int64_t k = 0; k < K; k += 16) {
    const int64_t n = std::min<int64_t>(16, K - k);
    const __m512 p = _mm512_mul_ps(load(h + k, n), load(w + k, n));
    acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
    acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(
                                   _mm512_extractf64x4_pd(_mm512_castps_pd(p), 1))));
  }
  _mm512_store_pd(lanes, acc0);
  _mm512_store_pd(lanes + 8, acc1);
#else
  for (int64_t k = 0; k < K; ++k) {
    lanes[k % 16] += static_cast<double>(vec::load1(h, k) * vec::load1(w, k));
  }
#endif
  double sum = 0.0;
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return static_cast<float>(sum);
}

// Row of logits [V]: its largest value (NaN-free rows; a NaN lane is skipped).
float row_max(const float* x, int64_t V) {
  float top = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(top);
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + v));
  top = _mm512_reduce_max_ps(m);
  for (; v < V; ++v) top = std::max(top, x[v]);
#else
  for (int64_t v = 0; v < V; ++v) top = std::max(top, x[v]);
#endif
  return top;
}

template <typename H, typename W>
void rescore_rows(float* logits, int64_t ldl, const H* hidden, int64_t ldh, const W* table,
                  int64_t M, int64_t V, int64_t K, float margin) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* row = logits + m * ldl;
      const H* h = hidden + m * ldh;
      const float floor = row_max(row, V) - margin;
      int64_t v = 0;
#if defined(__AVX512F__)
      const __m512 vfloor = _mm512_set1_ps(floor);
      for (; v + 16 <= V; v += 16) {
        uint32_t near = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), vfloor, _CMP_GE_OQ);
        while (near != 0) {
          const int64_t t = v + __builtin_ctz(near);
          near &= near - 1;
          row[t] = exact_dot(h, table + t * K, K);
        }
      }
#endif
      for (; v < V; ++v) {
        if (row[v] >= floor) row[v] = exact_dot(h, table + v * K, K);
      }
    }
  });
}

}  // namespace

// logits [M, V] fp32 (an int8 head's, on hidden [M, K]) rescored in place: those within
// `margin` of their row's largest become hidden's row times table's row [V, K] (fp32 or
// bf16), exact_dot's value. Each logit a function of its row and token alone: a row's logits
// are the same alone as in any batch.
void int8_rescore_logits(at::Tensor logits, const at::Tensor& hidden, const at::Tensor& table,
                         double margin) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be 2-D fp32 CPU with a contiguous last dim");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == logits.size(0) && hidden.stride(1) == 1 &&
                  (hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16),
              "hidden must be fp32/bf16 [M, K] with a contiguous last dim");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == logits.size(1) &&
                  table.size(1) == hidden.size(1) && table.is_contiguous() &&
                  (table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16),
              "table must be contiguous fp32/bf16 [V, K]");
  const int64_t M = logits.size(0), V = logits.size(1), K = hidden.size(1);
  if (M == 0 || V == 0) return;
  float* lp = logits.data_ptr<float>();
  const float mg = static_cast<float>(margin);
  const auto with_table = [&](const auto* hp) {
    if (table.scalar_type() == at::kFloat) {
      rescore_rows(lp, logits.stride(0), hp, hidden.stride(0), table.data_ptr<float>(), M, V, K,
                   mg);
    } else {
      rescore_rows(lp, logits.stride(0), hp, hidden.stride(0),
                   reinterpret_cast<const vec::bf16_t*>(table.data_ptr()), M, V, K, mg);
    }
  };
  if (hidden.scalar_type() == at::kFloat) with_table(hidden.data_ptr<float>());
  else with_table(reinterpret_cast<const vec::bf16_t*>(hidden.data_ptr()));
}

}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("pack_int8_weight(Tensor weight, int group_size=0) -> (Tensor, Tensor)");
  m.def("pack_int8_panels(Tensor weight, int group_size=64) -> (Tensor, Tensor)");
  m.def(
      "int8_linear(Tensor(a!) out, Tensor x, Tensor bytes, Tensor scales, Tensor bias, "
      "bool quantize_activations=True, int activation_bits=0) -> ()");
  m.def("int8_rescore_logits(Tensor(a!) logits, Tensor hidden, Tensor table, float margin) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_int8_weight", &pagedllm::quant::pack_int8_weight);
  m.impl("pack_int8_panels", &pagedllm::quant::pack_int8_panels);
  m.impl("int8_linear", &pagedllm::quant::int8_linear);
  m.impl("int8_rescore_logits", &pagedllm::quant::int8_rescore_logits);
}
