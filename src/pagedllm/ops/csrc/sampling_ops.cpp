// The sampler's per-row reductions over the vocabulary in one op: argmax and logsumexp.
//
// Every step needs, for each row, the greedy token (argmax) and, where the request needs it
// (logprobs, best_of), the chosen token's logprob (logit - logsumexp). Eager torch computes
// logsumexp as max, subtract, exp, sum, log with a [rows, vocab] temporary for each, which
// cost about a tenth of a batch-64 decode step here; this reads each row twice (max, then sum
// of exp), the second time from cache, and skips the exps when the caller needs no logsumexp.
//
// Semantics follow torch: argmax is the first index of the maximum, a NaN counts as the
// maximum (its first index wins) and makes the row's logsumexp NaN; an all -inf row has
// logsumexp -inf, a row with +inf has +inf.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "vec.h"

namespace pagedllm {
namespace {

using vec::kLanes;
using vec::vfloat;

// Rows per OpenMP task: a row is a whole vocabulary (tens of thousands of values).
constexpr int64_t kGrain = 1;

// lse: null to skip the logsumexp (its pass of exps).
void row_argmax_logsumexp(const float* x, int64_t n, int64_t* argmax, float* lse) {
  // Pass 1: the maximum with the first index holding it (per lane, then across lanes: a
  // scalar search for the maximum's first index took half a vocabulary per row on average),
  // and whether any NaN is present (x != x).
  vfloat vm = vec::splat(-vec::kInf);
  vec::vint at = {}, index = {}, nan_lanes = {};
  for (int l = 0; l < kLanes; ++l) index[l] = l;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes, index += kLanes) {
    const vfloat v = vec::load(x + i);
    const vec::vint greater = v > vm;  // strictly: a lane keeps its first maximum
    vm = greater ? v : vm;
    at = greater ? index : at;
    nan_lanes |= v != v;
  }
  bool has_nan = false;
  for (int l = 0; l < kLanes; ++l) has_nan |= nan_lanes[l] != 0;
  float m = vec::hmax(vm);
  // The first index of m among the lanes holding it (some lane does; all, with index 0,
  // when every value so far is -inf).
  int64_t first = n;
  for (int l = 0; l < kLanes; ++l) {
    if (vm[l] == m) first = std::min<int64_t>(first, at[l]);
  }
  for (; i < n; ++i) {
    has_nan |= x[i] != x[i];
    if (x[i] > m) m = x[i], first = i;
  }
  if (has_nan) {
    first = 0;
    while (x[first] == x[first]) ++first;
    *argmax = first;
    if (lse) *lse = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *argmax = first;
  if (!lse) return;
  if (m == -vec::kInf || m == vec::kInf) {  // all masked, or an infinite logit dominates
    *lse = m;
    return;
  }
  // Pass 2: sum of exp(x - max), from cache.
  const vfloat vmx = vec::splat(m);
  vfloat acc = {};
  i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += vec::vexp(vec::load(x + i) - vmx);
  float s = vec::hsum(acc);
  for (; i < n; ++i) s += std::exp(x[i] - m);
  *lse = m + std::log(s);
}

// logits: [rows, vocab] float32 with a contiguous last dim -> (argmax int64 [rows],
// logsumexp float32 [rows], or [0] without with_logsumexp).
std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits,
                                                    bool with_logsumexp) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be a 2-D float32 CPU tensor with a contiguous last dim");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits must have at least one column");
  at::Tensor argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor lse = at::empty({with_logsumexp ? rows : 0}, logits.options());
  const float* x = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  int64_t* am = argmax.data_ptr<int64_t>();
  float* ls = with_logsumexp ? lse.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_argmax_logsumexp(x + r * stride, vocab, am + r, ls ? ls + r : nullptr);
    }
  });
  return {argmax, lse};
}

}  // namespace
}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def("argmax_logsumexp(Tensor logits, bool with_logsumexp=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("argmax_logsumexp", &pagedllm::argmax_logsumexp);
}
