// Codebook nearest neighbour on the CPU: blocked distance products with a fused running argmin.
//
// Each task owns a range of rows of z and a range of codes. It streams its codes in blocks of
// `kc` (sized for L2), packs each block into panels of NR codes laid out (D, NR), and runs an
// MR x NR register-tiled micro-kernel (AVX2 FMA) over every MR-row block; the micro-kernel's
// epilogue turns the NR dot products into distances and folds them into the rows' running
// (min, argmin). No (N, K) matrix exists: extra memory is one packed block per thread plus
// (code splits) x N partial results.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MF_AVX2 1
#endif

namespace mage_fast {
namespace cpu {
namespace {

constexpr int MR = 6;   // rows per micro-tile
constexpr int NR = 16;  // codes per micro-tile (two 8-lane vectors)
constexpr float kInf = std::numeric_limits<float>::infinity();

// packed: (ceil(kc / NR), D, NR); code k0 + p * NR + j goes to panel p, lane j, divided by denom[k]
// (cosine) when denom is given; lanes past the block are zero.
void pack_block(const float* cb, int64_t D, int64_t k0, int64_t kc, const float* denom, float* packed) {
  const int64_t panels = (kc + NR - 1) / NR;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * D * NR;
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      if (k >= kc) {
        for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = 0.0f;
        continue;
      }
      const float* src = cb + (k0 + k) * D;
      if (denom != nullptr) {
        const float s = denom[k0 + k];
        for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = src[d] / s;
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = src[d];
      }
    }
  }
}

#if MF_AVX2
inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// z: (M, D) rows at stride D; bp: (D, NR) packed panel; bias: (NR,) |e|^2 (l2), 0 (cosine) or
// +inf (padding); best/besti: (M,) running minimum of bias - 2 z.e and its code index.
template <int M>
inline void micro_kernel(const float* z, int64_t D, const float* bp, const float* bias, int64_t kbase,
                         float* best, int64_t* besti) {
  __m256 acc0[M], acc1[M];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(bp + d * NR);
    const __m256 b1 = _mm256_loadu_ps(bp + d * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
      const __m256 a = _mm256_broadcast_ss(z + i * D + d);
      acc0[i] = _mm256_fmadd_ps(a, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(a, b1, acc1[i]);
    }
  }
  const __m256 bias0 = _mm256_loadu_ps(bias), bias1 = _mm256_loadu_ps(bias + 8);
  const __m256 m2 = _mm256_set1_ps(-2.0f);
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    const __m256 d0 = _mm256_fmadd_ps(m2, acc0[i], bias0);
    const __m256 d1 = _mm256_fmadd_ps(m2, acc1[i], bias1);
    const float h = hmin8(_mm256_min_ps(d0, d1));
    if (h < best[i]) {
      const __m256 hv = _mm256_set1_ps(h);
      const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d0, hv, _CMP_EQ_OQ))) |
                            (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d1, hv, _CMP_EQ_OQ))) << 8);
      best[i] = h;
      besti[i] = kbase + __builtin_ctz(mask);  // lowest lane among equals: lowest code index
    }
  }
}
#else
template <int M>
inline void micro_kernel(const float* z, int64_t D, const float* bp, const float* bias, int64_t kbase,
                         float* best, int64_t* besti) {
  float acc[M][NR] = {};
  for (int64_t d = 0; d < D; ++d)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += z[i * D + d] * bp[d * NR + j];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NR; ++j) {
      const float dist = bias[j] - 2.0f * acc[i][j];
      if (dist < best[i]) {
        best[i] = dist;
        besti[i] = kbase + j;
      }
    }
}
#endif

using MicroFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, int64_t*);
constexpr MicroFn kMicro[MR + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                    micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

}  // namespace

void codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, Metric metric,
                 int64_t* out, int num_threads) {
  if (N <= 0) return;
  const int T = std::max(1, num_threads);
  // bias: (K,) |e|^2 for l2, 0 for cosine; denom: (K,) max(|e|, 1e-12) as F.normalize, cosine only.
  std::vector<float> bias(K), denom;
  if (metric == Metric::kCosine) denom.resize(K);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t k = 0; k < K; ++k) {
    const float* e = codebook + k * D;
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += e[d] * e[d];
    if (metric == Metric::kCosine) {
      denom[k] = std::max(std::sqrt(s), 1e-12f);
      bias[k] = 0.0f;
    } else {
      bias[k] = s;
    }
  }
  const float* denom_p = denom.empty() ? nullptr : denom.data();

  const int64_t row_blocks = (N + MR - 1) / MR;
  const int64_t code_panels = (K + NR - 1) / NR;
  // Few rows: split the codebook across threads too, and merge the partial minima in code order.
  const int64_t splits = row_blocks >= 2 * T ? 1 : std::min<int64_t>(T, code_panels);
  const int64_t row_chunks = std::min<int64_t>(row_blocks, splits == 1 ? 2 * T : 1);
  const int64_t rows_per_chunk = (row_blocks + row_chunks - 1) / row_chunks * MR;
  const int64_t panels_per_split = (code_panels + splits - 1) / splits;
  const int64_t kc = std::max<int64_t>(NR, std::min<int64_t>(1024, (192 * 1024 / (4 * std::max<int64_t>(D, 1))) / NR * NR));

  // best/besti: (splits, N) running minima per code split.
  std::vector<float> best(splits * N, kInf);
  std::vector<int64_t> besti(splits * N, 0);
  const int64_t tasks = row_chunks * splits;
#pragma omp parallel num_threads(T)
  {
    std::vector<float> packed(kc * D);   // (kc / NR, D, NR)
    std::vector<float> bias_blk(kc);     // (kc,) bias of the block, +inf past its end
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t s = t % splits, rc = t / splits;
      const int64_t r0 = rc * rows_per_chunk, r1 = std::min(N, r0 + rows_per_chunk);
      const int64_t k_begin = std::min(K, s * panels_per_split * NR);
      const int64_t k_end = std::min(K, k_begin + panels_per_split * NR);
      float* bs = best.data() + s * N;
      int64_t* bi = besti.data() + s * N;
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kc) {
        const int64_t kcur = std::min(kc, k_end - k0);
        const int64_t panels = (kcur + NR - 1) / NR;
        pack_block(codebook, D, k0, kcur, denom_p, packed.data());
        for (int64_t j = 0; j < panels * NR; ++j) bias_blk[j] = j < kcur ? bias[k0 + j] : kInf;
        for (int64_t r = r0; r < r1; r += MR) {
          const MicroFn fn = kMicro[std::min<int64_t>(MR, r1 - r)];
          for (int64_t p = 0; p < panels; ++p)
            fn(z + r * D, D, packed.data() + p * D * NR, bias_blk.data() + p * NR, k0 + p * NR, bs + r, bi + r);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      float b = best[n];
      int64_t i = besti[n];
      for (int64_t s = 1; s < splits; ++s)
        if (best[s * N + n] < b) {
          b = best[s * N + n];
          i = besti[s * N + n];
        }
      out[n] = i;
    }
  }
}

}  // namespace cpu
}  // namespace mage_fast
