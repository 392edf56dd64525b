// Codebook nearest neighbour on the CPU, in two paths that give the same answer.
//
// fp32 path (reference speed; small calls, large D, non-AVX2 builds, rows the int16 path gives up
// on): a task owns NR-row panels of z (packed (D, NR), so one vector load gives one d for 16
// rows) and streams the codes in L2-sized blocks through an MR-codes x NR-rows AVX2 FMA register
// tile whose epilogue folds the distances lane-wise into each row's running (min, argmin); codes
// in increasing order with a strict `<`, so ties go to the lowest index.
//
// int16 path (the fast one): AVX2 without VNNI does 16 int16 multiply-adds per `vpmaddwd` against
// 8 per fp32 FMA, so the full K x N scan runs on integers and only a handful of (row, code) pairs
// per row are scored in fp32:
//  * every z row and every code is quantised with its own scale s = max|x| / Q to |q| <= Q, where
//    Q = floor(sqrt((2^31 - 1) / D)) (at most 32767): D products of two such values cannot
//    overflow the int32 accumulators of vpmaddwd + vpaddd. D > kMaxIntD (Q < 512) -> fp32 path.
//  * with exact integer S = qz.qe, |z.e - sz se S| <= h (se |z|_1 + sz se |qe|_1) (h = 1/2 plus the
//    rounding of the quantiser), which turns S into a rigorous lower bound y of each distance
//    (l2: |e|^2 - 2 z.e; cosine: -(z.e / max(|e|, 1e-12))).
//  * each row keeps its best fp32-scored distance f. A code's own allowance R_k (bounding the fp32
//    rounding of its scored distance, and of y) is folded into y (per-code part), into the row's
//    threshold f + R (per-row part) and into the |z|_1 term (cross part). A (row, code) whose y
//    exceeds the threshold cannot equal or beat f in fp32; the others are scored in fp32 at once
//    (a strict `<` in increasing code order keeps ties on the lowest index). Speed: vpmaddwd +
//    vpaddd move 192 multiply-adds in ~8 cycles where the fp32 FMA tile moves 96 in ~6-7.
//  * candidates per row: ~ln(K) running records plus the codes within the bound's width of the
//    minimum: ~12 of 16384 on Gaussian data (D = 256), ~50 on clustered codes.
//  * the candidate count per row is capped (64 + K / 128): a row that reaches it (duplicated codes,
//    lattice data with exact ties, huge dynamic range inside a vector) and rows whose scale is out
//    of range (zero, < 2^-40, > 2^40) are redone on the fp32 path, as is the whole call when a code
//    is non-finite or out of range. So the answer never depends on the data: it is the fp32
//    argmin (within fp32 rounding, as any fp32 evaluation order) with ties to the lowest index.
// Work split: tasks are code blocks (L2-sized; the task reads each code once for |e|^2, max|e| and
// its quantisation into a per-thread buffer, tiled (D/2, 6) so a register tile's broadcasts are
// contiguous); every task scans all rows, each thread keeps its own per-row state, merged at the
// end (ties across threads -> lower index).
// Extra memory: z quantised once (N x D int16, half of z), O(N) per-row state per thread, O(K)
// per-code scalars and a per-thread L2-sized int16 code block. No (N, K) matrix, no K x D copy.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

std::atomic<int> g_mode{0};  // 0: auto, 1: fp32 path only (tests, benchmarks)
std::atomic<int64_t> g_stat_path{0}, g_stat_fallback_rows{0}, g_stat_scored{0};

