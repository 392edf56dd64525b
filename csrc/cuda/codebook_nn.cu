// Codebook nearest neighbour on NVIDIA GPUs: shared-memory tiled fp32 distance products with the
// running argmin kept in registers; no (N, K) matrix. Each block owns BM rows of z and a range of
// codes (a split, so that small N still fills the GPU); it walks its codes in BN-wide tiles,
// reducing D in BK-deep slices through shared memory, each thread computing a TM x TN sub-tile.
// A tile's epilogue folds distances into the thread's per-row (min, argmin); at the end the 16
// threads of a row group reduce by shuffles and publish with one 64-bit atomicMin of
// (ordered distance << 32 | code), which keeps the smallest distance and, on ties, the lowest code.
// fp32 inputs run on the CUDA cores in fp32 (no TF32, whose 10-bit mantissa would move the argmin);
// fp16/bf16 inputs run on the tensor cores (WMMA 16x16x16, fp32 accumulation): a product of two
// 16-bit floats is exact in fp32, so both paths agree with the fp32 reference up to genuine near-ties.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace mage_fast {
namespace cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16;  // rows, codes, depth per tile
constexpr int TM = 4, TN = 4;             // per-thread sub-tile: rows ty + 16 i, codes tx + 16 j
constexpr int kThreads = 256;             // 16 x 16

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

// coef: (K,) |e|^2 (l2) or max(|e|, 1e-12) (cosine, as F.normalize), in fp32; one warp per code.
template <typename T>
__global__ void coef_kernel(const T* __restrict__ cb, int64_t K, int64_t D, int cosine, float* __restrict__ coef) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (k >= K) return;
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float e = to_float(cb[k * D + d]);
    s = __fmaf_rn(e, e, s);
  }
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

// Tensor-core variant for 16-bit inputs. z: (N, D), cb: (K, D) in T (fp16 or bf16). A block of 4
// warps owns TBM rows; per BN-code tile each warp computes a 32 x 32 quarter with 2 x 2 WMMA
// fragments (fp32 accumulators) over BK-deep smem slices, the tile is staged in smem as fp32, and
// each thread folds one row's 32 codes into its running (min, argmin) held in registers.
constexpr int TBM = 64, TBN = 64, TBK = 32;
constexpr int TLD = TBK + 8;  // smem leading dimensions (elements): multiples of 8 (16-bit) / 4 (fp32),
constexpr int CLD = TBN + 4;  // every fragment pointer 32-byte aligned
constexpr int kTcThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kTcThreads) nn_tc_kernel(const T* __restrict__ z, const T* __restrict__ cb,
                                                           const float* __restrict__ coef, int64_t N, int64_t K,
                                                           int64_t D, int cosine, int64_t codes_per_split,
                                                           unsigned long long* __restrict__ packed) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 fragments need sm_80; the binding only launches this kernel on sm_80 or newer
#else
  using namespace nvcuda;
  __shared__ __align__(32) T As[TBM * TLD];      // (TBM rows, TBK) z slice
  __shared__ __align__(32) T Bs[TBN * TLD];      // (TBN codes, TBK) code slice = col-major (TBK, TBN)
  __shared__ __align__(32) float Cs[TBM * CLD];  // (TBM, TBN) dot products of the tile
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int my_row = threadIdx.x >> 1, my_half = threadIdx.x & 1;  // epilogue: 2 threads per row
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TBM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);
  float best = __int_as_float(0x7f800000);
  int32_t besti = static_cast<int32_t>(k_begin);

  for (int64_t kt = k_begin; kt < k_end; kt += TBN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t d0 = 0; d0 < D; d0 += TBK) {
#pragma unroll 4
      for (int i = 0; i < (TBM * TBK) / kTcThreads; ++i) {
        const int e = threadIdx.x + kTcThreads * i, r = e / TBK, dd = e % TBK;
        const int64_t gr = row0 + r, gc = kt + r, gd = d0 + dd;
        As[r * TLD + dd] = (gr < N && gd < D) ? z[gr * D + gd] : zero_of<T>();
        Bs[r * TLD + dd] = (gc < k_end && gd < D) ? cb[gc * D + gd] : zero_of<T>();
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * TLD + kk, TLD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * TLD + kk, TLD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * CLD + wn * 32 + j * 16, acc[i][j], CLD,
                                wmma::mem_row_major);
    __syncthreads();
    for (int c = 0; c < TBN / 2; ++c) {  // codes in increasing order: a strict < keeps the lowest on ties
      const int col = my_half * (TBN / 2) + c;
      const int64_t code = kt + col;
      if (code >= k_end) break;
      const float dot = Cs[my_row * CLD + col], cf = coef[code];
      const float dist = cosine ? 0.0f - __fdiv_rn(dot, cf) : __fmaf_rn(-2.0f, dot, cf);
      if (dist < best) {
        best = dist;
        besti = static_cast<int32_t>(code);
      }
    }
    __syncthreads();  // Cs is rewritten by the next tile
  }
  const float ob = __shfl_xor_sync(kFullMask, best, 1);
  const int32_t oi = __shfl_xor_sync(kFullMask, besti, 1);
  if (ob < best || (ob == best && oi < besti)) {
    best = ob;
    besti = oi;
  }
  const int64_t r = row0 + my_row;
  if (my_half == 0 && r < N)
    atomicMin(packed + r, static_cast<unsigned long long>(select_key(best, static_cast<uint32_t>(besti))));
