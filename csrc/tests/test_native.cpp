// Native test of the torch-free parts: the counter hash against values produced by the Python
// reference (mage_fast/ops/decode_step.py), the exact-k selection against a stable sort, and the
// CPU kernels against naive loops. Built by CMake and run by ctest; needs no torch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "common/radix_select.h"
#include "common/rng.h"
#include "common/select.h"
#include "cpu/kernels.h"

using namespace mage_fast;

static int failures = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      ++failures;                                             \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
    }                                                         \
  } while (0)

static void test_hash() {
  // mix32 on int64 tensors in the reference, printed from Python
  const uint32_t in[] = {0u, 1u, 2u, 0x9E3779B9u, 0xFFFFFFFFu, 123456789u};
  const uint32_t want[] = {0x0u, 0x688990c0u, 0xd1132181u, 0x1fce552u, 0x6768824au, 0xa8f1db88u};
  for (int i = 0; i < 6; ++i) CHECK(mix32(in[i]) == want[i], "mix32(%#x) = %#x, want %#x", in[i], mix32(in[i]), want[i]);
  // counter_uniform(key, kStreamSample, row, col) with row 2^32 + 3 wrapping to 3
  struct Case { uint32_t key, row, col; double want; };
  const Case cases[] = {{7u, 5u, 0u, 0x1.dd48b8p-1}, {7u, 5u, 1u, 0x1.13083cp-3}, {7u, 5u, 1023u, 0x1.46846p-6},
                        {0xFFFFFFFFu, 3u, 0u, 0x1.56faf4p-3}, {0xFFFFFFFFu, 3u, 1u, 0x1.75a5c4p-3},
                        {0xFFFFFFFFu, 3u, 1023u, 0x1.369f0cp-1}};
  for (const Case& c : cases) {
    const float u = counter_uniform(c.key, kStreamSample, c.row, c.col);
    CHECK(static_cast<double>(u) == c.want, "counter_uniform(%u, row %u, col %u) = %a, want %a", c.key, c.row, c.col,
          static_cast<double>(u), c.want);
  }
  CHECK(uniform_from_hash(0u) == 0.5f / 16777216.0f, "smallest uniform");
  CHECK(uniform_from_hash(0xFFFFFFFFu) == 0.99999994f, "largest uniform is the largest fp32 below 1, as the reference");
}

static void test_select() {
  std::mt19937 rng(1);
  const int64_t sizes[] = {1, 2, 7, 32, 257};
  for (int64_t n : sizes)
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> v(n);
      std::uniform_int_distribution<int> small(0, 4);  // many ties
      for (auto& x : v) x = trial % 2 ? static_cast<float>(small(rng)) : std::ldexp(float(rng() % 1000), -3);
      if (trial % 3 == 0) v[rng() % n] = INFINITY;
      const int64_t k = static_cast<int64_t>(rng() % n);
      std::vector<int32_t> order(n);
      select_k_smallest(v.data(), n, k, order.data());
      std::vector<int32_t> stable(n);
      std::iota(stable.begin(), stable.end(), 0);
      std::stable_sort(stable.begin(), stable.end(), [&](int32_t a, int32_t b) { return v[a] < v[b]; });
      std::vector<int32_t> got(order.begin(), order.begin() + k), want(stable.begin(), stable.begin() + k);
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      CHECK(got == want, "select n=%lld k=%lld trial %d", (long long)n, (long long)k, trial);
    }
}

