// What the hashed dropout (dropout.cpp) and the training attention's passes (attention.cpp) share, so
// their keep decisions cannot drift apart: the stream constant, the per-call key, and bf16 storage.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/rng.h"

namespace mage_fast {
namespace cpu {

constexpr uint32_t kStreamDropout = 0x2545F491u;

inline uint32_t dropout_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ kStreamDropout) + mix32(static_cast<uint32_t>(seed >> 32));
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN (a select, no branch)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? ((bits >> 16) | 0x40u) : rounded);
}

}  // namespace cpu
}  // namespace mage_fast
