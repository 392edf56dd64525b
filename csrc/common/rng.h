// Counter-based random numbers shared by every backend (see mage_fast/ops/decode_step.py).
// Header-only, no torch: included by the C++ CPU kernels, the CUDA kernels and the native test.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define MF_HD __host__ __device__ __forceinline__
#else
#define MF_HD inline
#endif

namespace mage_fast {

constexpr uint32_t kStreamSample = 0x9E3779B9u;
constexpr uint32_t kStreamConf = 0x7F4A7C15u;

// 32-bit avalanche hash; uint32 wrap-around equals the reference's `& 0xFFFFFFFF` on int64.
MF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// First two hash rounds, shared by every column of one (image, stream, row).
MF_HD uint32_t row_hash(uint32_t key, uint32_t stream, uint32_t row) {
  return mix32(mix32(key ^ stream) + row);
}

// Uniform in (0, 1) from the 24 high bits, rounded exactly as the fp32 reference: (h >> 8) + 0.5
// is an fp32 add (round to nearest even), the 2^-24 scale is exact. The largest hash would round
// to 2^24 (u = 1, an infinite Gumbel draw), so u is bounded by 1 - 2^-24, the largest fp32 below 1.
MF_HD float uniform_from_hash(uint32_t h) {
  const float u = (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return u < 0.99999994f ? u : 0.99999994f;
}

MF_HD float counter_uniform(uint32_t key, uint32_t stream, uint32_t row, uint32_t col) {
  return uniform_from_hash(mix32(row_hash(key, stream, row) + col));
}

}  // namespace mage_fast
