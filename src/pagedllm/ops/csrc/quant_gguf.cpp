// GGUF's block formats as quant.h's unpacked rows, and the ops on GGUF weights kept as they
// are in the file: a linear layer (gguf_linear) and the rows an embedding looks up
// (gguf_dequantize_rows).
//
// Block layouts (ggml's): Q8_0 {fp16 d; int8 q[32]}; Q4_0 {fp16 d; u8 qs[16]} (value i < 16 the
// low nibble of qs[i], i >= 16 the high nibble of qs[i - 16]); Q4_1 {fp16 d, m; u8 qs[16]};
// Q4_K {fp16 d, dmin; u8 scales[12] (8 six-bit scales and mins); u8 qs[128]} over 256 values,
// Q5_K the same with u8 qh[32] (the fifth bits) before qs; Q6_K {u8 ql[128], qh[64]; int8
// scales[16]; fp16 d} over 256 values, a scale per 16.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "quant.h"
#include "vec.h"

namespace pagedllm::quant {

namespace {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // exact, as the software conversion below
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// u[0:16] = the low nibbles of q[0:16], u[16:32] the high ones.
inline void unpack_nibbles(const uint8_t* q, uint8_t* u) {
#if defined(__SSE2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u), _mm_and_si128(bytes, mask));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u + 16),
                   _mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
#else
  for (int i = 0; i < 16; ++i) {
    u[i] = q[i] & 0xF;
    u[i + 16] = q[i] >> 4;
  }
#endif
}

// Sub-block j's (0..7) six-bit scale and minimum of a Q4_K/Q5_K block's 12 scale bytes.
inline void scale_min_k4(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Each unpacks one block of its format: u[0:values], ws/wm[0:values / 16].
void unpack_q8_0(const uint8_t* b, uint8_t* u, float* ws, float*) {
  const float d = half_at(b);
  for (int i = 0; i < 32; ++i) u[i] = b[2 + i] ^ 0x80;  // q + 128
  ws[0] = ws[1] = d;
}

void unpack_q4_0(const uint8_t* b, uint8_t* u, float* ws, float*) {
  const float d = half_at(b);
  unpack_nibbles(b + 2, u);
  ws[0] = ws[1] = d;
}

void unpack_q4_1(const uint8_t* b, uint8_t* u, float* ws, float* wm) {
  const float d = half_at(b), m = half_at(b + 2);
  unpack_nibbles(b + 4, u);
  ws[0] = ws[1] = d;
  wm[0] = wm[1] = m;
}

// Q4_K (qh null) and Q5_K.
void unpack_k(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, uint8_t* u, float* ws,
              float* wm) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* scales = b + 4;
  for (int j = 0; j < 8; ++j) {  // sub-block j: values 32j .. 32j + 31
    int sc, m;
    scale_min_k4(scales, j, &sc, &m);
    ws[2 * j] = ws[2 * j + 1] = d * static_cast<float>(sc);
    wm[2 * j] = wm[2 * j + 1] = -(dmin * static_cast<float>(m));
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    uint8_t* out = u + 32 * j;
    for (int l = 0; l < 32; ++l) out[l] = (q[l] >> shift) & 0xF;
    if (qh) {
      for (int l = 0; l < 32; ++l) out[l] |= ((qh[l] >> j) & 1) << 4;
    }
  }
}

void unpack_q4_k(const uint8_t* b, uint8_t* u, float* ws, float* wm) {
  unpack_k(b, nullptr, b + 16, u, ws, wm);
}

void unpack_q5_k(const uint8_t* b, uint8_t* u, float* ws, float* wm) {
  unpack_k(b, b + 16, b + 48, u, ws, wm);
}

void unpack_q6_k(const uint8_t* b, uint8_t* u, float* ws, float*) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int h = 0; h < 2; ++h) {  // halves of 128 values
    for (int j = 0; j < 128; ++j) {
      const int lo = j < 64 ? ql[64 * h + j] & 0xF : ql[64 * h + j - 64] >> 4;
      const int hi = (qh[32 * h + j % 32] >> (2 * (j / 32))) & 3;
      u[128 * h + j] = static_cast<uint8_t>(lo | hi << 4);
    }
  }
  for (int s = 0; s < 16; ++s) ws[s] = d * static_cast<float>(scales[s]);
}

