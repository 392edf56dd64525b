// Codebook nearest neighbour on NVIDIA GPUs: shared-memory tiled fp32 distance products with the
// running argmin kept in registers; no (N, K) matrix. Each block owns BM rows of z and a range of
// codes (a split, so that small N still fills the GPU); it walks its codes in BN-wide tiles,
// reducing D in BK-deep slices through shared memory, each thread computing a TM x TN sub-tile of
// contiguous rows and codes (one 128-bit shared load feeds four FMAs of each operand).
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
constexpr int TM = 4, TN = 4;             // per-thread sub-tile: rows 4 ty + i, codes 4 tx + j
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
  __shared__ __align__(16) float As[BK][BM + 4];  // z slice, transposed: As[d][row]; rows 16-byte aligned
  __shared__ __align__(16) float Bs[BK][BN + 4];  // code slice, transposed: Bs[d][code]
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
        const float4 a4 = *reinterpret_cast<const float4*>(&As[dd][TM * ty]);  // LDS.128: rows 4ty..4ty+3
        const float4 b4 = *reinterpret_cast<const float4*>(&Bs[dd][TN * tx]);  // codes 4tx..4tx+3
        const float a[TM] = {a4.x, a4.y, a4.z, a4.w}, b[TN] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = __fmaf_rn(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < TN; ++j) {  // codes in increasing order: a strict < keeps the lowest on ties
      const int64_t c = kt + TN * tx + j;
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
    const int64_t r = row0 + TM * ty + i;
    if (tx == 0 && r < N)
      atomicMin(packed + r, static_cast<unsigned long long>(select_key(b, static_cast<uint32_t>(bi))));
  }
}

// Tensor-core variant for 16-bit inputs. z: (N, D), cb: (K, D) in T (fp16 or bf16). A block of 4
// warps owns TBM rows; per BN-code tile each warp computes a 32 x 32 quarter with 2 x 2 WMMA
// fragments (fp32 accumulators) over BK-deep smem slices, the tile is staged in smem as fp32, and
// each thread folds one row's 32 codes into its running (min, argmin) held in registers.
// With ASYNC (D a multiple of 8, 16-byte aligned rows) the slices arrive by cp.async, 16 bytes a copy,
// double-buffered: slice d+1 is in flight while slice d feeds the tensor cores. Otherwise plain loads.
// The epilogue walks each thread's 32 codes in a rotated order (rot = bit 3 of the row + 2 x half), so
// the 32 threads of a warp read 32 different banks of Cs (its rows are 68 floats apart: 4 banks).
constexpr int TBM = 64, TBN = 64, TBK = 32;
constexpr int TLD = TBK + 8;  // smem leading dimensions (elements): multiples of 8 (16-bit) / 4 (fp32),
constexpr int CLD = TBN + 4;  // every fragment pointer 32-byte aligned
constexpr int kTcThreads = 128;
constexpr int kChunk = 8;     // 16-bit elements per 16-byte copy

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = full ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// One (TBM rows, TBK) slice of z and one (TBN codes, TBK) slice of the codebook into smem.
template <typename T, bool ASYNC>
__device__ __forceinline__ void load_slices(const T* __restrict__ z, const T* __restrict__ cb, T* As, T* Bs,
                                            int64_t row0, int64_t kt, int64_t k_end, int64_t d0, int64_t N,
                                            int64_t D) {
  if (ASYNC) {
#pragma unroll
    for (int i = 0; i < (TBM * TBK / kChunk) / kTcThreads; ++i) {
      const int e = threadIdx.x + kTcThreads * i, r = e / (TBK / kChunk), dd = (e % (TBK / kChunk)) * kChunk;
      const int64_t gr = row0 + r, gc = kt + r, gd = d0 + dd;
      const bool zin = gr < N && gd < D, cin = gc < k_end && gd < D;
      cp_async16(As + r * TLD + dd, zin ? z + gr * D + gd : z, zin);
      cp_async16(Bs + r * TLD + dd, cin ? cb + gc * D + gd : cb, cin);
    }
  } else {
#pragma unroll 4
    for (int i = 0; i < (TBM * TBK) / kTcThreads; ++i) {
      const int e = threadIdx.x + kTcThreads * i, r = e / TBK, dd = e % TBK;
      const int64_t gr = row0 + r, gc = kt + r, gd = d0 + dd;
      As[r * TLD + dd] = (gr < N && gd < D) ? z[gr * D + gd] : zero_of<T>();
      Bs[r * TLD + dd] = (gc < k_end && gd < D) ? cb[gc * D + gd] : zero_of<T>();
    }
  }
}