// The CUDA decode step's selection (a warp counts in_bucket keys, radix_step narrows the prefix), run
// sequentially: it must re-mask the same positions as the CPU selection and the stable sort.
static void test_radix_select() {
  const float specials[] = {-INFINITY, -1.5f, -0.0f, 0.0f, 1e-30f, 2.0f, INFINITY};
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 7; ++j) {
      const float a = specials[i], b = specials[j];
      CHECK((a < b) == (ordered_key(a) < ordered_key(b)) && (a == b) == (ordered_key(a) == ordered_key(b)),
            "ordered_key order of %g and %g", a, b);
    }
  std::mt19937 rng(4);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t n = 1 + rng() % 300;
    std::vector<float> v(n);
    for (auto& x : v) {
      const unsigned r = rng() % 10;
      x = r == 0 ? INFINITY : r == 1 ? -0.0f : r == 2 ? 0.0f : std::ldexp(float(int(rng() % 64) - 32), -2);
    }
    const int64_t k = rng() % (n + 1);
    std::vector<int32_t> order(n);
    select_k_smallest(v.data(), n, k, order.data());
    std::vector<bool> want(n, false), got(n, false);
    for (int64_t i = 0; i < k; ++i) want[order[i]] = true;
    if (k > 0) {
      uint64_t prefix = 0;
      int64_t kk = k;
      for (int bit = 63; bit >= 0; --bit) {
        int64_t count = 0;
        for (int64_t i = 0; i < n; ++i) count += in_bucket(select_key(v[i], uint32_t(i)), prefix, bit);
        radix_step(prefix, kk, bit, count);
      }
      for (int64_t i = 0; i < n; ++i) got[i] = select_key(v[i], uint32_t(i)) <= prefix;
    }
    CHECK(got == want, "radix select n=%lld k=%lld trial %d", (long long)n, (long long)k, trial);
  }
}

static void test_codebook_nn() {
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> val(-3, 3);
  struct Shape { int64_t N, K, D; };
  // the last two are big enough for two threads (>= 2^26 multiply-adds per thread): few rows split
  // the codebook across threads, many rows split the rows
  const Shape shapes[] = {{1, 1, 1}, {3, 37, 5}, {13, 1031, 7}, {50, 300, 300}, {12, 11003, 1024}, {1001, 1103, 128}};
  for (const Shape& s : shapes)
    for (int metric = 0; metric < 2; ++metric) {
      std::vector<float> z(s.N * s.D), cb(s.K * s.D);
      for (auto& x : z) x = static_cast<float>(val(rng));
      for (auto& x : cb) x = static_cast<float>(val(rng));
      for (int64_t k = 1; k < s.K; k += 3)  // planted duplicates (and doubled copies for cosine)
        for (int64_t d = 0; d < s.D; ++d) cb[k * s.D + d] = cb[(k - 1) * s.D + d] * (metric ? 2.0f : 1.0f);
      std::vector<int64_t> got(s.N);
      cpu::codebook_nn(z.data(), cb.data(), s.N, s.K, s.D, metric ? cpu::Metric::kCosine : cpu::Metric::kL2,
                       got.data(), 2);
      for (int64_t n = 0; n < s.N; ++n) {
        // naive, in double: l2 is exact on these small integers (first minimum wins); cosine of distinct
        // codes can tie exactly in real numbers and not in fp32, so there only the score is checked,
        // plus that a planted copy never wins over its lower-index original
        std::vector<double> score(s.K);
        int64_t want = 0;
        for (int64_t k = 0; k < s.K; ++k) {
          double dot = 0, ee = 0;
          for (int64_t d = 0; d < s.D; ++d) {
            dot += double(z[n * s.D + d]) * cb[k * s.D + d];
            ee += double(cb[k * s.D + d]) * cb[k * s.D + d];
          }
          score[k] = metric ? -dot / std::max(std::sqrt(ee), 1e-12) : ee - 2 * dot;
          if (score[k] < score[want]) want = k;
        }
        const bool ok = metric ? score[got[n]] <= score[want] + 1e-6 && got[n] % 3 != 1 : got[n] == want;
        CHECK(ok, "codebook_nn N=%lld K=%lld D=%lld metric %d row %lld: got %lld want %lld",
              (long long)s.N, (long long)s.K, (long long)s.D, metric, (long long)n, (long long)got[n], (long long)want);
      }
    }
}