// A row's blocks unpacked by one format's function, inlined into the loop (a call per block
// through a pointer cost about as much as the unpacking).
template <void (*kUnpack)(const uint8_t*, uint8_t*, float*, float*)>
void unpack_blocks(const uint8_t* row, int64_t num_blocks, int64_t values, int64_t bytes,
                   uint8_t* u, float* ws, float* wm) {
  const int64_t halves = values / 16;
  for (int64_t b = 0; b < num_blocks; ++b) {
    kUnpack(row + b * bytes, u + b * values, ws + b * halves, wm + b * halves);
  }
}

void unpack_row_blocks(int64_t format, const uint8_t* row, int64_t num_blocks, int64_t values,
                       int64_t bytes, uint8_t* u, float* ws, float* wm) {
  switch (format) {
    case kQ8_0: return unpack_blocks<unpack_q8_0>(row, num_blocks, values, bytes, u, ws, wm);
    case kQ4_0: return unpack_blocks<unpack_q4_0>(row, num_blocks, values, bytes, u, ws, wm);
    case kQ4_1: return unpack_blocks<unpack_q4_1>(row, num_blocks, values, bytes, u, ws, wm);
    case kQ4_K: return unpack_blocks<unpack_q4_k>(row, num_blocks, values, bytes, u, ws, wm);
    case kQ5_K: return unpack_blocks<unpack_q5_k>(row, num_blocks, values, bytes, u, ws, wm);
    case kQ6_K: return unpack_blocks<unpack_q6_k>(row, num_blocks, values, bytes, u, ws, wm);
    default: TORCH_CHECK(false, "no unpacking for format ", format);
  }
}

}  // namespace

FormatInfo format_info(int64_t format) {
  if (is_panel_format(format)) return format_info(format - kPanelFormat);
  switch (format) {
    case kQ8_0: return {32, 34, -128, false};
    case kQ4_0: return {32, 18, -8, false};
    case kQ4_1: return {32, 20, 0, true};
    case kQ4_K: return {256, 144, 0, true};
    case kQ5_K: return {256, 176, 0, true};
    case kQ6_K: return {256, 210, -32, false};
    case kInt8Channel: return {1, 1, -128, false};
    default:
      TORCH_CHECK(false, "unsupported quantized format ", format,
                  " (supported GGML types: Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, "
                  "Q6_K = 14)");
  }
}

const uint8_t* unpack_row(const Weight& w, int64_t n, uint8_t* u, float* ws, float* wm) {
  const int64_t Kp = padded_k(w.K);
  const uint8_t* row = w.data + n * w.row_bytes;
  if (w.format == kInt8Channel) {
    const float* s = w.channel_scales + n * w.scale_groups;
    const int64_t halves_per_group = Kp / 16 / w.scale_groups;
    for (int64_t h = 0; h < Kp / 16; ++h) ws[h] = h * 16 < w.K ? s[h / halves_per_group] : 0.0f;
    if (w.row_bytes == Kp) return row;
    std::memcpy(u, row, w.K);
    std::memset(u + w.K, 0x80, Kp - w.K);
    return u;
  }
  const FormatInfo info = format_info(w.format);
  if (is_panel_format(w.format)) {
    unpack_panel_row(w, n, u, ws, wm);
  } else {
    unpack_row_blocks(w.format, row, w.K / info.block_values, info.block_values,
                      info.block_bytes, u, ws, wm);
  }
  std::memset(u + w.K, 0, Kp - w.K);
  for (int64_t h = w.K / 16; h < Kp / 16; ++h) ws[h] = wm[h] = 0.0f;
  if (!info.has_min) {
    for (int64_t h = 0; h < w.K / 16; ++h) wm[h] = 0.0f;
  }
  return u;
}

// NOTE: products and sums apart, not contracted into FMAs, so that a value has the bits the
// gguf package's numpy dequantization gives it (d * q + m in fp32).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void dequantize_row(const Weight& w, int64_t n, float* out) {
  const int64_t Kp = padded_k(w.K);
  std::vector<uint8_t> u(Kp);
  std::vector<float> ws(Kp / 16), wm(Kp / 16);
  const uint8_t* v = unpack_row(w, n, u.data(), ws.data(), wm.data());
  const int zero = format_info(w.format).zero;
  const bool has_min = format_info(w.format).has_min;
  for (int64_t i = 0; i < w.K; ++i) {
    const float p = ws[i / 16] * static_cast<float>(static_cast<int>(v[i]) + zero);
    out[i] = has_min ? p + wm[i / 16] : p;
  }
}
#pragma GCC pop_options

