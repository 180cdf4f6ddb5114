// Sharing out a GEMM's items (panels, or row blocks x panels) among OpenMP threads so that
// each thread reads its weights in memory order.
#pragma once

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace pagedllm {

// Runs fn(state, item) for items 0 .. n - 1 on num_threads threads (state: what make_state()
// returned to that thread, once per thread), each starting on its own contiguous share and
// walking it in order; a thread done with its share takes items from the end of the share with
// the most left. Items are a GEMM's panels, which lie one after another in memory: each thread
// streams its weights in order (the hardware prefetchers follow), and a thread held up by
// another process only loses the items it has not reached.
//
// NOTE: same-process A/B on a 2-core Zen 4 (SmolLM2's 120 projections, 30 layers' weights
// streamed from memory) against OpenMP's dynamic one-item deal: 1-4 rows 12-14% faster (24.9
// -> 28.6 GB/s of weights), 16 rows 8%, 64 rows 3-10%, 2048 rows (several row blocks, the
// items block-major) 6%; against guided scheduling (long runs first, by count), which was as
// fast up to 16 rows, even to 13% faster. With another process taking half of one core: even
// at 4 and 2048 rows, 6-8% faster at 32-64, where guided was 4-13% slower than the dynamic
// deal (a thread held up inside its first, half-sized run). The panel kernels of gemm.cpp
// (same A/B, against dynamic runs of 2-4 panels; outputs bit for bit the same): fp32 weights 1
// row 3-6% faster, 4 rows 33%, 8-16 rows 1-5%, 64 and 2048 rows 4-5%; bf16 weights 3-17%.
template <typename MakeState, typename Fn>
void deal_in_memory_order(int64_t n, int num_threads, const MakeState& make_state, const Fn& fn) {
  // Each share is [begin, end) packed in one word, so that its owner (taking from the front)
  // and a thief (taking from the back) claim items with one compare-exchange each.
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  const auto pack = [](int64_t begin, int64_t end) {
    return static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(end);
  };
  const auto begin_of = [](uint64_t r) { return static_cast<int64_t>(r >> 32); };
  const auto end_of = [](uint64_t r) { return static_cast<int64_t>(r & 0xffffffffu); };
  std::vector<Share> shares(num_threads);
  for (int t = 0; t < num_threads; ++t) {
    shares[t].range.store(pack(n * t / num_threads, n * (t + 1) / num_threads),
                          std::memory_order_relaxed);
  }
  // Claims one item of share s: its first (front) or its last; -1 when the share is empty.
  const auto claim = [&](int s, bool front) -> int64_t {
    uint64_t r = shares[s].range.load(std::memory_order_relaxed);
    while (true) {
      const int64_t begin = begin_of(r), end = end_of(r);
      if (begin >= end) return -1;
      const uint64_t next = front ? pack(begin + 1, end) : pack(begin, end - 1);
      if (shares[s].range.compare_exchange_weak(r, next, std::memory_order_relaxed)) {
        return front ? begin : end - 1;
      }
    }
  };
#pragma omp parallel num_threads(num_threads)
  {
    const int self = omp_get_thread_num();
    auto state = make_state();
    for (int64_t item; (item = claim(self, true)) >= 0;) fn(state, item);
    while (true) {  // steal from the share with the most items left
      int victim = -1;
      int64_t most = 0;
      for (int s = 0; s < num_threads; ++s) {
        const uint64_t r = shares[s].range.load(std::memory_order_relaxed);
        const int64_t left = end_of(r) - begin_of(r);
        if (left > most) most = left, victim = s;
      }
      if (victim < 0) break;
      const int64_t item = claim(victim, false);
      if (item >= 0) fn(state, item);
    }
  }
}

// The same without per-thread state: fn(item).
template <typename Fn>
void deal_in_memory_order(int64_t n, int num_threads, const Fn& fn) {
  deal_in_memory_order(n, num_threads, [] { return 0; }, [&](int, int64_t item) { fn(item); });
}

}  // namespace pagedllm
