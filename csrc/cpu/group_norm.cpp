// GroupNorm, optionally followed by SiLU, over channels-last fp32 images: the VQGAN decoder's
// "norm, then swish" before every convolution, in two passes over memory instead of five (torch's
// group_norm reads twice and writes once, then silu reads and writes again). On the decoder's
// 256 x 256 x 128 activations both are bandwidth- or exp-bound, not arithmetic-bound.
//
// Pass 1 sums x and x^2 per channel in double over blocks of pixels (parallel), then per group;
// pass 2 writes y = (x - mean) * (rstd * gamma) + beta, and y * sigmoid(y) when asked. The exp of
// the sigmoid is a branch-free polynomial (below), written out for 8 AVX2 lanes (GCC would not
// vectorise the scalar form: it turns the clamp into branches), within 3e-7 relative of exp.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mage_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 512;  // pixels per work item: 512 x C floats, a few hundred KiB at C = 128

// exp(x) for x in [-86.6, 88.7] (clamped outside, where sigmoid is 0 or 1 to fp32 anyway): x = n ln2 + r,
// |r| <= ln2 / 2, with ln2 split in two (Cody & Waite) so n ln2 is exact, e^r by its degree-6 minimax
// polynomial (the classic Cephes coefficients), 2^n built in the exponent bits.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -86.6f), 88.7f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  // n in [-125, 128]: 2^n = 2 * 2^(n-1), the latter as exponent bits (2^128 itself is not a float; at the
  // upper clamp 2 * 2^127 * p, p < 1, still is)
  const int32_t e = static_cast<int32_t>(n) + 126;
  return 2.f * p * std::bit_cast<float>(e << 23);
}

#if defined(__AVX2__)
// exp_poly on 8 lanes, the same operations in the same order (no fused multiply-adds, as the scalar code
// is compiled), so a row's vector body and scalar tail agree bit for bit.
inline __m256 exp_poly8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-86.6f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_floor_ps(
      _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(126)), 23);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.f), p), _mm256_castsi256_ps(e));
}
#endif

// One pixel's C channels: y = (x - mean) * scale + beta, then y * sigmoid(y) when kSiLU.
template <bool kSiLU>
inline void apply_pixel(const float* xp, const float* mean, const float* scale, const float* beta, float* yp,
                        int64_t C) {
  int64_t c = 0;
#if defined(__AVX2__)
  for (; c + 8 <= C; c += 8) {
    __m256 v = _mm256_add_ps(
        _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xp + c), _mm256_loadu_ps(mean + c)), _mm256_loadu_ps(scale + c)),
        _mm256_loadu_ps(beta + c));
    if constexpr (kSiLU) {
      const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp_poly8(_mm256_sub_ps(_mm256_setzero_ps(), v)));
      v = _mm256_div_ps(v, d);
    }
    _mm256_storeu_ps(yp + c, v);
  }
#endif
  for (; c < C; ++c) {
    const float v = (xp[c] - mean[c]) * scale[c] + beta[c];
    if constexpr (kSiLU) {
      yp[c] = v / (1.f + exp_poly(-v));
    } else {
      yp[c] = v;
    }
  }
}

template <bool kSiLU>
void apply_block(const float* x, int64_t pixels, int64_t C, const float* mean, const float* scale,
                 const float* beta, float* y) {
  for (int64_t p = 0; p < pixels; ++p) apply_pixel<kSiLU>(x + p * C, mean, scale, beta, y + p * C, C);
}

}  // namespace

float exp_approx(float x) { return exp_poly(x); }

void group_norm_nhwc(const float* x, int64_t N, int64_t HW, int64_t C, int64_t G, const float* gamma,
                     const float* beta, float eps, bool silu, float* y, int num_threads) {
  if (N == 0 || C == 0) return;
  const int64_t blocks = (HW + kBlock - 1) / kBlock, items = N * blocks, cg = C / G;
  // pass 1: per (image, block) per-channel sums of x and x^2, in double
  std::vector<double> part(static_cast<size_t>(std::max<int64_t>(items, 1) * 2 * C), 0.0);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t n = it / blocks, p0 = (it % blocks) * kBlock, p1 = std::min(HW, p0 + kBlock);
    double* s = part.data() + it * 2 * C;
    double* q = s + C;
    for (int64_t p = p0; p < p1; ++p) {
      const float* xp = x + (n * HW + p) * C;
      for (int64_t c = 0; c < C; ++c) {
        const double v = xp[c];
        s[c] += v;
        q[c] += v * v;
      }
    }
  }
  // per image and group: mean and 1/sqrt(var + eps), spread to per-channel shift and scale
  std::vector<float> mean(static_cast<size_t>(N * C)), scale(static_cast<size_t>(N * C));
  const double count = static_cast<double>(HW * cg);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0, q = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        const double* pb = part.data() + (n * blocks + b) * 2 * C;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          s += pb[c];
          q += pb[C + c];
        }
      }
      const double m = count > 0 ? s / count : 0.0;
      const double var = count > 0 ? std::max(q / count - m * m, 0.0) : 0.0;
      const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        mean[n * C + c] = static_cast<float>(m);
        scale[n * C + c] = static_cast<float>(rstd * gamma[c]);
      }
    }
  }
  // pass 2: normalise (and SiLU) block by block
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t n = it / blocks, p0 = (it % blocks) * kBlock, p1 = std::min(HW, p0 + kBlock);
    const float* xb = x + (n * HW + p0) * C;
    float* yb = y + (n * HW + p0) * C;
    if (silu) {
      apply_block<true>(xb, p1 - p0, C, mean.data() + n * C, scale.data() + n * C, beta, yb);
    } else {
      apply_block<false>(xb, p1 - p0, C, mean.data() + n * C, scale.data() + n * C, beta, yb);
    }
  }
}

}  // namespace cpu
}  // namespace mage_fast
