// Collectives over shared memory for tensor parallelism on one host: the all-reduce the
// decoder stack calls between the parts of each layer, the all-gather, and the LM head's
// gather of logit columns to rank 0.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <cstring>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace pagedllm {

// ---- Collectives over shared memory (tensor parallelism on one host) -----------------------
//
// The ranks of a tensor-parallel group map one shared buffer (pagedllm/distributed/
// shm_comm.py): a header with one flag per rank (each on its own cache line), then two slots
// of `world_size` areas of `area_bytes` each. A collective call is generation g (each rank
// counts its calls in `generation`, so the ranks agree): each rank copies its part into area
// [g % 2][rank], publishes g in its flag (release), and waits until every flag reads >= g
// (acquire); then each reads every area. Two slots suffice: a rank that writes slot g % 2
// again, at g + 2, has seen every flag reach g + 1, which each rank set only after reading
// slot g % 2 at g. Larger tensors go in chunks of `area_bytes`, one generation each.
// All-reduce sums the areas in rank order in fp32, so every rank gets the same bits, and a
// row's sums never depend on the other rows (batch invariance).

namespace {

constexpr int64_t kFlagStride = 64;  // bytes: one cache line per rank's flag
constexpr int64_t kSpinPauses = 2048;  // ~25-55 us of PAUSE on Zen 4 before yielding

// PAGEDLLM_SHM_SPIN_US: microseconds a waiting rank spins (PAUSE only, its core kept) before
// it starts yielding; unset, kSpinPauses pauses. Read once per process. A yield hands the
// core to anything runnable there, and every layer's two all-reduces wait for the rank that
// comes back last: on a host where each rank has its own core, a longer spin may be worth
// its CPU time (A/B with benchmarks/tp_profile.py).
int64_t spin_limit_ns() {
  static const int64_t ns = [] {
    const char* text = std::getenv("PAGEDLLM_SHM_SPIN_US");
    if (text == nullptr || *text == '\0') return int64_t{-1};
    return static_cast<int64_t>(std::max(0.0, std::atof(text)) * 1000.0);
  }();
  return ns;
}

struct ShmGroup {
  char* base;
  int64_t rank, world_size, area_bytes, header_bytes;
  int64_t* generation;

  ShmGroup(const at::Tensor& buffer, int64_t rank_, int64_t world_size_,
           const at::Tensor& generation_)
      : base(static_cast<char*>(buffer.data_ptr())), rank(rank_), world_size(world_size_),
        generation(generation_.data_ptr<int64_t>()) {
    TORCH_CHECK(buffer.is_contiguous() && buffer.scalar_type() == at::kByte,
                "the shared buffer must be a contiguous uint8 tensor");
    TORCH_CHECK(generation_.scalar_type() == at::kLong && generation_.numel() == 1,
                "generation must be an int64 [1] tensor");
    TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "rank ", rank,
                " out of a group of ", world_size);
    header_bytes = ((world_size * kFlagStride + 4095) / 4096) * 4096;
    area_bytes = ((buffer.numel() - header_bytes) / (2 * world_size)) / 64 * 64;
    TORCH_CHECK(area_bytes >= 64, "the shared buffer is too small for ", world_size, " ranks");
  }

  std::atomic<int64_t>* flag(int64_t r) const {
    return reinterpret_cast<std::atomic<int64_t>*>(base + r * kFlagStride);
  }
  char* area(int64_t gen, int64_t r) const {
    return base + header_bytes + ((gen & 1) * world_size + r) * area_bytes;
  }

  // Publishes `bytes` of `src` as this rank's part of a new generation and waits for every
  // rank's; returns the generation.
  int64_t exchange(const char* src, int64_t bytes) const {
    const int64_t gen = publish(src, bytes);
    wait_all(gen);
    return gen;
  }

  // The two halves of exchange(): publish this rank's part (bytes may be 0: nothing to
  // hand over), then wait until every rank has published the same generation.
  int64_t publish(const char* src, int64_t bytes) const {
    const int64_t gen = ++*generation;
    if (bytes > 0) std::memcpy(area(gen, rank), src, bytes);
    flag(rank)->store(gen, std::memory_order_release);
    return gen;
  }

