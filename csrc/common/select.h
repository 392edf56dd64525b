// Exact-k selection of the smallest values with ties broken by the lower position, host side.
// Order of keys: (value, position) lexicographic, so the selected set is unique for any input
// without NaN and equals the first k entries of a stable ascending sort.
#pragma once
#include <algorithm>
#include <cstdint>

namespace mage_fast {

// values: (n,) ; order: (n,) scratch, filled by the call; on return order[0:k] holds the
// positions of the k smallest (in no particular order). O(n) expected (nth_element).
inline void select_k_smallest(const float* values, int64_t n, int64_t k, int32_t* order) {
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  if (k <= 0 || k >= n) return;
  auto less = [values](int32_t a, int32_t b) {
    const float va = values[a], vb = values[b];
    return va < vb || (va == vb && a < b);
  };
  std::nth_element(order, order + (k - 1), order + n, less);
}

}  // namespace mage_fast