// zp: (D, NR) <- rows idx[0 .. rows) of z (N, D) (idx null: r0 + j), zero lanes past `rows`.
void pack_panel(const float* z, int64_t D, const int64_t* idx, int64_t r0, int64_t rows, float* zp) {
  for (int64_t j = 0; j < NR; ++j) {
    if (j >= rows) {
      for (int64_t d = 0; d < D; ++d) zp[d * NR + j] = 0.0f;
      continue;
    }
    const float* src = z + (idx ? idx[r0 + j] : r0 + j) * D;
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

// coef[k] = |e_k|^2 (l2) or max(|e_k|, 1e-12) (cosine, as F.normalize), in the one summation order
// both paths use.
inline float sum_squares(const float* e, int64_t D) {
  int64_t d = 0;
  float s = 0.0f;
#if MF_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    const __m256 x0 = _mm256_loadu_ps(e + d), x1 = _mm256_loadu_ps(e + d + 8);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
  for (; d < D; ++d) s += e[d] * e[d];
  return s;
}

// sum_squares(e, D) (the same value, bit for bit) and max |e_d| in one pass.
inline float sum_squares_max_abs(const float* e, int64_t D, float* maxabs) {
  int64_t d = 0;
  float s = 0.0f, m = 0.0f;
#if MF_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), m0 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    const __m256 x0 = _mm256_loadu_ps(e + d), x1 = _mm256_loadu_ps(e + d + 8);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    m0 = _mm256_max_ps(m0, _mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)));
  }
  alignas(32) float t[8], u[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  _mm256_store_ps(u, m0);
  s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (int i = 0; i < 8; ++i) m = std::max(m, u[i]);
#endif
  for (; d < D; ++d) {
    s += e[d] * e[d];
    m = std::max(m, std::fabs(e[d]));
  }
  *maxabs = m;
  return s;
}

inline float code_coef(float sumsq, bool cosine) { return cosine ? std::max(std::sqrt(sumsq), 1e-12f) : sumsq; }

// fp32 path over the rows idx[0 .. n) (idx null: rows 0 .. n) of z: out[row] = nearest code.
// coef: (K,) from code_coef.
void nn_fp32(const float* z, const float* codebook, const int64_t* idx, int64_t n, int64_t K, int64_t D, bool cosine,
             const float* coef, int64_t* out, int T) {
  if (n <= 0) return;
  const MicroFn* micro = cosine ? kMicro<true> : kMicro<false>;
  const int64_t rows_per_task = kPanelsPerTask * NR;
  const int64_t row_tasks = (n + rows_per_task - 1) / rows_per_task;
  T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(T, (n * K * D) >> 26)));
  const int64_t splits = row_tasks >= 2 * T ? 1 : std::max<int64_t>(1, std::min<int64_t>(T, K / 1024));
  const int64_t kc = std::max<int64_t>(MR, (256 * 1024 / (4 * std::max<int64_t>(D, 1))) / MR * MR);
  // best, besti: (splits, n) running minima per code split
  std::vector<float> best(splits * n, kInf);
  std::vector<int32_t> besti(splits * n, 0);
#pragma omp parallel num_threads(T)
  {
    std::vector<float> zp(kPanelsPerTask * D * NR);  // (panels, D, NR) this task's packed rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < row_tasks * splits; ++t) {
      const int64_t s = t % splits, r0 = (t / splits) * rows_per_task;
      const int64_t rows = std::min(rows_per_task, n - r0), panels = (rows + NR - 1) / NR;
      const int64_t k_begin = K * s / splits, k_end = K * (s + 1) / splits;
      for (int64_t p = 0; p < panels; ++p)
        pack_panel(z, D, idx, r0 + p * NR, std::min<int64_t>(NR, rows - p * NR), zp.data() + p * D * NR);
      float pb[kPanelsPerTask * NR];      // (panels, NR)
      int32_t pi[kPanelsPerTask * NR];    // (panels, NR)
      std::fill(pb, pb + kPanelsPerTask * NR, kInf);
      std::fill(pi, pi + kPanelsPerTask * NR, static_cast<int32_t>(k_begin));
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kc) {
        const int64_t k1 = std::min(k_end, k0 + kc);
        for (int64_t p = 0; p < panels; ++p)
          for (int64_t k = k0; k < k1; k += MR)
            micro[std::min<int64_t>(MR, k1 - k)](codebook + k * D, D, zp.data() + p * D * NR, coef + k,
                                                 static_cast<int32_t>(k), pb + p * NR, pi + p * NR);
      }
      for (int64_t r = 0; r < rows; ++r) {
        best[s * n + r0 + r] = pb[r];
        besti[s * n + r0 + r] = pi[r];
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float b = best[r];
      int32_t i = besti[r];
      for (int64_t s = 1; s < splits; ++s)
        if (best[s * n + r] < b) {  // splits in code order: a tie keeps the lower index
          b = best[s * n + r];
          i = besti[s * n + r];
        }
      out[idx ? idx[r] : r] = i;
    }
  }
}

