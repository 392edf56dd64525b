// The elementwise passes of the CPU training attention (mage_fast/ops/attention.py), one pass over
// memory each where torch would make five to eight: the softmax weights rebuilt from the scores and
// their row log-sum-exp (with dropout), and the scores' gradient. The matrix products stay in oneDNN.
//
//   attn_probs:   p = exp(scale * s - lse) (fp32, optional), pd = dropout(p) in the output dtype
//   attn_dscores: ds = p * (dropout(dp) - delta) * scale
//
// Dropout decisions are those of csrc/cpu/dropout.cpp (cpu/dropout_hash.h) at element index offset + row * K + column,
// so the weights of the forward, the backward's rebuilt weights and the gradient agree. Scores,
// products and outputs are fp32 or bf16 (uint16 storage); rows are contiguous, K wide.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/rng.h"
#include "cpu/dropout_hash.h"
#include "cpu/kernels.h"

namespace mage_fast {
namespace cpu {
namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// exp(x) for x <= 88 (the arguments here are <= 0 up to rounding), written so that loops over it
// vectorise (no branch, no float-to-int conversion, no std::max): x = n ln2 + r with n = round(x / ln2)
// read from the mantissa of x / ln2 + 1.5 * 2^23, ln2 split in two (Cody-Waite), e^r by the degree-6
// Cephes polynomial, 2^n in the exponent bits. Below -87 the result is 0 (under fp32's normal range);
// NaN stays NaN.
inline float exp_neg(float x) {
  const uint32_t keep = 0u - static_cast<uint32_t>(!(x < -87.0f));  // all ones unless x < -87
  uint32_t xb;
  std::memcpy(&xb, &x, 4);
  xb = (xb & keep) | (0xC2AE0000u & ~keep);  // -87.0f where x is below it
  std::memcpy(&x, &xb, 4);
  const float kf = x * 1.44269504088896341f + 12582912.0f;
  const float n = kf - 12582912.0f;
  uint32_t kb;
  std::memcpy(&kb, &kf, 4);
  const int32_t ni = static_cast<int32_t>(kb - 0x4B400000u);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * (r * r) + r + 1.0f;
  const uint32_t e = (static_cast<uint32_t>(ni + 127) << 23) & keep;  // 2^n, or 0 below -87
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return q * two_n;
}

template <typename S, typename PD>
void probs_impl(const S* s, const float* lse, int64_t M, int64_t K, float scale, double p_drop, uint64_t seed,
                uint64_t offset, float* p, PD* pd, int num_threads) {
  const uint32_t threshold = dropout_threshold(p_drop);
  const float keep_scale = p_drop > 0 ? static_cast<float>(1.0 / (1.0 - p_drop)) : 1.0f;
  const bool drop = p_drop > 0;
  const uint32_t key = dropout_key(seed);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * K > 65536)
  for (int64_t m = 0; m < M; ++m) {
    const S* sr = s + m * K;
    float* pr = p ? p + m * K : nullptr;
    PD* dr = pd + m * K;
    const float l = lse[m];
    const uint64_t g0 = offset + static_cast<uint64_t>(m * K);
    if (!drop) {
      if (pr) {
        for (int64_t k = 0; k < K; ++k) {
          const float v = exp_neg(load(sr, k) * scale - l);
          pr[k] = v;
          store(dr, k, v);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) store(dr, k, exp_neg(load(sr, k) * scale - l));
      }
      continue;
    }
    int64_t k = 0;
    while (k < K) {  // stretches within one 2^32 block of the index share the row hash (dropout.cpp)
      const uint64_t g = g0 + static_cast<uint64_t>(k);
      const uint32_t row = mix32(key + static_cast<uint32_t>(g >> 32));
      const int64_t end = std::min<int64_t>(K, k + static_cast<int64_t>(0x100000000ull - (g & 0xFFFFFFFFull)));
      const uint32_t base = static_cast<uint32_t>(g);
      if (pr) {
        for (int64_t j = k; j < end; ++j) {
          const float v = exp_neg(load(sr, j) * scale - l);
          pr[j] = v;
          const uint32_t h = mix32(row + base + static_cast<uint32_t>(j - k));
          store(dr, j, v * (h >= threshold ? keep_scale : 0.0f));
        }
      } else {
        for (int64_t j = k; j < end; ++j) {
          const float v = exp_neg(load(sr, j) * scale - l);
          const uint32_t h = mix32(row + base + static_cast<uint32_t>(j - k));
          store(dr, j, v * (h >= threshold ? keep_scale : 0.0f));
        }
      }
      k = end;
    }
  }
}

template <typename DP, typename DS>
void dscores_impl(const DP* dp, const float* p, const float* delta, int64_t M, int64_t K, float scale, double p_drop,
                  uint64_t seed, uint64_t offset, DS* ds, int num_threads) {
  const uint32_t threshold = dropout_threshold(p_drop);
  const float keep_scale = p_drop > 0 ? static_cast<float>(1.0 / (1.0 - p_drop)) : 1.0f;
  const bool drop = p_drop > 0;
  const uint32_t key = dropout_key(seed);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * K > 65536)
  for (int64_t m = 0; m < M; ++m) {
    const DP* gr = dp + m * K;
    const float* pr = p + m * K;
    DS* out = ds + m * K;
    const float dl = delta[m];
    if (!drop) {
      for (int64_t k = 0; k < K; ++k) store(out, k, pr[k] * (load(gr, k) - dl) * scale);
      continue;
    }
    const uint64_t g0 = offset + static_cast<uint64_t>(m * K);
    int64_t k = 0;
    while (k < K) {
      const uint64_t g = g0 + static_cast<uint64_t>(k);
      const uint32_t row = mix32(key + static_cast<uint32_t>(g >> 32));
      const int64_t end = std::min<int64_t>(K, k + static_cast<int64_t>(0x100000000ull - (g & 0xFFFFFFFFull)));
      const uint32_t base = static_cast<uint32_t>(g);
      for (int64_t j = k; j < end; ++j) {
        const uint32_t h = mix32(row + base + static_cast<uint32_t>(j - k));
        store(out, j, pr[j] * (load(gr, j) * (h >= threshold ? keep_scale : 0.0f) - dl) * scale);
      }
      k = end;
    }
  }
}

}  // namespace

