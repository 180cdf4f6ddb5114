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

#include "int8_gemm.h"
#include "quant.h"

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

}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("pack_int8_weight(Tensor weight, int group_size=0) -> (Tensor, Tensor)");
  m.def("pack_int8_panels(Tensor weight, int group_size=64) -> (Tensor, Tensor)");
  m.def(
      "int8_linear(Tensor(a!) out, Tensor x, Tensor bytes, Tensor scales, Tensor bias, "
      "bool quantize_activations=True, int activation_bits=0) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("pack_int8_weight", &pagedllm::quant::pack_int8_weight);
  m.impl("pack_int8_panels", &pagedllm::quant::pack_int8_panels);
  m.impl("int8_linear", &pagedllm::quant::int8_linear);
}
