// Device helpers shared by the CUDA kernels (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace mage_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Monotone map of a float to uint32 (a < b  <=>  key(a) < key(b)); -0.0 is folded onto +0.0 so
// that the two compare equal, as they do for torch.sort.
__device__ __forceinline__ uint32_t ordered_key(float f) {
  uint32_t u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

}  // namespace cuda
}  // namespace mage_fast
