// Codebook nearest neighbour on NVIDIA GPUs: shared-memory tiled fp32 distance products with the
// running argmin kept in registers; no (N, K) matrix. Each block owns BM rows of z and a range of
// codes (a split, so that small N still fills the GPU); it walks its codes in BN-wide tiles,
// reducing D in BK-deep slices through shared memory, each thread computing a TM x TN sub-tile.
// A tile's epilogue folds distances into the thread's per-row (min, argmin); at the end the 16
// threads of a row group reduce by shuffles and publish with one 64-bit atomicMin of
// (ordered distance << 32 | code), which keeps the smallest distance and, on ties, the lowest code.
// fp32 throughout (no TF32), so results agree with the fp32 reference up to genuine near-ties.
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace mage_fast {
namespace cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16;  // rows, codes, depth per tile
constexpr int TM = 4, TN = 4;             // per-thread sub-tile: rows ty + 16 i, codes tx + 16 j
constexpr int kThreads = 256;             // 16 x 16

// coef: (K,) |e|^2 (l2) or max(|e|, 1e-12) (cosine, as F.normalize); one warp per code.
__global__ void coef_kernel(const float* __restrict__ cb, int64_t K, int64_t D, int cosine, float* __restrict__ coef) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (k >= K) return;
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) s = __fmaf_rn(cb[k * D + d], cb[k * D + d], s);
  s = warp_sum(s);
  if (lane == 0) coef[k] = cosine ? fmaxf(sqrtf(s), 1e-12f) : s;
}

// z: (N, D); cb: (K, D); coef: (K,); packed: (N,) running (ordered distance, code), init all-ones.
__global__ void __launch_bounds__(kThreads) nn_kernel(const float* __restrict__ z, const float* __restrict__ cb,
                                                      const float* __restrict__ coef, int64_t N, int64_t K,
                                                      int64_t D, int cosine, int64_t codes_per_split,
                                                      unsigned long long* __restrict__ packed) {
  __shared__ float As[BK][BM + 4];  // z slice, transposed: As[d][row]
  __shared__ float Bs[BK][BN + 4];  // code slice, transposed: Bs[d][code]
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);

  float best[TM];
  int32_t besti[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    best[i] = __int_as_float(0x7f800000);  // +inf
    besti[i] = static_cast<int32_t>(k_begin);
  }
  for (int64_t kt = k_begin; kt < k_end; kt += BN) {
    float acc[TM][TN] = {};
    for (int64_t d0 = 0; d0 < D; d0 += BK) {
#pragma unroll
      for (int i = 0; i < (BM * BK) / kThreads; ++i) {
        const int e = threadIdx.x + kThreads * i, r = e >> 4, dd = e & 15;
        const int64_t gr = row0 + r, gc = kt + r, gd = d0 + dd;
        As[dd][r] = (gr < N && gd < D) ? z[gr * D + gd] : 0.0f;
        Bs[dd][r] = (gc < k_end && gd < D) ? cb[gc * D + gd] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < BK; ++dd) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[dd][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[dd][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = __fmaf_rn(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < TN; ++j) {  // codes in increasing order: a strict < keeps the lowest on ties
      const int64_t c = kt + tx + 16 * j;
      if (c >= k_end) continue;
      const float cf = coef[c];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float dist = cosine ? 0.0f - __fdiv_rn(acc[i][j], cf) : __fmaf_rn(-2.0f, acc[i][j], cf);
        if (dist < best[i]) {
          best[i] = dist;
          besti[i] = static_cast<int32_t>(c);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float b = best[i];
    int32_t bi = besti[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {  // the 16 threads sharing these rows (one half-warp)
      const float ob = __shfl_xor_sync(kFullMask, b, o);
      const int32_t oi = __shfl_xor_sync(kFullMask, bi, o);
      if (ob < b || (ob == b && oi < bi)) {
        b = ob;
        bi = oi;
      }
    }
    const int64_t r = row0 + ty + 16 * i;
    if (tx == 0 && r < N)
      atomicMin(packed + r, static_cast<unsigned long long>(select_key(b, static_cast<uint32_t>(bi))));
  }
}

__global__ void finalize_kernel(const unsigned long long* __restrict__ packed, int64_t N, int64_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) out[n] = static_cast<int64_t>(packed[n] & 0xFFFFFFFFull);
}

}  // namespace
}  // namespace cuda
}  // namespace mage_fast

extern "C" size_t mage_fast_cuda_codebook_nn_workspace(int64_t N, int64_t K) {
  return static_cast<size_t>(N) * sizeof(unsigned long long) + ((static_cast<size_t>(K) * sizeof(float) + 7) & ~size_t{7});
}

extern "C" int mage_fast_cuda_codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D,
                                          int metric, void* workspace, int64_t* out, void* stream) {
  using namespace mage_fast::cuda;
  if (N <= 0) return 0;
  if (K <= 0 || K >= (int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto* packed = static_cast<unsigned long long*>(workspace);  // (N,)
  auto* coef = reinterpret_cast<float*>(packed + N);            // (K,)
  cudaError_t err = cudaMemsetAsync(packed, 0xFF, static_cast<size_t>(N) * sizeof(unsigned long long), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  coef_kernel<<<static_cast<unsigned>((K * 32 + 255) / 256), 256, 0, s>>>(codebook, K, D, metric, coef);
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t gx = (N + BM - 1) / BM, code_tiles = (K + BN - 1) / BN;
  const int64_t want = (2 * static_cast<int64_t>(sms) + gx - 1) / gx;  // about two blocks per SM
  const int64_t splits = want < 1 ? 1 : (want > code_tiles ? code_tiles : want);
  const int64_t codes_per_split = (code_tiles + splits - 1) / splits * BN;
  const int64_t gy = (K + codes_per_split - 1) / codes_per_split;
  if (gx > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidConfiguration);
  nn_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, s>>>(
      z, codebook, coef, N, K, D, metric, codes_per_split, packed);
  finalize_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, s>>>(packed, N, out);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* mage_fast_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