static void test_token_drop() {
  const int64_t B = 2, L = 7, K = 4, D = 3;
  std::vector<float> x(B * K * D), pos(L * D), out(B * L * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i + 1);
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = float(100 * (i + 1));
  const int64_t index[B * K] = {0, 2, 5, 6, 0, 1, 3, 4};
  bool mask[B * L] = {};
  mask[5] = true;          // image 0: slot 2 lands on a masked position -> class-slot fill
  mask[L + 1] = true;      // image 1: slot 1 likewise
  CHECK(cpu::scatter_tokens(x.data(), index, mask, pos.data(), B, K, L, D, out.data(), 2) == 0, "no bad index");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      int64_t src = 0;
      for (int64_t k = 0; k < K; ++k)
        if (index[b * K + k] == l && !mask[b * L + l]) src = k;
      for (int64_t d = 0; d < D; ++d)
        CHECK(out[(b * L + l) * D + d] == x[(b * K + src) * D + d] + pos[l * D + d], "scatter b=%lld l=%lld",
              (long long)b, (long long)l);
    }
  std::vector<float> g(B * K * D);
  CHECK(cpu::gather_rows(out.data(), index, B, L, K, D * sizeof(float), g.data(), 2) == 0, "no bad index");
  for (int64_t r = 0; r < B * K; ++r)
    for (int64_t d = 0; d < D; ++d)
      CHECK(g[r * D + d] == out[((r / K) * L + index[r]) * D + d], "gather row %lld", (long long)r);
  const int64_t bad_index[2] = {0, 7};
  CHECK(cpu::gather_rows(out.data(), bad_index, 1, L, 2, D * sizeof(float), g.data(), 1) == 1, "out of range counted");
}

static void test_decode_step_invariants() {
  // Exact-k re-masking and known positions: the numerical parity with the reference is tested in Python.
  const int64_t B = 3, N = 19, C = 11, mask_id = C;
  std::vector<float> logits(B * N * C);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto& v : logits) v = nd(rng);
  std::vector<int64_t> ids(B * N, mask_id), key = {1, 2, 0xFFFFFFFFll}, sampled(B * N), next(B * N);
  for (int64_t i = 0; i < B * N; i += 4) ids[i] = i % C;
  const int64_t mask_len = 6;
  cpu::decode_step(logits.data(), N * C, C, ids.data(), key.data(), B, N, C, 2, mask_len, 1.5f, mask_id, sampled.data(),
                   next.data(), 2);
  for (int64_t b = 0; b < B; ++b) {
    int64_t remasked = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t r = b * N + n;
      CHECK(sampled[r] >= 0 && sampled[r] < C, "sampled in range");
      if (ids[r] != mask_id) CHECK(sampled[r] == ids[r] && next[r] == ids[r], "known position kept");
      remasked += next[r] == mask_id;
    }
    CHECK(remasked == mask_len, "image %lld: %lld re-masked, want %lld", (long long)b, (long long)remasked,
          (long long)mask_len);
  }
}