#endif
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

namespace mage_fast {
namespace cuda {
namespace {

// dtype: 0 fp32 (CUDA cores), 1 fp16, 2 bf16 (tensor cores)
int launch_codebook_nn(const void* z, const void* codebook, int dtype, int64_t N, int64_t K, int64_t D, int metric,
                       void* workspace, int64_t* out, void* stream) {
  if (N <= 0) return 0;
  if (K <= 0 || K >= (int64_t{1} << 31) || dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto* packed = static_cast<unsigned long long*>(workspace);  // (N,)
  auto* coef = reinterpret_cast<float*>(packed + N);            // (K,)
  cudaError_t err = cudaMemsetAsync(packed, 0xFF, static_cast<size_t>(N) * sizeof(unsigned long long), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  const unsigned coef_blocks = static_cast<unsigned>((K * 32 + 255) / 256);
  if (dtype == 0)
    coef_kernel<<<coef_blocks, 256, 0, s>>>(static_cast<const float*>(codebook), K, D, metric, coef);
  else if (dtype == 1)
    coef_kernel<<<coef_blocks, 256, 0, s>>>(static_cast<const __half*>(codebook), K, D, metric, coef);
  else
    coef_kernel<<<coef_blocks, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(codebook), K, D, metric, coef);
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t bm = dtype == 0 ? BM : TBM, bn = dtype == 0 ? BN : TBN;
  const int64_t gx = (N + bm - 1) / bm, code_tiles = (K + bn - 1) / bn;
  const int64_t want = (2 * static_cast<int64_t>(sms) + gx - 1) / gx;  // about two blocks per SM
  const int64_t splits = want < 1 ? 1 : (want > code_tiles ? code_tiles : want);
  const int64_t codes_per_split = (code_tiles + splits - 1) / splits * bn;
  const int64_t gy = (K + codes_per_split - 1) / codes_per_split;
  if (gx > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (dtype == 0)
    nn_kernel<<<grid, kThreads, 0, s>>>(static_cast<const float*>(z), static_cast<const float*>(codebook), coef, N, K,
                                        D, metric, codes_per_split, packed);
  else if (dtype == 1)
    nn_tc_kernel<<<grid, kTcThreads, 0, s>>>(static_cast<const __half*>(z), static_cast<const __half*>(codebook),
                                             coef, N, K, D, metric, codes_per_split, packed);
  else
    nn_tc_kernel<<<grid, kTcThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(z),
                                             static_cast<const __nv_bfloat16*>(codebook), coef, N, K, D, metric,
                                             codes_per_split, packed);
  finalize_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, s>>>(packed, N, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace mage_fast

extern "C" int mage_fast_cuda_codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D,
                                          int metric, void* workspace, int64_t* out, void* stream) {
  return mage_fast::cuda::launch_codebook_nn(z, codebook, 0, N, K, D, metric, workspace, out, stream);
}

extern "C" int mage_fast_cuda_codebook_nn_16bit(const void* z, const void* codebook, int bf16, int64_t N, int64_t K,
                                                int64_t D, int metric, void* workspace, int64_t* out, void* stream) {
  return mage_fast::cuda::launch_codebook_nn(z, codebook, bf16 ? 2 : 1, N, K, D, metric, workspace, out, stream);
}

extern "C" const char* mage_fast_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
