// CPU kernels of mage_fast, free of torch headers: plain pointers, OpenMP and AVX2/FMA where the
// compiler targets it. The torch bindings (csrc/ops.cpp) check arguments and call these; the
// native test (csrc/tests/test_native.cpp) calls them directly.
#pragma once
#include <cstdint>

namespace mage_fast {
namespace cpu {

enum class Metric : int { kL2 = 0, kCosine = 1 };

// z: (N, D) fp32 row-major; codebook: (K, D) fp32 row-major -> out: (N,) int64, the index of the
// nearest code (l2: smallest |e|^2 - 2 z.e; cosine: largest z.e/|e|), ties to the lowest index.
// Extra memory: z quantised to int16 (N x D), an L2-sized int16 code block per thread, O(K) per-code
// scalars and O(N) per-row state per thread; never an (N, K) matrix nor a copy of the codebook.
void codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, Metric metric,
                 int64_t* out, int num_threads);

// Introspection of codebook_nn (tests, benchmarks): mode 0 picks the path (int16 screening with
// fp32 re-scoring where it can be exact, else fp32), mode 1 forces the fp32 path. The stats are
// those of the latest call in the process: path 1 = int16 screening, 0 = fp32 throughout;
// fallback_rows = rows done on the fp32 path; scored = (row, code) pairs re-scored in fp32.
struct CodebookNNStats {
  int64_t path, fallback_rows, scored;
};
void codebook_nn_set_mode(int mode);
CodebookNNStats codebook_nn_last_stats();

// One decode step. logits: (B, N, C) fp32 with strides (sB, sN, 1); ids, sampled, next_ids:
// (B, N) int64 contiguous; key: (B,) int64 (low 32 bits used). 0 <= mask_len < N.
void decode_step(const float* logits, int64_t sB, int64_t sN, const int64_t* ids, const int64_t* key,
                 int64_t B, int64_t N, int64_t C, int64_t step, int64_t mask_len, float noise_scale,
                 int64_t mask_id, int64_t* sampled, int64_t* next_ids, int num_threads);

// x: (B, L, row_bytes) contiguous; index: (B, K) int64 -> out: (B, K, row_bytes).
// Returns the number of out-of-range indices (those rows are left unwritten).
int64_t gather_rows(const void* x, const int64_t* index, int64_t B, int64_t L, int64_t K, int64_t row_bytes,
                    void* out, int num_threads);

// x: (B, K, D) fp32; index: (B, K) int64; all_mask: (B, L) bool; pos: (L, D) fp32 -> out: (B, L, D),
// out[b, l] = (all_mask[b, l] or l not in index[b] ? x[b, 0] : x[b, k with index[b, k] == l]) + pos[l].
// Returns the number of out-of-range indices.
int64_t scatter_tokens(const float* x, const int64_t* index, const bool* all_mask, const float* pos, int64_t B,
                       int64_t K, int64_t L, int64_t D, float* out, int num_threads);

// Winograd F(4x4, 3x3), channels-last fp32 (csrc/cpu/winograd.cpp); the binding runs the 36 products.
// w: (Cout, Cin, 3, 3) -> U: (36, Cin, Cout).
void winograd_f43_weight(const float* w, int64_t Cout, int64_t Cin, float* U);
// x: (N, H, W, C) -> V: (36, P_stride, C), rows [0, P) = tiles [tile0, tile0 + P) of the 4x4 tiling of the
// (Ho, Wo) output, in (n, tile row, tile column) order, each the transformed 6x6 patch with zero padding 1.
// upsample: the input is x upsampled 2x (nearest), read in place: Ho = 2H, Wo = 2W.
void winograd_f43_input(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, bool upsample, int64_t tile0,
                        int64_t P, int64_t P_stride, float* V, int num_threads);
// M: (36, P_stride, Cout) products of tiles [tile0, tile0 + P) -> their pixels of y: (N, Ho, Wo, Cout), + bias
// (Cout,) when not null.
void winograd_f43_output(const float* M, int64_t P, int64_t P_stride, int64_t tile0, int64_t N, int64_t Ho,
                         int64_t Wo, int64_t Cout, const float* bias, float* y, int num_threads);

// GroupNorm (csrc/cpu/group_norm.cpp): x, y: (N, HW, C) channels-last fp32, G groups of C / G channels;
// y = (x - mean) / sqrt(var + eps) * gamma + beta per image and group (biased variance, statistics in
// double), then y * sigmoid(y) when silu. y may not alias x.
void group_norm_nhwc(const float* x, int64_t N, int64_t HW, int64_t C, int64_t G, const float* gamma,
                     const float* beta, float eps, bool silu, float* y, int num_threads);
// The vectorisable exp the SiLU above uses, exposed for its test.
float exp_approx(float x);

// Dropout by counter-based hashes (csrc/cpu/dropout.cpp): y[i] = x[i] / (1 - p) when
// mix32(mix32(key(seed) + hi32(offset + i)) + lo32(offset + i)) >= dropout_threshold(p), else 0. x may be y.
uint32_t dropout_threshold(double p);
bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold);
void dropout_f32(const float* x, float* y, int64_t n, double p, uint64_t seed, uint64_t offset, int num_threads);
void dropout_bf16(const uint16_t* x, uint16_t* y, int64_t n, double p, uint64_t seed, uint64_t offset,
                  int num_threads);

// The CPU training attention's elementwise passes (csrc/cpu/attention.cpp). Rows of K contiguous
// elements, M rows; s, pd, dp, ds fp32 or bf16 (uint16 storage) as flagged; dropout decisions those of
// dropout_keep at element index offset + row * K + column.
// attn_probs: p = exp(scale * s - lse[row]) into p (fp32; may be null), pd = p / (1 - p_drop) where kept, else 0.
void attn_probs(const void* s, bool s_bf16, const float* lse, int64_t M, int64_t K, float scale, double p_drop,
                uint64_t seed, uint64_t offset, float* p, void* pd, bool pd_bf16, int num_threads);
// attn_dscores: ds = p * (dropout(dp) - delta[row]) * scale.
void attn_dscores(const void* dp, bool dp_bf16, const float* p, const float* delta, int64_t M, int64_t K, float scale,
                  double p_drop, uint64_t seed, uint64_t offset, void* ds, bool ds_bf16, int num_threads);
float exp_neg_approx(float x);  // the exp those use (tests)

}  // namespace cpu
}  // namespace mage_fast
