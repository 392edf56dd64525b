// One MaskGIT/MAGE decode step on NVIDIA GPUs, matching mage_fast.ops.decode_step.decode_step_ref.
//   sample_kernel: one warp per (image, position) row: Gumbel-max sampling with the shared counter
//     hash (common/rng.h, the same numbers as every backend), online max and log-sum-exp, the
//     confidence log p(code) + noise_scale * Gumbel; +inf at known positions.
//   select_kernel: one warp per image: the mask_len-th smallest key (ordered confidence << 32 |
//     position) by a bitwise radix select with warp-wide counts, then every key <= it is re-masked:
//     exactly mask_len positions, ties broken by the lower position, no sort.
// Built with --fmad=false (setup.py, CMake) so every fp32 operation rounds as the reference's.
// Logits are read in their own dtype (fp32, fp16 or bf16) and widened to fp32 in registers (exact, as
// the reference's .float()): no fp32 copy of the (B, N, C) logits (67 MB a step at batch 64, C=1024).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/rng.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace mage_fast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// logits: (B, N, C) strides (sB, sN, 1) in T; ids: (B, N); key: (B,) -> conf: (B, N), sampled: (B, N)
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sample_kernel(const T* __restrict__ logits, int64_t sB, int64_t sN, const int64_t* __restrict__ ids,
                  const int64_t* __restrict__ key, int64_t B, int64_t N, int64_t C, int64_t step, float noise_scale,
                  int64_t mask_id, float* __restrict__ conf, int64_t* __restrict__ sampled) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= B * N) return;  // the whole warp leaves together
  const int64_t b = r / N, n = r % N;
  const T* l = logits + b * sB + n * sN;  // (C,)
  const uint32_t k32 = static_cast<uint32_t>(key[b]);
  const uint32_t row = static_cast<uint32_t>(step * N + n);  // counter mod 2^32, as the reference
  const uint32_t hs = row_hash(k32, kStreamSample, row);
  const float inf = __int_as_float(0x7f800000);
  float best = -inf, mx = -inf;
  int64_t arg = lane < C ? lane : INT64_MAX;
  for (int64_t c = lane; c < C; c += 32) {
    const float x = widen(l[c]);  // precision raised: fp32 from here on
    const float g = -logf(-logf(uniform_from_hash(mix32(hs + static_cast<uint32_t>(c)))));
    const float s = x + g;
    if (s > best) {
      best = s;
      arg = c;
    }
    mx = fmaxf(mx, x);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {  // first maximum, as torch.argmax
    const float ob = __shfl_xor_sync(kFullMask, best, o);
    const int64_t oa = __shfl_xor_sync(kFullMask, arg, o);
    if (ob > best || (ob == best && oa < arg)) {
      best = ob;
      arg = oa;
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  }
  const float m = isinf(mx) ? 0.0f : mx;  // torch.logsumexp replaces an infinite max by 0
  float sum = 0.0f;
  for (int64_t c = lane; c < C; c += 32) sum += expf(widen(l[c]) - m);
  sum = warp_sum(sum);
  if (lane == 0) {
    const bool unknown = ids[r] == mask_id;
    sampled[r] = unknown ? arg : ids[r];
    if (unknown) {
      const float lse = logf(sum) + m;
      const float g2 = -logf(-logf(counter_uniform(k32, kStreamConf, row, 0u)));
      conf[r] = (widen(l[arg]) - lse) + noise_scale * g2;
    } else {
      conf[r] = inf;
    }
  }
}

// conf, sampled: (B, N) -> next_ids: (B, N) with the mask_len smallest keys of each image masked.
__global__ void select_kernel(const float* __restrict__ conf, const int64_t* __restrict__ sampled, int64_t B,
                              int64_t N, int64_t mask_len, int64_t mask_id, int64_t* __restrict__ next_ids) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= B) return;
  const float* cf = conf + b * N;  // (N,)
  uint64_t threshold = 0;
  if (mask_len > 0) {
    // MSB-first radix select of the mask_len-th smallest key; keys are unique (position in the low bits).
    uint64_t prefix = 0;
    int64_t k = mask_len;
    for (int bit = 63; bit >= 0; --bit) {
      int cnt = 0;
      for (int64_t n = lane; n < N; n += 32) {
        cnt += in_bucket(select_key(cf[n], static_cast<uint32_t>(n)), prefix, bit);
      }
      radix_step(prefix, k, bit, warp_sum_int(cnt));
    }
    threshold = prefix;
  }
  for (int64_t n = lane; n < N; n += 32) {
    const bool remask = mask_len > 0 && select_key(cf[n], static_cast<uint32_t>(n)) <= threshold;
    next_ids[b * N + n] = remask ? mask_id : sampled[b * N + n];
  }
}

}  // namespace
}  // namespace cuda
}  // namespace mage_fast

extern "C" int mage_fast_cuda_decode_step(const void* logits, int dtype, int64_t sB, int64_t sN, const int64_t* ids,
                                          const int64_t* key, int64_t B, int64_t N, int64_t C, int64_t step,
                                          int64_t mask_len, float noise_scale, int64_t mask_id, float* conf,
                                          int64_t* sampled, int64_t* next_ids, void* stream) {
  using namespace mage_fast::cuda;
  if (B <= 0 || N <= 0) return 0;
  if (C <= 0 || mask_len < 0 || mask_len > N || N >= (int64_t{1} << 31) || dtype < 0 || dtype > 2)
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t rows = B * N;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (dtype == 0)
    sample_kernel<<<blocks, kWarpsPerBlock * 32, 0, s>>>(static_cast<const float*>(logits), sB, sN, ids, key, B, N,
                                                         C, step, noise_scale, mask_id, conf, sampled);
  else if (dtype == 1)
    sample_kernel<<<blocks, kWarpsPerBlock * 32, 0, s>>>(static_cast<const __half*>(logits), sB, sN, ids, key, B, N,
                                                         C, step, noise_scale, mask_id, conf, sampled);
  else
    sample_kernel<<<blocks, kWarpsPerBlock * 32, 0, s>>>(static_cast<const __nv_bfloat16*>(logits), sB, sN, ids, key,
                                                         B, N, C, step, noise_scale, mask_id, conf, sampled);
  select_kernel<<<static_cast<unsigned>((B + 3) / 4), 128, 0, s>>>(conf, sampled, B, N, mask_len, mask_id, next_ids);
  return static_cast<int>(cudaGetLastError());
}
