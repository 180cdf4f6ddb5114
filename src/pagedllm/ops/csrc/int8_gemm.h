// The W8A8 int8 GEMM (int8_gemm.cpp): int8 weights pre-packed into panels of kInt8PanelCols
// output columns, times activations quantized per row to int8 in blocks of the weight's group
// size, with integer dot products summed over whole groups.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pagedllm::quant {

// Output columns per packed panel (two 16-lane vectors).
constexpr int64_t kInt8PanelCols = 32;

// Reorders pack_int8_weight's rows (bytes [N, Kp] uint8 = q + 128, scales fp32 [N, groups])
// into the GEMM's layout: bytes [N, Kp] whose panel p (columns 32p .. 32p + w - 1, w = 32 but
// for the last) is w * Kp bytes at p * 32 * Kp holding, for each 4 inputs k4, the w columns'
// 4 bytes (column-major quads: panel[(k4 * w + j) * 4 + e] = q[32p + j, 4 k4 + e] + 128),
// and scales [panels, groups, 32] (zero past N).
std::tuple<at::Tensor, at::Tensor> int8_panels_from_rows(const at::Tensor& bytes,
                                                         const at::Tensor& scales);

// out[M, N] (fp32/bf16, row stride free) = x[M, K] (fp32/bf16) @ W.T + bias (fp32 [N] or
// null) for a weight from int8_panels_from_rows. Scales [panels, groups, 2, 32] (255 * ws, ws
// of int8_panels_from_rows' [panels, groups, 32]) take the activations in 16 bits, q = 255 *
// high + low, each plane int8 (two integer dot products per group, as quant_dot.cpp's).
// Bytes [N, 2 Kp] (panels of the rows [g's q, g's residual's q, ...] for each group g) with
// scales [panels, groups, 2, 32] (each plane's) are 16-bit weights: w = s1 q1 + s2 q2. With quantize_activations false (a test
// hook), x is multiplied in fp64 by the dequantized weight instead.
void int8_panel_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& bytes,
                       const at::Tensor& scales, const float* bias, bool quantize_activations);

}  // namespace pagedllm::quant