float exp_neg_approx(float x) { return exp_neg(x); }

namespace {

// Calls f(in, out) with each pointer cast to its element type: bf16 (as uint16_t) or fp32.
template <typename F>
void with_dtypes(const void* in, bool in_bf16, void* out, bool out_bf16, F&& f) {
  auto with_out = [&](auto typed_in) {
    if (out_bf16)
      f(typed_in, static_cast<uint16_t*>(out));
    else
      f(typed_in, static_cast<float*>(out));
  };
  if (in_bf16)
    with_out(static_cast<const uint16_t*>(in));
  else
    with_out(static_cast<const float*>(in));
}

}  // namespace

void attn_probs(const void* s, bool s_bf16, const float* lse, int64_t M, int64_t K, float scale, double p_drop,
                uint64_t seed, uint64_t offset, float* p, void* pd, bool pd_bf16, int num_threads) {
  with_dtypes(s, s_bf16, pd, pd_bf16, [&](auto in, auto out) {
    probs_impl(in, lse, M, K, scale, p_drop, seed, offset, p, out, num_threads);
  });
}

void attn_dscores(const void* dp, bool dp_bf16, const float* p, const float* delta, int64_t M, int64_t K, float scale,
                  double p_drop, uint64_t seed, uint64_t offset, void* ds, bool ds_bf16, int num_threads) {
  with_dtypes(dp, dp_bf16, ds, ds_bf16, [&](auto in, auto out) {
    dscores_impl(in, p, delta, M, K, scale, p_drop, seed, offset, out, num_threads);
  });
}

}  // namespace cpu
}  // namespace mage_fast