  void wait_all(int64_t gen) const {
    const int64_t spin_ns = spin_limit_ns();
    for (int64_t r = 0; r < world_size; ++r) {
      int64_t spins = 0;
      std::chrono::steady_clock::time_point yielding_since;
      if (spin_ns >= 0 && flag(r)->load(std::memory_order_acquire) < gen) {
        // The set spin: PAUSE until the flag or the limit, the clock read every 64 pauses.
        const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns);
        while (flag(r)->load(std::memory_order_acquire) < gen) {
          if ((++spins & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
          _mm_pause();
        }
        spins = kSpinPauses;  // then yield and nap as below
      }
      while (flag(r)->load(std::memory_order_acquire) < gen) {
        // Spin ~50 us (the other rank is usually that close: each has its own core). Then
        // yield for up to 5 ms: the core goes to anything else runnable on it (the driver,
        // a rank sharing the core, another process) and comes back at once otherwise. Only
        // a longer wait (a prefill's imbalance, an overloaded host) naps: a nap costs
        // ~60-90 us of wake-up on a busy host, which a yield does not.
        if (spins < kSpinPauses) {
          ++spins;
          _mm_pause();
          continue;
        }
        const auto now = std::chrono::steady_clock::now();
        if (spins++ == kSpinPauses) yielding_since = now;
        if (now - yielding_since < std::chrono::milliseconds(5)) {
          sched_yield();
        } else {
          usleep(20);
        }
      }
    }
  }
};

template <typename T>
void sum_areas(const ShmGroup& g, int64_t gen, T* out, int64_t count) {
  // Vectors of kLanes, then the tail one by one: the same fp32 sums, in rank order, either way.
  at::parallel_for(0, count, 1 << 15, [&](int64_t begin, int64_t end) {
    const T* first = reinterpret_cast<const T*>(g.area(gen, 0));
    int64_t i = begin;
    for (; i + vec::kLanes <= end; i += vec::kLanes) {
      vec::vfloat acc = vec::load(first + i);
      for (int64_t r = 1; r < g.world_size; ++r) {
        acc += vec::load(reinterpret_cast<const T*>(g.area(gen, r)) + i);
      }
      vec::store(out + i, acc);
    }
    for (; i < end; ++i) {
      float acc = vec::load1(first, i);
      for (int64_t r = 1; r < g.world_size; ++r) {
        acc += vec::load1(reinterpret_cast<const T*>(g.area(gen, r)), i);
      }
      vec::store1(out, i, acc);
    }
  });
}

}  // namespace

// x (fp32 or bf16, contiguous) <- the sum of every rank's x, in place.
void shm_all_reduce(at::Tensor x, const at::Tensor& buffer, int64_t rank, int64_t world_size,
                    at::Tensor generation) {
  if (world_size == 1) return;
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat ||
                                    x.scalar_type() == at::kBFloat16),
              "shm_all_reduce takes a contiguous float32 or bfloat16 tensor");
  const ShmGroup g(buffer, rank, world_size, generation);
  const int64_t elem = x.element_size();
  const int64_t per_chunk = g.area_bytes / elem;
  char* data = static_cast<char*>(x.data_ptr());
  for (int64_t start = 0; start < x.numel(); start += per_chunk) {
    const int64_t count = std::min(per_chunk, x.numel() - start);
    const int64_t gen = g.exchange(data + start * elem, count * elem);
    if (x.scalar_type() == at::kFloat) {
      sum_areas(g, gen, reinterpret_cast<float*>(data) + start, count);
    } else {
      sum_areas(g, gen, reinterpret_cast<vec::bf16_t*>(data) + start, count);
    }
  }
}

