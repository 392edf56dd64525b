/* C launchers of mage_fast's CUDA kernels (csrc/cuda/*.cu). Plain C types only: the .cu files
 * include no torch header and compile with nvcc alone; csrc/cuda/ops_cuda.cpp binds them to
 * torch.ops.mage_fast. Streams are passed as void* (a cudaStream_t). Each launcher returns a
 * cudaError_t as int (0 = success); mage_fast_cuda_error_string turns it into text. */
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of device workspace codebook_nn needs: (N,) uint64 packed minima + (K,) float coefficients. */
size_t mage_fast_cuda_codebook_nn_workspace(int64_t N, int64_t K);

/* z: (N, D) fp32 row-major; codebook: (K, D) fp32 row-major; metric 0 = l2, 1 = cosine;
 * workspace: mage_fast_cuda_codebook_nn_workspace(N, K) bytes, 8-byte aligned; out: (N,) int64.
 * 0 < K < 2^31. */
int mage_fast_cuda_codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, int metric,
                               void* workspace, int64_t* out, void* stream);

/* Tensor-core variant: z (N, D) and codebook (K, D) both fp16 (bf16 = 0) or both bf16 (bf16 = 1),
 * fp32 accumulation; otherwise as mage_fast_cuda_codebook_nn. Needs sm_80 or newer. */
int mage_fast_cuda_codebook_nn_16bit(const void* z, const void* codebook, int bf16, int64_t N, int64_t K, int64_t D,
                                     int metric, void* workspace, int64_t* out, void* stream);

/* logits: (B, N, C) with strides (sB, sN, 1), dtype 0 = fp32, 1 = fp16, 2 = bf16 (widened to fp32 in
 * registers); ids, sampled, next_ids: (B, N) int64 contiguous; key: (B,) int64; conf: (B, N) fp32
 * workspace. 0 <= mask_len <= N. */
int mage_fast_cuda_decode_step(const void* logits, int dtype, int64_t sB, int64_t sN, const int64_t* ids,
                               const int64_t* key,
                               int64_t B, int64_t N, int64_t C, int64_t step, int64_t mask_len, float noise_scale,
                               int64_t mask_id, float* conf, int64_t* sampled, int64_t* next_ids, void* stream);

const char* mage_fast_cuda_error_string(int err);

#ifdef __cplusplus
}
#endif