// Winograd F(4x4, 3x3): the three transforms with a naive loop for the 36 products, against a direct
// padded 3x3 convolution in double, plain and reading a 2x nearest upsampling; sizes not multiples of 4.
static void test_winograd() {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int up = 0; up < 2; ++up) {
    const int64_t N = 2, H = 5, W = 7, C = 6, Co = 5, Ho = up ? 2 * H : H, Wo = up ? 2 * W : W;
    std::vector<float> x(N * H * W * C), w(Co * C * 9), bias(Co), U(36 * C * Co);
    for (auto& v : x) v = nd(gen);
    for (auto& v : w) v = nd(gen) / 3.f;
    for (auto& v : bias) v = nd(gen);
    cpu::winograd_f43_weight(w.data(), Co, C, U.data());
    const int64_t tiles = N * ((Ho + 3) / 4) * ((Wo + 3) / 4), P = 5;  // chunks of 5 tiles, the last shorter
    std::vector<float> V(36 * P * C), M(36 * P * Co), y(N * Ho * Wo * Co, -1e30f);
    for (int64_t t0 = 0; t0 < tiles; t0 += P) {
      const int64_t p = std::min(P, tiles - t0);
      cpu::winograd_f43_input(x.data(), N, H, W, C, up, t0, p, P, V.data(), 1);
      for (int k = 0; k < 36; ++k)
        for (int64_t i = 0; i < p; ++i)
          for (int64_t o = 0; o < Co; ++o) {
            float acc = 0.f;
            for (int64_t c = 0; c < C; ++c) acc += V[(k * P + i) * C + c] * U[(k * C + c) * Co + o];
            M[(k * P + i) * Co + o] = acc;
          }
      cpu::winograd_f43_output(M.data(), p, P, t0, N, Ho, Wo, Co, bias.data(), y.data(), 1);
    }
    double worst = 0.0, scale = 0.0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t r = 0; r < Ho; ++r)
        for (int64_t q = 0; q < Wo; ++q)
          for (int64_t o = 0; o < Co; ++o) {
            double ref = bias[o];
            for (int dy = -1; dy <= 1; ++dy)
              for (int dx = -1; dx <= 1; ++dx) {
                const int64_t yy = r + dy, xx = q + dx;
                if (yy < 0 || yy >= Ho || xx < 0 || xx >= Wo) continue;
                const int64_t sy = up ? yy / 2 : yy, sx = up ? xx / 2 : xx;
                for (int64_t c = 0; c < C; ++c)
                  ref += double(x[((n * H + sy) * W + sx) * C + c]) * w[((o * C + c) * 3 + dy + 1) * 3 + dx + 1];
              }
            worst = std::max(worst, std::fabs(ref - y[((n * Ho + r) * Wo + q) * Co + o]));
            scale = std::max(scale, std::fabs(ref));
          }
    CHECK(worst <= 1e-5 * scale, "winograd (upsample %d): max error %g against max |y| %g", up, worst, scale);
  }
}

// GroupNorm + SiLU against a double reference: groups of several channels, a pixel count that is not a
// multiple of the kernel's block, a large common offset (the statistics must not cancel), and the exp
// it vectorises against std::exp over the range the sigmoid uses.
static void test_group_norm() {
  double worst_exp = 0.0;
  for (float v = -90.f; v <= 90.f; v += 0.0137f) {
    const double ref = std::exp(double(std::min(std::max(v, -86.6f), 88.7f)));
    worst_exp = std::max(worst_exp, std::fabs(cpu::exp_approx(v) - ref) / ref);
  }
  CHECK(worst_exp <= 3e-7, "exp_approx: max relative error %g", worst_exp);
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t N = 2, HW = 1000 + 37, C = 12, G = 3;
  std::vector<float> x(N * HW * C), gamma(C), beta(C), y(N * HW * C);
  for (int64_t i = 0; i < N * HW * C; ++i) x[i] = 3.f * nd(gen) + (i % C < 4 ? 50.f : 0.f);
  for (auto& v : gamma) v = nd(gen);
  for (auto& v : beta) v = nd(gen);
  for (int silu = 0; silu < 2; ++silu) {
    cpu::group_norm_nhwc(x.data(), N, HW, C, G, gamma.data(), beta.data(), 1e-6f, silu, y.data(), 2);
    double worst = 0.0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        double s = 0.0, q = 0.0;
        const int64_t cg = C / G;
        for (int64_t p = 0; p < HW; ++p)
          for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += x[(n * HW + p) * C + c];
        const double m = s / double(HW * cg);
        for (int64_t p = 0; p < HW; ++p)
          for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
            const double d = x[(n * HW + p) * C + c] - m;
            q += d * d;
          }
        const double rstd = 1.0 / std::sqrt(q / double(HW * cg) + 1e-6);
        for (int64_t p = 0; p < HW; ++p)
          for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
            double ref = (x[(n * HW + p) * C + c] - m) * rstd * gamma[c] + beta[c];
            if (silu) ref = ref / (1.0 + std::exp(-ref));
            worst = std::max(worst, std::fabs(ref - y[(n * HW + p) * C + c]));
          }
      }
    CHECK(worst <= 2e-5, "group_norm_nhwc (silu %d): max error %g", silu, worst);
  }
}