#if MF_AVX2
constexpr int64_t kMaxIntD = 8190;  // Q = floor(sqrt((2^31 - 1) / D)) >= 512
constexpr int64_t kMinIntRows = 32;  // fewer rows: quantising the codebook costs about what it saves
constexpr float kMinScale = 0x1p-40f, kMaxScale = 0x1p40f;  // per-vector max|x| range of the int16 path

// Exact fp32 distance of one (row, code) pair: 32-lane blocked dot product, fixed order.
inline float exact_distance(const float* z, const float* e, int64_t D, float coef, bool cosine) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(z + d), _mm256_loadu_ps(e + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(z + d + 8), _mm256_loadu_ps(e + d + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(z + d + 16), _mm256_loadu_ps(e + d + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(z + d + 24), _mm256_loadu_ps(e + d + 24), a3);
  }
  for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(z + d), _mm256_loadu_ps(e + d), a0);
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float dot = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; d < D; ++d) dot = std::fma(z[d], e[d], dot);
  return cosine ? 0.0f - dot / coef : std::fma(-2.0f, dot, coef);
}

// Quantises n floats at scale inv (q = round(x * inv), |q| <= Q by construction) to int16; returns sum |q|.
inline int64_t quantize(const float* x, int64_t n, float inv, int16_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i sabs = _mm256_setzero_si256();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + d), vinv));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + d + 8), vinv));
    sabs = _mm256_add_epi32(sabs, _mm256_add_epi32(_mm256_abs_epi32(q0), _mm256_abs_epi32(q1)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + d),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8));
  }
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), sabs);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += t[i];
  for (; d < n; ++d) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[d] * inv));
    q[d] = static_cast<int16_t>(v);
    s += v < 0 ? -v : v;
  }
  return s;
}

inline float max_abs(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + d)));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = 0.0f;
  for (int i = 0; i < 8; ++i) r = std::max(r, t[i]);
  for (; d < n; ++d) r = std::max(r, std::fabs(x[d]));
  return r;
}

// Per-code constants of the lower bound y = c0 - a (sz S + hz1) - b sz (see int_kernel).
struct CodeBlock {
  std::vector<int16_t> q;   // (kc / MR tiles, Dp / 2, MR, 2) quantised codes (last tile: M < MR), zero padded
  std::vector<int16_t> row;  // (Dp,) one code before tiling
  std::vector<float> c0, a, b;  // (kc,)
};