// Every rank's x (any dtype, contiguous), stacked: [world_size, *x.shape], on every rank.
at::Tensor shm_all_gather(const at::Tensor& x, const at::Tensor& buffer, int64_t rank,
                          int64_t world_size, at::Tensor generation) {
  TORCH_CHECK(x.is_contiguous(), "shm_all_gather takes a contiguous tensor");
  std::vector<int64_t> shape{world_size};
  for (int64_t d : x.sizes()) shape.push_back(d);
  at::Tensor out = at::empty(shape, x.options());
  const int64_t bytes = x.numel() * x.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  if (world_size == 1) {
    std::memcpy(dst, x.data_ptr(), bytes);
    return out;
  }
  const ShmGroup g(buffer, rank, world_size, generation);
  const char* src = static_cast<const char*>(x.data_ptr());
  for (int64_t start = 0; start < bytes; start += g.area_bytes) {
    const int64_t count = std::min(g.area_bytes, bytes - start);
    const int64_t gen = g.exchange(src + start, count);
    for (int64_t r = 0; r < world_size; ++r) {
      std::memcpy(dst + r * bytes + start, g.area(gen, r), count);
    }
  }
  return out;
}

// Rank dst's out [rows, world_size * cols] <- every rank's x [rows, cols] side by side in rank
// order (the LM head's logit columns); the other ranks hand theirs over and pass no out. Each
// row is copied once, straight to its place: no stacked copy, nothing copied on the others.
void shm_gather_columns(const at::Tensor& x, const std::optional<at::Tensor>& out, int64_t dst,
                        const at::Tensor& buffer, int64_t rank, int64_t world_size,
                        at::Tensor generation) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "shm_gather_columns takes a contiguous 2-d x");
  TORCH_CHECK(dst >= 0 && dst < world_size, "dst ", dst, " out of a group of ", world_size);
  const int64_t rows = x.size(0), row_bytes = x.size(1) * x.element_size();
  char* dst_ptr = nullptr;
  if (rank == dst) {
    TORCH_CHECK(out.has_value() && out->is_contiguous() && out->dtype() == x.dtype() &&
                    out->dim() == 2 && out->size(0) == rows &&
                    out->size(1) == world_size * x.size(1),
                "shm_gather_columns: rank dst needs a contiguous out of [rows, world_size * "
                "cols] in x's dtype");
    dst_ptr = static_cast<char*>(out->data_ptr());
  }
  const char* src = static_cast<const char*>(x.data_ptr());
  if (world_size == 1) {
    std::memcpy(dst_ptr, src, rows * row_bytes);
    return;
  }
  const ShmGroup g(buffer, rank, world_size, generation);
  TORCH_CHECK(row_bytes <= g.area_bytes, "a row of ", row_bytes, " bytes does not fit the "
              "shared buffer's areas of ", g.area_bytes);
  const int64_t rows_per_chunk = g.area_bytes / std::max<int64_t>(row_bytes, 1);
  // Rows go to (row, rank) places of out: [rows, world_size, cols] seen row-major.
  auto place = [&](int64_t row, int64_t r) {
    return dst_ptr + (row * world_size + r) * row_bytes;
  };
  for (int64_t start = 0; start < rows; start += rows_per_chunk) {
    const int64_t count = std::min(rows_per_chunk, rows - start);
    if (rank != dst) {
      g.exchange(src + start * row_bytes, count * row_bytes);
      continue;
    }
    // dst hands nothing over: it places its own rows while the others may still arrive.
    const int64_t gen = g.publish(src, 0);
    at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::memcpy(place(start + i, rank), src + (start + i) * row_bytes, row_bytes);
      }
    });
    g.wait_all(gen);
    at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t r = 0; r < world_size; ++r) {
          if (r != rank) {
            std::memcpy(place(start + i, r), g.area(gen, r) + i * row_bytes, row_bytes);
          }
        }
      }
    });
  }
}

}  // namespace pagedllm

TORCH_LIBRARY_FRAGMENT(pagedllm_cpu, m) {
  m.def(
      "shm_all_reduce(Tensor(a!) x, Tensor buffer, int rank, int world_size, "
      "Tensor(b!) generation) -> ()");
  m.def(
      "shm_all_gather(Tensor x, Tensor buffer, int rank, int world_size, "
      "Tensor(b!) generation) -> Tensor");
  m.def(
      "shm_gather_columns(Tensor x, Tensor(a!)? out, int dst, Tensor buffer, int rank, "
      "int world_size, Tensor(b!) generation) -> ()");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("shm_all_reduce", &pagedllm::shm_all_reduce);
  m.impl("shm_all_gather", &pagedllm::shm_all_gather);
  m.impl("shm_gather_columns", &pagedllm::shm_gather_columns);
}
