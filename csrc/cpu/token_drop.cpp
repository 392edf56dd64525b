// Token gather (encoder side) and restore (decoder side) on the CPU: row copies, one pass.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"

namespace mage_fast {
namespace cpu {
namespace {
// a thread per MiB moved at least: small copies stay on one thread
int threads_for(int64_t bytes, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, bytes >> 20)));
}
}  // namespace

int64_t gather_rows(const void* x, const int64_t* index, int64_t B, int64_t L, int64_t K, int64_t row_bytes,
                    void* out, int num_threads) {
  const char* src = static_cast<const char*>(x);  // (B, L, row_bytes)
  char* dst = static_cast<char*>(out);            // (B, K, row_bytes)
  int64_t bad = 0;
#pragma omp parallel for num_threads(threads_for(B * K * row_bytes, num_threads)) schedule(static) reduction(+ : bad)
  for (int64_t r = 0; r < B * K; ++r) {
    const int64_t b = r / K, l = index[r];
    if (l < 0 || l >= L) {
      ++bad;
      continue;
    }
    std::memcpy(dst + r * row_bytes, src + (b * L + l) * row_bytes, row_bytes);
  }
  return bad;
}

int64_t scatter_tokens(const float* x, const int64_t* index, const bool* all_mask, const float* pos, int64_t B,
                       int64_t K, int64_t L, int64_t D, float* out, int num_threads) {
  std::vector<int32_t> src(B * L, -1);  // (B, L) slot of x feeding each position, -1 = class-slot fill
  int64_t bad = 0;
#pragma omp parallel num_threads(threads_for(B * L * D * 4, num_threads))
  {
#pragma omp for schedule(static) reduction(+ : bad)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t l = index[b * K + k];
        if (l < 0 || l >= L) {
          ++bad;
          continue;
        }
        if (!all_mask[b * L + l]) src[b * L + l] = static_cast<int32_t>(k);
      }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * L; ++r) {
      const int64_t b = r / L, l = r % L;
      const int32_t k = src[r] < 0 ? 0 : src[r];
      const float* xr = x + (b * K + k) * D;  // (D,)
      const float* pr = pos + l * D;          // (D,)
      float* o = out + r * D;                 // (D,)
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = xr[d] + pr[d];
    }
  }
  return bad;
}

}  // namespace cpu
}  // namespace mage_fast