// S = qe.qz for M codes (cq: tile (Dp/2, M) of int16 pairs) x 16 rows (zq: panel (Dp/2, 16, 2)), then
// y = c0 - a (sz S + hz1) - b sz per (code, row) -> y (M, 16). Returns a nonzero mask when some y
// is not above its row's threshold thr (or is NaN).
template <int M>
inline unsigned int_kernel(const int16_t* cq, int64_t Dp, const int16_t* zq, const float* c0, const float* a,
                           const float* b, const float* sz, const float* hz1, const float* thr, float* y) {
  __m256i acc0[M], acc1[M];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) acc0[i] = acc1[i] = _mm256_setzero_si256();
  const int64_t P = Dp / 2;
  if constexpr (M == 6) {
    // GCC spills accumulators here (12 + 2 z + broadcast + product = all 16 ymm): hand-allocated
    // loop, one product register reused (renamed by the core)
    const int16_t* zp = zq;
    const int16_t* b = cq;
    int64_t n = P / 2, odd = P & 1;
    alignas(32) int32_t accs[12 * 8];  // a0..a5 (rows 0-7), c0..c5 (rows 8-15)
    asm volatile(
        "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"
        "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"
        "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"
        "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"
        "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
        "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
        "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
        "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
        "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
        "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
        "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
        "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
#define MF_CODE(ADDR, A, C)                  \
        "vpbroadcastd " ADDR ", %%ymm14\n\t"   \
        "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t" \
        "vpaddd %%ymm15, %%ymm" #A ", %%ymm" #A "\n\t" \
        "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t" \
        "vpaddd %%ymm15, %%ymm" #C ", %%ymm" #C "\n\t"
#define MF_STEP(Z0, Z1, B0, B1, B2, B3, B4, B5) \
        "vmovdqu " Z0 "(%[zp]), %%ymm12\n\t"    \
        "vmovdqu " Z1 "(%[zp]), %%ymm13\n\t"    \
        MF_CODE(B0 "(%[b])", 0, 6)                \
        MF_CODE(B1 "(%[b])", 1, 7)                \
        MF_CODE(B2 "(%[b])", 2, 8)                \
        MF_CODE(B3 "(%[b])", 3, 9)                \
        MF_CODE(B4 "(%[b])", 4, 10)               \
        MF_CODE(B5 "(%[b])", 5, 11)
        "test %[odd], %[odd]\n\t"  // odd P: one pair first, then two per trip
        "jz 3f\n\t"
        MF_STEP("0", "32", "0", "4", "8", "12", "16", "20")
        "add $64, %[zp]\n\t"
        "add $24, %[b]\n\t"
        "3:\n\t"
        "test %[n], %[n]\n\t"
        "jle 2f\n\t"
        "1:\n\t"
        MF_STEP("0", "32", "0", "4", "8", "12", "16", "20")
        MF_STEP("64", "96", "24", "28", "32", "36", "40", "44")
#undef MF_STEP
#undef MF_CODE
        "add $128, %[zp]\n\t"
        "add $48, %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "2:\n\t"
        "vmovdqa %%ymm0, 0(%[o])\n\t"
        "vmovdqa %%ymm1, 32(%[o])\n\t"
        "vmovdqa %%ymm2, 64(%[o])\n\t"
        "vmovdqa %%ymm3, 96(%[o])\n\t"
        "vmovdqa %%ymm4, 128(%[o])\n\t"
        "vmovdqa %%ymm5, 160(%[o])\n\t"
        "vmovdqa %%ymm6, 192(%[o])\n\t"
        "vmovdqa %%ymm7, 224(%[o])\n\t"
        "vmovdqa %%ymm8, 256(%[o])\n\t"
        "vmovdqa %%ymm9, 288(%[o])\n\t"
        "vmovdqa %%ymm10, 320(%[o])\n\t"
        "vmovdqa %%ymm11, 352(%[o])\n\t"
        : [zp] "+r"(zp), [b] "+r"(b), [n] "+r"(n)
        : [o] "r"(accs), [odd] "r"(odd)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    for (int i = 0; i < 6; ++i) {
      acc0[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(accs + i * 8));
      acc1[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(accs + 48 + i * 8));
    }
  } else
  for (int64_t j = 0; j < P; ++j) {
    const __m256i z0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zq + j * 32));
    const __m256i z1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zq + j * 32 + 16));
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
      int32_t pair;
      std::memcpy(&pair, cq + (j * M + i) * 2, 4);
      const __m256i e = _mm256_set1_epi32(pair);
      acc0[i] = _mm256_add_epi32(acc0[i], _mm256_madd_epi16(e, z0));
      acc1[i] = _mm256_add_epi32(acc1[i], _mm256_madd_epi16(e, z1));
    }
  }
  const __m256 sz0 = _mm256_loadu_ps(sz), sz1 = _mm256_loadu_ps(sz + 8);
  const __m256 h0 = _mm256_loadu_ps(hz1), h1 = _mm256_loadu_ps(hz1 + 8);
  const __m256 t0 = _mm256_loadu_ps(thr), t1 = _mm256_loadu_ps(thr + 8);
  __m256 any = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    const __m256 vc = _mm256_set1_ps(c0[i]), va = _mm256_set1_ps(a[i]), vb = _mm256_set1_ps(b[i]);
    __m256 y0 = _mm256_fnmadd_ps(va, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc0[i]), sz0, h0), vc);
    __m256 y1 = _mm256_fnmadd_ps(va, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc1[i]), sz1, h1), vc);
    y0 = _mm256_fnmadd_ps(vb, sz0, y0);
    y1 = _mm256_fnmadd_ps(vb, sz1, y1);
    _mm256_storeu_ps(y + i * 16, y0);
    _mm256_storeu_ps(y + i * 16 + 8, y1);
    any = _mm256_or_ps(any, _mm256_or_ps(_mm256_cmp_ps(y0, t0, _CMP_NGT_UQ), _mm256_cmp_ps(y1, t1, _CMP_NGT_UQ)));
  }
  return static_cast<unsigned>(_mm256_movemask_ps(any));
}

