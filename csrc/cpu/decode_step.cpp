// One MaskGIT/MAGE decode step on the CPU, matching mage_fast.ops.decode_step.decode_step_ref:
// Gumbel-max sampling with the shared counter hash, log-probability confidence plus annealed
// Gumbel noise, then per image the mask_len lowest confidences by selection (not a sort).
// Compiled with -ffp-contract=off so every fp32 operation rounds as the reference's tensor ops.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/rng.h"
#include "common/select.h"
#include "cpu/kernels.h"

namespace mage_fast {
namespace cpu {

void decode_step(const float* logits, int64_t sB, int64_t sN, const int64_t* ids, const int64_t* key,
                 int64_t B, int64_t N, int64_t C, int64_t step, int64_t mask_len, float noise_scale,
                 int64_t mask_id, int64_t* sampled, int64_t* next_ids, int num_threads) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> conf(B * N);  // (B, N) confidence, +inf at known positions
  // a thread per 2^16 logits at least (~1 ms): small calls stay on one thread
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, (B * N * C) >> 16)));
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      const float* l = logits + b * sB + n * sN;  // (C,)
      const uint32_t k32 = static_cast<uint32_t>(key[b]);
      const uint32_t row = static_cast<uint32_t>(step * N + n);  // counter mod 2^32, as the reference
      const uint32_t hs = row_hash(k32, kStreamSample, row);
      float best = -kInf, mx = -kInf;
      int64_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float u = uniform_from_hash(mix32(hs + static_cast<uint32_t>(c)));
        const float g = -std::log(-std::log(u));
        const float s = l[c] + g;
        if (s > best) {  // strict: the first maximum, as torch.argmax
          best = s;
          arg = c;
        }
        mx = std::max(mx, l[c]);
      }
      // logsumexp as torch: an infinite max is replaced by 0 before exp
      const float m = std::isinf(mx) ? 0.0f : mx;
      float sum = 0.0f;
      for (int64_t c = 0; c < C; ++c) sum += std::exp(l[c] - m);
      const float lse = std::log(sum) + m;
      const bool unknown = ids[r] == mask_id;
      sampled[r] = unknown ? arg : ids[r];
      if (unknown) {
        const float g2 = -std::log(-std::log(counter_uniform(k32, kStreamConf, row, 0u)));
        conf[r] = (l[arg] - lse) + noise_scale * g2;
      } else {
        conf[r] = kInf;
      }
    }
    std::vector<int32_t> order(N);  // (N,) selection scratch
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* s = sampled + b * N;
      int64_t* out = next_ids + b * N;
      std::copy(s, s + N, out);
      select_k_smallest(conf.data() + b * N, N, mask_len, order.data());
      for (int64_t i = 0; i < mask_len; ++i) out[order[i]] = mask_id;
    }
  }
}

}  // namespace cpu
}  // namespace mage_fast
