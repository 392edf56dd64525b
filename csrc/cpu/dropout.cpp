// Dropout by counter-based random numbers (the training step's dropout on the CPU).
//
// Element i of a call keeps its value, scaled by 1 / (1 - p), when the 32-bit hash of (seed, i) is at
// least round(p * 2^32); otherwise it becomes 0. Nothing is stored between the forward and the
// backward: the backward calls the same function on the gradient with the same seed and offsets.
// torch's CPU dropout draws one mt19937 number per element and keeps a mask; here a draw is a few
// integer multiplies that the compiler vectorises, and the hash is the one of csrc/common/rng.h (key and
// stream in cpu/dropout_hash.h, shared with the training attention's passes).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/rng.h"
#include "cpu/dropout_hash.h"
#include "cpu/kernels.h"

namespace mage_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 4096;  // elements per work item

}  // namespace

uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  const uint32_t row = mix32(dropout_key(seed) + static_cast<uint32_t>(index >> 32));
  return mix32(row + static_cast<uint32_t>(index)) >= threshold;
}

template <typename Load, typename Store>
static void dropout_loop(int64_t n, double p, uint64_t seed, uint64_t offset, int num_threads, Load load,
                         Store store) {
  const uint32_t threshold = dropout_threshold(p);
  const float scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
  const uint32_t key = dropout_key(seed);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    int64_t i = lo;
    while (i < hi) {  // runs within one 2^32 stretch of the index share the row hash
      const uint64_t g = offset + static_cast<uint64_t>(i);
      const uint32_t row = mix32(key + static_cast<uint32_t>(g >> 32));
      const int64_t end = std::min<int64_t>(hi, i + static_cast<int64_t>(0x100000000ull - (g & 0xFFFFFFFFull)));
      const uint32_t base = static_cast<uint32_t>(g);
      for (int64_t j = i; j < end; ++j) {  // branch-free, so it vectorises; x * 0 as torch's dropout
        const uint32_t h = mix32(row + base + static_cast<uint32_t>(j - i));
        store(j, load(j) * (h >= threshold ? scale : 0.0f));
      }
      i = end;
    }
  }
}

void dropout_f32(const float* x, float* y, int64_t n, double p, uint64_t seed, uint64_t offset, int num_threads) {
  dropout_loop(n, p, seed, offset, num_threads, [x](int64_t j) { return x[j]; },
               [y](int64_t j, float v) { y[j] = v; });
}

void dropout_bf16(const uint16_t* x, uint16_t* y, int64_t n, double p, uint64_t seed, uint64_t offset,
                  int num_threads) {
  dropout_loop(n, p, seed, offset, num_threads, [x](int64_t j) { return bf16_to_float(x[j]); },
               [y](int64_t j, float v) { y[j] = float_to_bf16(v); });
}

}  // namespace cpu
}  // namespace mage_fast