using IntFn = unsigned (*)(const int16_t*, int64_t, const int16_t*, const float*, const float*, const float*,
                           const float*, const float*, const float*, float*);
constexpr IntFn kInt[MR + 1] = {nullptr,         int_kernel<1>, int_kernel<2>, int_kernel<3>,
                                int_kernel<4>, int_kernel<5>, int_kernel<6>};

// The int16 path. Returns false (nothing written) when the call must take the fp32 path whole.
bool nn_int16(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, bool cosine, float* coef,
              int64_t* out, int T) {
  const int64_t Dp = (D + 1) & ~int64_t{1}, P = Dp / 2;
  const int32_t Q = std::min<int32_t>(32767, static_cast<int32_t>(std::sqrt(2147483647.0 / double(Dp))));
  const int64_t Np = (N + NR - 1) / NR * NR, panels = Np / NR;
  const int64_t cap = 64 + K / 128;
  // quantiser error per element, in units of the scale: 1/2 + the rounding of x * (Q / max|x|)
  // (2.01 u Q) + the rounding of the scale itself and of |q|_1 (2^-20, generous)
  const float hf = 0.5f + 0x1p-21f * float(Q) + 0x1p-20f;
  // Rounding allowance: a scored distance (32-lane blocked dot, 16-lane blocked |e|^2, one fma)
  // is within (D / 16 + 12) u (|e| + |z|)^2 of its real value (cosine: (D / 16 + 10) u |z|), y
  // within ~8 u of the same scale; rel = (D / 4 + 64) u is over twice their sum. For l2 the
  // allowance R_k = rel (|e_k| + |z|)^2 is split three ways: rel |e_k|^2 into c0, rel |z|^2 into the
  // row's threshold, the cross term 2 rel |e_k| |z| <= 2 se (rel sqrt(D) Q |z|) into hz1.
  const float rel = float(D / 4 + 64) * 0x1p-24f;
  // kc codes per block: ~256 KB of int16, a multiple of MR, at least 4 blocks per thread
  int64_t kc = std::max<int64_t>(MR, (256 * 1024 / (2 * Dp)) / MR * MR);
  kc = std::min<int64_t>(kc, std::max<int64_t>(MR, ((K + 4 * T - 1) / (4 * T) + MR - 1) / MR * MR));
  const int64_t blocks = (K + kc - 1) / kc;

  std::vector<int16_t> zq(panels * P * 32);   // (panels, Dp/2, 16, 2) quantised rows
  std::vector<float> sz(Np, 0.0f), hz1(Np, 0.0f), R(Np, 0.0f);  // (Np,) row scale, h |z|_1, rounding bound
  std::vector<uint8_t> fb(Np, 1);             // (Np,) row goes to the fp32 path
  // per-thread state: (T, Np) best fp32 distance, its code, threshold, candidates scored
  std::vector<float> fbest(T * Np), thr(T * Np);
  std::vector<int32_t> ibest(T * Np), cnt(T * Np);
  std::atomic<int> bad{0};  // a code the int16 path cannot take: the whole call goes to fp32
  int64_t scored = 0, nfb = 0;
#pragma omp parallel num_threads(T) reduction(+ : scored)
  {
    const int tid = omp_get_thread_num();
    {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < Np; ++r) {
        int16_t* dst = zq.data() + (r / NR) * P * 32 + (r % NR) * 2;
        if (r >= N) {
          for (int64_t j = 0; j < P; ++j) dst[j * 32] = dst[j * 32 + 1] = 0;
          continue;
        }
        const float* x = z + r * D;
        const float m = max_abs(x, D);
        double l1 = 0.0, l2 = 0.0;  // double: |z|_1 enters the bound, its own rounding must not
        for (int64_t d = 0; d < D; ++d) {
          l1 += std::fabs(double(x[d]));
          l2 += double(x[d]) * x[d];
        }
        const float zn = float(std::sqrt(l2)) * (1.0f + 0x1p-20f);
        const float rb = cosine ? rel * zn : rel * zn * zn * (1.0f + 0x1p-10f);
        const bool ok = m >= kMinScale && m <= kMaxScale && std::isfinite(zn) && std::isfinite(rb);
        const float inv = ok ? float(Q) / m : 0.0f;  // rows not ok: zeros (never read)
        for (int64_t j = 0; j < P; ++j) {
          const int64_t d = 2 * j;
          dst[j * 32] = static_cast<int16_t>(std::nearbyint(x[d] * inv));
          dst[j * 32 + 1] = d + 1 < D ? static_cast<int16_t>(std::nearbyint(x[d + 1] * inv)) : int16_t{0};
        }
        fb[r] = ok ? 0 : 1;
        sz[r] = ok ? m / float(Q) : 0.0f;
        const float cross = cosine ? 0.0f : rel * std::sqrt(float(Dp)) * float(Q) * zn * (1.0f + 0x1p-10f);
        hz1[r] = ok ? hf * float(l1) * (1.0f + 0x1p-20f) + cross : 0.0f;
        R[r] = ok ? rb : 0.0f;
      }
      float* tb = fbest.data() + tid * Np;
      float* tt = thr.data() + tid * Np;
      int32_t* ti = ibest.data() + tid * Np;
      int32_t* tc = cnt.data() + tid * Np;
      for (int64_t r = 0; r < Np; ++r) {
        tb[r] = kInf;
        ti[r] = 0;
        tc[r] = 0;
        tt[r] = r < N && !fb[r] ? kInf : -kInf;  // -inf: the row never asks for scoring
      }
      CodeBlock cb;
      cb.q.resize(kc * Dp);
      cb.row.resize(Dp);
      cb.c0.resize(kc);
      cb.a.resize(kc);
      cb.b.resize(kc);
      alignas(32) float y[MR * NR];
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        if (bad.load(std::memory_order_relaxed)) continue;
        const int64_t k0 = blk * kc, k1 = std::min(K, k0 + kc);
        bool block_ok = true;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i = k - k0;
          const float* e = codebook + k * D;
          float m;
          const float ss = sum_squares_max_abs(e, D, &m);
          if (!std::isfinite(ss) || !(m == 0.0f || (m >= kMinScale && m <= kMaxScale))) {
            block_ok = false;
            break;
          }
          coef[k] = code_coef(ss, cosine);
          const float inv = m > 0.0f ? float(Q) / m : 0.0f, sc = m / float(Q);
          int16_t* q = cb.row.data();
          const int64_t l1 = quantize(codebook + k * D, D, inv, q);
          if (Dp > D) q[D] = 0;
          {  // into its tile: pair j of code ii at (j * Mt + ii)
            const int64_t t0 = i / MR * MR, Mt = std::min<int64_t>(MR, k1 - k0 - t0), ii = i - t0;
            int32_t* tile = reinterpret_cast<int32_t*>(cb.q.data() + t0 * Dp);
            for (int64_t j = 0; j < P; ++j) std::memcpy(tile + j * Mt + ii, q + 2 * j, 4);
          }
          const float g = hf * sc * float(l1);
          if (cosine) {  // y = -(sc sz S + h sc |z|_1 + h sz sc |qe|_1) / coef
            cb.c0[i] = 0.0f;
            cb.a[i] = sc / coef[k];
            cb.b[i] = g / coef[k];
          } else {  // y = coef - 2 (sc sz S + h sc |z|_1 + h sz sc |qe|_1), less R's |e|^2 part
            cb.c0[i] = coef[k] - rel * coef[k] * (1.0f + 0x1p-10f);
            cb.a[i] = 2.0f * sc;
            cb.b[i] = 2.0f * g;
          }
        }
        if (!block_ok) {
          bad.store(1);
          continue;
        }
        for (int64_t p = 0; p < panels; ++p) {
          const int16_t* zp = zq.data() + p * P * 32;
          const int64_t r0 = p * NR;
          bool live = false;  // a panel whose rows all gave up (or are padding) is not scanned again
          for (int64_t j = 0; j < NR; ++j) live |= tt[r0 + j] != -kInf;
          if (!live) continue;
          for (int64_t k = k0; k < k1; k += MR) {
            const int64_t i = k - k0, M = std::min<int64_t>(MR, k1 - k);
            if (!kInt[M](cb.q.data() + i * Dp, Dp, zp, cb.c0.data() + i, cb.a.data() + i, cb.b.data() + i,
                         sz.data() + r0, hz1.data() + r0, tt + r0, y))
              continue;
            for (int64_t c = 0; c < M; ++c)  // increasing code order: strict < keeps the lowest index
              for (int64_t j = 0; j < NR; ++j) {
                const int64_t r = r0 + j;
                if (y[c * NR + j] > tt[r]) continue;  // NaN y falls through to scoring
                if (r >= N || fb[r] || tt[r] == -kInf) continue;
                if (++tc[r] > cap) {
                  tt[r] = -kInf;
                  continue;
                }
                ++scored;
                const float f = exact_distance(z + r * D, codebook + (k + c) * D, D, coef[k + c], cosine);
                if (f < tb[r]) {
                  tb[r] = f;
                  ti[r] = static_cast<int32_t>(k + c);
                  tt[r] = f + R[r];
                }
              }
          }
        }
      }
      // merge the threads' minima (threads saw their blocks in increasing order; ties -> lower index)