template <typename T, bool ASYNC>
__global__ void __launch_bounds__(kTcThreads) nn_tc_kernel(const T* __restrict__ z, const T* __restrict__ cb,
                                                           const float* __restrict__ coef, int64_t N, int64_t K,
                                                           int64_t D, int cosine, int64_t codes_per_split,
                                                           unsigned long long* __restrict__ packed) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 fragments need sm_80; the binding only launches this kernel on sm_80 or newer
#else
  using namespace nvcuda;
  __shared__ __align__(128) T As[2][TBM * TLD];  // (TBM rows, TBK) z slices, two stages
  __shared__ __align__(128) T Bs[2][TBN * TLD];  // (TBN codes, TBK) code slices = col-major (TBK, TBN)
  __shared__ __align__(32) float Cs[TBM * CLD];  // (TBM, TBN) dot products of the tile
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int my_row = threadIdx.x >> 1, my_half = threadIdx.x & 1;  // epilogue: 2 threads per row
  const int rot = ((my_row >> 3) & 1) + 2 * my_half;               // bank rotation of the epilogue
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
    int stage = 0;
    load_slices<T, ASYNC>(z, cb, As[0], Bs[0], row0, kt, k_end, 0, N, D);
    cp_async_commit();
    for (int64_t d0 = 0; d0 < D; d0 += TBK) {
      if (ASYNC && d0 + TBK < D) {  // prefetch the next slice into the other stage
        load_slices<T, ASYNC>(z, cb, As[stage ^ 1], Bs[stage ^ 1], row0, kt, k_end, d0 + TBK, N, D);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As[stage] + (wm * 32 + i * 16) * TLD + kk, TLD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs[stage] + (wn * 32 + j * 16) * TLD + kk, TLD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();  // this stage is refilled two slices later
      if (ASYNC) {
        stage ^= 1;
      } else if (d0 + TBK < D) {
        load_slices<T, ASYNC>(z, cb, As[0], Bs[0], row0, kt, k_end, d0 + TBK, N, D);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * CLD + wn * 32 + j * 16, acc[i][j], CLD,
                                wmma::mem_row_major);
    __syncthreads();
    for (int c = 0; c < TBN / 2; ++c) {
      const int col = my_half * (TBN / 2) + ((c + rot) & (TBN / 2 - 1));
      const int64_t code = kt + col;
      if (code >= k_end) continue;
      const float dot = Cs[my_row * CLD + col], cf = coef[code];
      const float dist = cosine ? 0.0f - __fdiv_rn(dot, cf) : __fmaf_rn(-2.0f, dot, cf);
      if (dist < best || (dist == best && code < besti)) {  // rotated order: ties by the code itself
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

template <typename T>
void launch_tc(const T* z, const T* cb, const float* coef, int64_t N, int64_t K, int64_t D, int metric,
               int64_t codes_per_split, unsigned long long* packed, dim3 grid, cudaStream_t s) {
  // cp.async copies 16 bytes: every row must start 16-byte aligned
  const bool async = D % kChunk == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(cb) % 16 == 0;
  if (async)
    nn_tc_kernel<T, true><<<grid, kTcThreads, 0, s>>>(z, cb, coef, N, K, D, metric, codes_per_split, packed);
  else
    nn_tc_kernel<T, false><<<grid, kTcThreads, 0, s>>>(z, cb, coef, N, K, D, metric, codes_per_split, packed);
}

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
  err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
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
    launch_tc(static_cast<const __half*>(z), static_cast<const __half*>(codebook), coef, N, K, D, metric,
              codes_per_split, packed, grid, s);
  else
    launch_tc(static_cast<const __nv_bfloat16*>(z), static_cast<const __nv_bfloat16*>(codebook), coef, N, K, D,
              metric, codes_per_split, packed, grid, s);
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