static void test_dropout() {
  // each element against dropout_keep; an offset continues the stream; a run that crosses a 2^32
  // index boundary; bf16 scaling; the keep rate
  const int64_t n = 5000;
  std::vector<float> x(n), y(n), z(n - 1000);
  for (int64_t i = 0; i < n; ++i) x[i] = 1.0f + 0.001f * static_cast<float>(i);
  const uint64_t seed = 0x123456789ull, offset = 0xFFFFFC00ull;  // crosses 2^32 after 1024 elements
  const uint32_t t = cpu::dropout_threshold(0.25);
  cpu::dropout_f32(x.data(), y.data(), n, 0.25, seed, offset, 2);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = cpu::dropout_keep(seed, offset + i, t);
    kept += keep;
    CHECK(y[i] == (keep ? x[i] * (1.0f / 0.75f) : 0.0f), "dropout_f32 element %lld", (long long)i);
  }
  CHECK(kept > 0.72 * n && kept < 0.78 * n, "keep rate %lld of %lld at p = 0.25", (long long)kept, (long long)n);
  cpu::dropout_f32(x.data() + 1000, z.data(), n - 1000, 0.25, seed, offset + 1000, 1);
  for (int64_t i = 0; i < n - 1000; ++i) CHECK(z[i] == y[i + 1000], "offset continues the stream at %lld", (long long)i);
  std::vector<uint16_t> xb(n, 0x3F80), yb(n);  // bf16 1.0
  cpu::dropout_bf16(xb.data(), yb.data(), n, 0.5, seed, 0, 2);
  for (int64_t i = 0; i < n; ++i)
    CHECK(yb[i] == (cpu::dropout_keep(seed, i, cpu::dropout_threshold(0.5)) ? 0x4000 : 0), "bf16 element %lld",
          (long long)i);
}

static void test_attention_passes() {
  double worst = 0;
  for (int i = 0; i < 87000; ++i) {  // the exp the passes use, over (-87, 0]
    const float x = -0.001f * static_cast<float>(i);
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(cpu::exp_neg_approx(x) - want) / want);
  }
  CHECK(worst <= 3e-7, "exp_neg_approx: max relative error %g", worst);
  CHECK(cpu::exp_neg_approx(-100.0f) == 0.0f && std::isnan(cpu::exp_neg_approx(NAN)), "exp_neg_approx edges");
  // one row with dropout: pd = p / (1 - q) where kept, ds = p (dropout(dp) - delta) scale
  const int64_t K = 40;
  std::vector<float> s(K), p(K), pd(K), dp(K), ds(K);
  for (int64_t k = 0; k < K; ++k) s[k] = 0.1f * static_cast<float>(k % 7) - 0.3f, dp[k] = 0.05f * static_cast<float>(k);
  const float lse = 1.5f, delta = 0.7f, scale = 0.5f;
  cpu::attn_probs(s.data(), false, &lse, 1, K, scale, 0.25, 99, 1000, p.data(), pd.data(), false, 1);
  cpu::attn_dscores(dp.data(), false, p.data(), &delta, 1, K, scale, 0.25, 99, 1000, ds.data(), false, 1);
  for (int64_t k = 0; k < K; ++k) {
    const double e = std::exp(static_cast<double>(s[k]) * scale - lse);
    const bool keep = cpu::dropout_keep(99, 1000 + k, cpu::dropout_threshold(0.25));
    CHECK(std::abs(p[k] - e) <= 1e-6 * e, "attn_probs p[%lld]", (long long)k);
    CHECK(pd[k] == (keep ? p[k] * (1.0f / 0.75f) : 0.0f), "attn_probs pd[%lld]", (long long)k);
    const float want = p[k] * ((keep ? dp[k] * (1.0f / 0.75f) : 0.0f) - delta) * scale;
    CHECK(std::abs(ds[k] - want) <= 1e-6f, "attn_dscores ds[%lld]", (long long)k);
  }
}

int main() {
  test_hash();
  test_select();
  test_radix_select();
  test_codebook_nn();
  test_token_drop();
  test_decode_step_invariants();
  test_winograd();
  test_group_norm();
  test_dropout();
  test_attention_passes();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all native checks passed\n");
  return 0;
}