#pragma omp for schedule(static) reduction(+ : nfb)
      for (int64_t r = 0; r < N; ++r) {
        bool give_up = fb[r] != 0;
        float b = kInf;
        int32_t bi = std::numeric_limits<int32_t>::max();
        for (int t = 0; t < T; ++t) {
          const int64_t o = t * Np + r;
          if (cnt[o] > cap) give_up = true;
          if (cnt[o] == 0) continue;  // this thread ran no block, or scored nothing for the row
          if (fbest[o] < b || (fbest[o] == b && ibest[o] < bi)) {
            b = fbest[o];
            bi = ibest[o];
          }
        }
        if (give_up || bi == std::numeric_limits<int32_t>::max()) {
          fb[r] = 1;
          ++nfb;
        } else {
          out[r] = bi;
        }
      }
    }
  }
  if (bad.load()) return false;
  // rows for the fp32 path: the out-of-range ones and those whose candidate count hit the cap
  std::vector<int64_t> rows;
  rows.reserve(nfb);
  for (int64_t r = 0; r < N; ++r)
    if (fb[r]) rows.push_back(r);
  nn_fp32(z, codebook, rows.data(), static_cast<int64_t>(rows.size()), K, D, cosine, coef, out, T);
  g_stat_path = 1;
  g_stat_fallback_rows = static_cast<int64_t>(rows.size());
  g_stat_scored = scored;
  return true;
}
#endif

}  // namespace

