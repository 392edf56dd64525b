// Device helpers shared by the CUDA kernels (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/radix_select.h"  // ordered_key, select_key, in_bucket, radix_step

namespace mage_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

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
