// Codebook nearest neighbour on the CPU: blocked distance products with a fused running argmin.
//
// A task owns NR-row panels of z (packed (D, NR), so one vector load gives one d for 16 rows) and
// a range of codes. It streams the codes (row-major, unpacked) in L2-sized blocks through an
// MR-codes x NR-rows register tile (AVX2 FMA: 12 accumulators). The tile's epilogue turns its
// dot products into distances and folds them lane-wise into each row's running (min, argmin),
// codes in increasing order with a strict `<`, so ties go to the lowest index. No (N, K) matrix:
// extra memory is the tasks' packed rows (N x D in all, freed per task) and O(N) partial minima.
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

constexpr int MR = 6;                     // codes per register tile (broadcast side)
constexpr int NR = 16;                    // z rows per packed panel (two 8-lane vectors)
constexpr int64_t kPanelsPerTask = 4;     // 64 rows of z per task
constexpr float kInf = std::numeric_limits<float>::infinity();

// zp: (D, NR) <- rows [r0, r0 + rows) of z (N, D), zero lanes past `rows`.
void pack_panel(const float* z, int64_t D, int64_t r0, int64_t rows, float* zp) {
  for (int64_t j = 0; j < NR; ++j) {
    if (j >= rows) {
      for (int64_t d = 0; d < D; ++d) zp[d * NR + j] = 0.0f;
      continue;
    }
    const float* src = z + (r0 + j) * D;
    for (int64_t d = 0; d < D; ++d) zp[d * NR + j] = src[d];
  }
}

// cb: M code rows at stride D; zp: (D, NR) packed rows; coef: (M,) |e|^2 (l2) or max(|e|, eps)
// (cosine); best, besti: (NR,) running minimum distance of each row and its code index.
// Distance: l2 |e|^2 - 2 z.e (|z|^2 dropped: same for every code); cosine -(z.e / |e|).
#if MF_AVX2
template <int M, bool COS>
inline void micro_kernel(const float* cb, int64_t D, const float* zp, const float* coef, int32_t kbase, float* best,
                         int32_t* besti) {
  __m256 acc0[M], acc1[M];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 z0 = _mm256_loadu_ps(zp + d * NR);
    const __m256 z1 = _mm256_loadu_ps(zp + d * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
      const __m256 e = _mm256_broadcast_ss(cb + i * D + d);
      acc0[i] = _mm256_fmadd_ps(e, z0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(e, z1, acc1[i]);
    }
  }
  __m256 b0 = _mm256_loadu_ps(best), b1 = _mm256_loadu_ps(best + 8);
  __m256 i0 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(besti)));
  __m256 i1 = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(besti + 8)));
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    const __m256 c = _mm256_set1_ps(coef[i]);
    __m256 d0, d1;
    if constexpr (COS) {
      d0 = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_div_ps(acc0[i], c));
      d1 = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_div_ps(acc1[i], c));
    } else {
      const __m256 m2 = _mm256_set1_ps(-2.0f);
      d0 = _mm256_fmadd_ps(m2, acc0[i], c);
      d1 = _mm256_fmadd_ps(m2, acc1[i], c);
    }
    const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(kbase + i));
    const __m256 lt0 = _mm256_cmp_ps(d0, b0, _CMP_LT_OQ), lt1 = _mm256_cmp_ps(d1, b1, _CMP_LT_OQ);
    b0 = _mm256_blendv_ps(b0, d0, lt0);
    b1 = _mm256_blendv_ps(b1, d1, lt1);
    i0 = _mm256_blendv_ps(i0, k, lt0);
    i1 = _mm256_blendv_ps(i1, k, lt1);
  }
  _mm256_storeu_ps(best, b0);
  _mm256_storeu_ps(best + 8, b1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(besti), _mm256_castps_si256(i0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(besti + 8), _mm256_castps_si256(i1));
}
#else
template <int M, bool COS>
inline void micro_kernel(const float* cb, int64_t D, const float* zp, const float* coef, int32_t kbase, float* best,
                         int32_t* besti) {
  float acc[M][NR] = {};
  for (int64_t d = 0; d < D; ++d)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += cb[i * D + d] * zp[d * NR + j];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NR; ++j) {
      const float dist = COS ? 0.0f - acc[i][j] / coef[i] : coef[i] - 2.0f * acc[i][j];
      if (dist < best[j]) {
        best[j] = dist;
        besti[j] = kbase + i;
      }
    }
}
#endif