void codebook_nn(const float* z, const float* codebook, int64_t N, int64_t K, int64_t D, Metric metric,
                 int64_t* out, int num_threads) {
  if (N <= 0 || K <= 0) return;
  const bool cosine = metric == Metric::kCosine;
  // A thread per 2^26 multiply-adds at least (~1 ms): on a busy machine a fork-join region costs
  // a scheduler time slice, so small calls stay on one thread.
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, (N * K * D) >> 26)));
  std::vector<float> coef(K);  // (K,) code_coef of every code
#if MF_AVX2
  if (g_mode.load() == 0 && N >= kMinIntRows && D <= kMaxIntD &&
      nn_int16(z, codebook, N, K, D, cosine, coef.data(), out, T))
    return;
#endif
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t k = 0; k < K; ++k) coef[k] = code_coef(sum_squares(codebook + k * D, D), cosine);
  nn_fp32(z, codebook, nullptr, N, K, D, cosine, coef.data(), out, T);
  g_stat_path = 0;
  g_stat_fallback_rows = N;
  g_stat_scored = 0;
}

void codebook_nn_set_mode(int mode) { g_mode = mode; }

CodebookNNStats codebook_nn_last_stats() {
  return {g_stat_path.load(), g_stat_fallback_rows.load(), g_stat_scored.load()};
}

}  // namespace cpu
}  // namespace mage_fast