namespace {

// The weight tensor [N, row_bytes] (uint8) of `format` for an input width K, checked.
Weight gguf_weight(const at::Tensor& weight, int64_t format, int64_t K) {
  const FormatInfo info = format_info(format);
  TORCH_CHECK(format != kInt8Channel, "gguf ops take GGUF formats; int8 has int8_linear");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kByte && weight.stride(1) == 1,
              "weight must be a 2-D uint8 CPU tensor of GGUF blocks with a contiguous last dim");
  TORCH_CHECK(K % info.block_values == 0, "the input dimension ", K,
              " is not a multiple of this format's block of ", info.block_values, " values");
  TORCH_CHECK(weight.size(1) == K / info.block_values * info.block_bytes, "a weight row has ",
              weight.size(1), " bytes; ", K, " inputs in this format take ",
              K / info.block_values * info.block_bytes);
  return {format, weight.data_ptr<uint8_t>(), weight.stride(0), weight.size(0), K, nullptr};
}


// out[r] = row ids[r] of the weight, dequantized (out fp32/bf16 [R, K], contiguous rows).
void gguf_dequantize_rows(at::Tensor out, const at::Tensor& weight, int64_t format,
                          const at::Tensor& ids) {
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be 2-D fp32/bf16 with a contiguous last dim");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.size(0) == out.size(0),
              "ids must be int64 [R] with R = out's rows");
  const Weight w = gguf_weight(weight, format, out.size(1));
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t r = 0; r < idc.size(0); ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < w.N, "row id ", id[r], " is out of range [0, ", w.N, ")");
  }
  const int64_t K = w.K;
  at::parallel_for(0, idc.size(0), 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row(w, id[r], row.data());
      if (out.scalar_type() == at::kFloat) {
        std::memcpy(out.data_ptr<float>() + r * out.stride(0), row.data(), K * sizeof(float));
      } else {
        auto* dst = reinterpret_cast<vec::bf16_t*>(out.data_ptr()) + r * out.stride(0);
        for (int64_t k = 0; k < K; ++k) dst[k] = vec::float_to_bf16(row[k]);
      }
    }
  });
}

}  // namespace

namespace {

// The GGUF kernels' activations where a call passes 0 (bits, values per scale): 16-bit per
// 32 until set_gguf_activations (GGUFConfig, from PAGEDLLM_GGUF_ACTIVATIONS or its default).
struct GgufActivations {
  int32_t bits, group;
};
std::atomic<GgufActivations> g_activations{GgufActivations{16, 32}};

}  // namespace

void set_gguf_activations(int64_t bits, int64_t group) {
  TORCH_CHECK((bits == 8 || bits == 16) && (group == 32 || (group == 16 && bits == 8)),
              "GGUF activations are 8 or 16 bits per 32 inputs, or 8 bits per 16; got ", bits,
              " bits per ", group);
  g_activations.store({static_cast<int32_t>(bits), static_cast<int32_t>(group)});
}

std::vector<int64_t> gguf_activations() {
  const GgufActivations set = g_activations.load();
  return {set.bits, set.group};
}

void gguf_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, int64_t format,
                 const at::Tensor& bias, bool quantize_activations, int64_t activation_bits,
                 int64_t activation_group) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  const Weight w = gguf_weight(weight, format, x.size(1));
  const GgufActivations set = g_activations.load(std::memory_order_relaxed);
  if (activation_bits == 0) activation_bits = set.bits;
  if (activation_group == 0) activation_group = is_panel_format(format) ? set.group : 32;
  if (is_panel_format(format) && quantize_activations) {
    panel_linear(out, x, w, bias, activation_bits, activation_group);
  } else {
    TORCH_CHECK(activation_group == 32 || !quantize_activations,
                "activation_group 16 needs a weight repacked into panels (gguf_pack_panels_)");
    linear(out, x, w, bias, quantize_activations, activation_bits);
  }
}

}  // namespace pagedllm::quant

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def(
      "gguf_linear(Tensor(a!) out, Tensor x, Tensor weight, int format, Tensor bias, "
      "bool quantize_activations=True, int activation_bits=0, int activation_group=0) -> ()");
  m.def("set_gguf_activations(int bits, int group) -> ()", &pagedllm::quant::set_gguf_activations);
  m.def("gguf_activations() -> int[]", &pagedllm::quant::gguf_activations);
  m.def("gguf_dequantize_rows(Tensor(a!) out, Tensor weight, int format, Tensor ids) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("gguf_linear", &pagedllm::quant::gguf_linear);
  m.impl("gguf_dequantize_rows", &pagedllm::quant::gguf_dequantize_rows);
}
