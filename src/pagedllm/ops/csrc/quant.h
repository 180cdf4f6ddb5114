// Quantized linear layers: weights in GGUF block formats or symmetric per-channel int8, times
// activations quantized per row on the fly to int8 blocks of 32 (as llama.cpp's Q8_0).
//
// Every weight format is read through one "unpacked" form of a weight row: values u[i] in
// 0..255 with, per half-block of 16 values h, a scale ws[h] and a minimum wm[h] such that
//   w[i] = ws[h] * (u[i] + zero) + wm[h]
// (zero a per-format integer: -8 for Q4_0, -128 for Q8_0 and int8, -32 for Q6_K, 0 for the
// formats with a minimum). The integer dot products run on u and the int8 activations, so one
// kernel serves every format.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pagedllm::quant {

// GGML's type ids for the GGUF formats; kInt8Channel is ours (int8 + 128 as bytes, a float
// scale per row).
enum Format : int64_t {
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kInt8Channel = 1000,
};

// A GGUF weight repacked by gguf_pack_panels (quant_panels.cpp) into panels of 16 rows for
// the panel kernels: the format id is kPanelFormat + its GGML type (Q4_0, Q4_1, Q8_0, Q4_K,
// Q5_K, Q6_K), the bytes as many as the file's (same tensor shape).
constexpr int64_t kPanelFormat = 2000;
inline bool is_panel_format(int64_t format) {
  const int64_t base = format - kPanelFormat;
  return base == kQ4_0 || base == kQ4_1 || base == kQ8_0 || base == kQ4_K || base == kQ5_K ||
         base == kQ6_K;
}

// A panel superblock's layout (quant_panels.cpp's header): 16 rows' blocks of one superblock
// (one 32-value block; 256 values for the K-quants), `bytes` long. Offsets in bytes from its
// start: the values' low nibbles (or Q8_0's bytes) of 32-value sub-block s at 256 * s (at 0
// for the 32-value formats), the K-quants' high bits at `high`, the scales d at `d`, the
// minimums (Q4_1's m, the K-quants' dmin) at `m`, the K-quants' sub-block scales at `scales`.
template <int64_t kBase>
struct PanelBlock {
  static constexpr bool k_quant = kBase == kQ4_K || kBase == kQ5_K || kBase == kQ6_K;
  static constexpr int64_t sub = k_quant ? 8 : 1;  // 32-value sub-blocks per superblock
  static constexpr int64_t bytes =
      16 * (kBase == kQ8_0   ? 34
            : kBase == kQ4_0 ? 18
            : kBase == kQ4_1 ? 20
            : kBase == kQ4_K ? 144
            : kBase == kQ5_K ? 176
                             : 210);
  static constexpr int64_t high = 2048;  // Q5_K: 512 bytes; Q6_K: 1024
  static constexpr int64_t d = kBase == kQ8_0   ? 512
                               : !k_quant       ? 256
                               : kBase == kQ4_K ? 2048
                               : kBase == kQ5_K ? 2560
                                                : 3328;
  static constexpr int64_t m = d + 32;
  static constexpr int64_t scales = kBase == kQ6_K ? 3072 : m + 32;  // 16 x 12 or 16 x 16
  static constexpr bool has_min = kBase == kQ4_1 || kBase == kQ4_K || kBase == kQ5_K;
  static constexpr int zero = kBase == kQ8_0 ? -128 : kBase == kQ4_0 ? -8 : kBase == kQ6_K ? -32 : 0;
  // Integer sums per 32-value block: Q6_K's scales cover 16 values, so two.
  static constexpr int halves = kBase == kQ6_K ? 2 : 1;
};

struct FormatInfo {
  int64_t block_values;  // values per block (32 or 256)
  int64_t block_bytes;   // bytes per block
  int zero;              // the integer added to u (see above)
  bool has_min;          // wm is not zero
};

// The format's layout (a panel format's: its GGML type's); TORCH_CHECK fails naming the
// supported formats for any other.
FormatInfo format_info(int64_t format);

// K rounded up to whole 64-value chunks (the kernels' unit; padding holds zeros).
inline int64_t padded_k(int64_t K) { return (K + 63) / 64 * 64; }

// A quantized weight [N, K]: row n's bytes at data + n * row_bytes.
struct Weight {
  int64_t format;
  const uint8_t* data;
  int64_t row_bytes;
  int64_t N, K;
  const float* channel_scales;  // kInt8Channel: scale_groups per row
  // kInt8Channel: scales per row, each over padded_k(K) / scale_groups values (1: a scale per
  // output channel).
  int64_t scale_groups = 1;
};

// Row n unpacked: u[0:Kp] (zero past K), ws/wm[0:Kp / 16]. Returns u, which for kInt8Channel
// rows stored padded to Kp is the row itself (nothing copied).
const uint8_t* unpack_row(const Weight& w, int64_t n, uint8_t* u, float* ws, float* wm);