using MicroFn = void (*)(const float*, int64_t, const float*, const float*, int32_t, float*, int32_t*);
template <bool COS>
constexpr MicroFn kMicro[MR + 1] = {nullptr,
                                    micro_kernel<1, COS>,
                                    micro_kernel<2, COS>,
                                    micro_kernel<3, COS>,
                                    micro_kernel<4, COS>,
                                    micro_kernel<5, COS>,
                                    micro_kernel<6, COS>};

}  // namespace

void codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, Metric metric,
                 int64_t* out, int num_threads) {
  if (N <= 0 || K <= 0) return;
  const bool cosine = metric == Metric::kCosine;
  const MicroFn* micro = cosine ? kMicro<true> : kMicro<false>;
  const int64_t rows_per_task = kPanelsPerTask * NR;
  const int64_t row_tasks = (N + rows_per_task - 1) / rows_per_task;
  // A thread per 2^26 multiply-adds at least (~1 ms): on a busy machine a fork-join region costs
  // a scheduler time slice, so small calls stay on one thread. Few rows: split the codebook too.
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, (N * K * D) >> 26)));
  const int64_t splits = row_tasks >= 2 * T ? 1 : std::max<int64_t>(1, std::min<int64_t>(T, K / 1024));
  const int64_t kc = std::max<int64_t>(MR, (256 * 1024 / (4 * std::max<int64_t>(D, 1))) / MR * MR);

  // coef: (K,) |e|^2 (l2) or max(|e|, 1e-12) (cosine, as F.normalize)
  std::vector<float> coef(K);
  // best, besti: (splits, N) running minima per code split
  std::vector<float> best(splits * N, kInf);
  std::vector<int32_t> besti(splits * N, 0);
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      const float* e = codebook + k * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += e[d] * e[d];
      coef[k] = cosine ? std::max(std::sqrt(s), 1e-12f) : s;
    }
    std::vector<float> zp(kPanelsPerTask * D * NR);  // (panels, D, NR) this task's packed rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < row_tasks * splits; ++t) {
      const int64_t s = t % splits, r0 = (t / splits) * rows_per_task;
      const int64_t rows = std::min(rows_per_task, N - r0), panels = (rows + NR - 1) / NR;
      const int64_t k_begin = K * s / splits, k_end = K * (s + 1) / splits;
      for (int64_t p = 0; p < panels; ++p)
        pack_panel(z, D, r0 + p * NR, std::min<int64_t>(NR, rows - p * NR), zp.data() + p * D * NR);
      float pb[kPanelsPerTask * NR];      // (panels, NR)
      int32_t pi[kPanelsPerTask * NR];    // (panels, NR)
      std::fill(pb, pb + kPanelsPerTask * NR, kInf);
      std::fill(pi, pi + kPanelsPerTask * NR, static_cast<int32_t>(k_begin));
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kc) {
        const int64_t k1 = std::min(k_end, k0 + kc);
        for (int64_t p = 0; p < panels; ++p)
          for (int64_t k = k0; k < k1; k += MR)
            micro[std::min<int64_t>(MR, k1 - k)](codebook + k * D, D, zp.data() + p * D * NR, coef.data() + k,
                                                 static_cast<int32_t>(k), pb + p * NR, pi + p * NR);
      }
      for (int64_t r = 0; r < rows; ++r) {
        best[s * N + r0 + r] = pb[r];
        besti[s * N + r0 + r] = pi[r];
      }
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      float b = best[n];
      int32_t i = besti[n];
      for (int64_t s = 1; s < splits; ++s)
        if (best[s * N + n] < b) {  // splits in code order: a tie keeps the lower index
          b = best[s * N + n];
          i = besti[s * N + n];
        }
      out[n] = i;
    }
  }
}

}  // namespace cpu
}  // namespace mage_fast
