// Pieces of the GPU selection that are plain integer logic, host and device, so that the native
// test checks on the CPU exactly what the CUDA kernels run (csrc/cuda/*.cu).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/rng.h"  // MF_HD

namespace mage_fast {

// Monotone map of a float to uint32 (a < b  <=>  key(a) < key(b) for non-NaN floats); -0.0 is
// folded onto +0.0 first so that the two compare equal, as they do for torch.sort.
MF_HD uint32_t ordered_key(float f) {
  f = f + 0.0f;
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Unique selection key of a confidence at a position: (value, position) lexicographic.
MF_HD uint64_t select_key(float value, uint32_t position) {
  return (static_cast<uint64_t>(ordered_key(value)) << 32) | position;
}

// MSB-first radix select of the k-th smallest key (k >= 1). Round `bit` (63 down to 0) counts the
// keys in_bucket(key, prefix, bit) -- same bits as prefix above `bit`, 0 at `bit` -- and calls
// radix_step; after bit 0, prefix is the k-th smallest key itself.
MF_HD bool in_bucket(uint64_t key, uint64_t prefix, int bit) {
  const bool same_high = bit == 63 || ((key ^ prefix) >> (bit + 1)) == 0;
  return same_high && !((key >> bit) & 1u);
}

MF_HD void radix_step(uint64_t& prefix, int64_t& k, int bit, int64_t count) {
  if (k > count) {  // the k-th smallest has a 1 at this bit
    prefix |= uint64_t{1} << bit;
    k -= count;
  }
}

}  // namespace mage_fast