// unpack_row for a panel format (quant_panels.cpp).
void unpack_panel_row(const Weight& w, int64_t n, uint8_t* u, float* ws, float* wm);

// Row n as float values w[0:K] (the format's dequantization, the same fp32 arithmetic as the
// gguf package's).
void dequantize_row(const Weight& w, int64_t n, float* out);

// The activations' precision unless a caller asks for another: 16 bits (see linear).
constexpr int64_t kDefaultActivationBits = 16;
// Values per activation scale unless a caller asks for another: 32, a scale per weight block
// (16: two scales per 32-value block, 8-bit activations on the panel formats only).
constexpr int64_t kDefaultActivationGroup = 32;

// out[M, N] (fp32/bf16) = x[M, K] (fp32/bf16) @ W.T + bias (fp32 [N] or empty), x quantized
// per row in blocks of 32 values with a float scale each: to int8 (activation_bits 8, as
// llama.cpp's Q8_0) or to 16-bit integers (activation_bits 16, multiplied as two int8 planes:
// twice the integer dot products, 256 times finer steps). With quantize_activations false (a
// test hook), the rows are multiplied in fp32 with the dequantized weight instead.
void linear(at::Tensor out, const at::Tensor& x, const Weight& w, const at::Tensor& bias,
            bool quantize_activations, int64_t activation_bits = kDefaultActivationBits);

// The integer path the kernels take now: 0 AVX512-VNNI, 1 AVX2, 2 scalar (set_quant_kernel_isa
// forces one; quant_dot.cpp).
int active_quant_isa();

// linear() with quantized activations for a weight of a panel format (quant_panels.cpp).
// activation_group 16 (8-bit activations only): a scale per 16 inputs, two per 32-value block.
void panel_linear(at::Tensor out, const at::Tensor& x, const Weight& w, const at::Tensor& bias,
                  int64_t activation_bits, int64_t activation_group = kDefaultActivationGroup);

// Activations quantized for the panel kernel (quant_panels.cpp): row m's block b at
// a + (m * nb + b) * 32 * planes (the hi plane's 32 values, then the lo plane's), its scales
// dx[(m * nb + b) * groups + g] (groups 1: one per block; 2: one per 16 values), its terms,
// with H = max(PanelBlock::halves, groups) halves of 32 / H values: for formats with a zero,
// corr[(m * nb + b) * H + h] = zero * S_h (int32, S_h the sum of the half's quantized values);
// for those with a minimum (never two halves of their own), corr[m * nb + b] = the sum over
// the block's groups of dx_g * S_g (float bits: dx * S, or fma(dx_1, S_1, dx_0 * S_0)).
struct PanelActs {
  const int8_t* a;
  const float* dx;
  const int32_t* corr;
  int64_t nb;
};

// A work item's rows m_begin .. m_end - 1 times its panels pan[0 .. num_panels) (1 or 2;
// weight rows n0 ..), in register tiles (quant_panels_gemm.cpp: 4 rows x 2 panels, then 1-3
// rows), stored to out (O: float or bf16, row stride ldo) with bias (or null); the tiles
// prefetch `prefetch_bytes` ahead of their panels' streams (fewer than 4 rows).
using PanelRowsFn = void (*)(const PanelActs& acts, int64_t m_begin, int64_t m_end,
                             const uint8_t* const* pan, int64_t num_panels, int64_t n0,
                             int64_t N, void* out, int64_t ldo, const float* bias,
                             int prefetch_bytes);
// The rows function for a panel format's GGML type, activation planes (1: 8 bits, 2: 16),
// activation scales per 32-value block (groups: 1, or 2 with one plane), integer path
// (active_quant_isa) and output type.
PanelRowsFn panel_rows_fn(int64_t base, int planes, int groups, int isa, bool out_bf16);

// The ops' entry points (also the torch ops of the same names, pagedllm_cpu::gguf_linear and
// int8_linear): out = x @ W.T + bias for a GGUF weight kept as its blocks, uint8 [N, bytes
// per row] of GGML type `format` (quant_gguf.cpp), and for a per-channel int8 weight from
// pack_int8_weight, bytes [N, padded_k(K)] and scales [N] (quant_int8.cpp).
// gguf_linear's activation_bits / activation_group 0: the process's GGUF activations
// (set_gguf_activations; the decoder stack's calls take them too), a group of 16 only on the
// panel formats (32 on the others).
void gguf_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, int64_t format,
                 const at::Tensor& bias, bool quantize_activations = true,
                 int64_t activation_bits = 0, int64_t activation_group = 0);
void int8_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& bytes,
                 const at::Tensor& scales, const at::Tensor& bias,
                 bool quantize_activations = true,
                 int64_t activation_bits = kDefaultActivationBits);

}  // namespace pagedllm::quant
