// Winograd F(4x4, 3x3) convolution transforms (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), channels-last fp32. A 3x3 convolution (stride 1, zero padding 1) over
// 4x4 output tiles becomes 36 independent matrix products (tiles x Cin) @ (Cin x Cout) between an
// input transform and an output transform: 36 multiplies per 16 outputs and channel pair instead of
// 144. The binding (csrc/ops.cpp) runs the tiles in chunks small enough to stay in cache: input
// transform of a chunk here, the 36 products by at::bmm, output transform here.
//
// Every transform works on whole channel rows (C contiguous floats per pixel), so the loops over c
// are plain unit-stride loops the compiler vectorises.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"

namespace mage_fast {
namespace cpu {
namespace {

// B^T of F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2, inf) applied to 6 vectors of length C:
// out[i] = sum_k BT[i][k] * in[k]; in[k] = in0 + k * in_stride, out[i] = out0 + i * out_stride.
inline void bt6(const float* in0, int64_t in_stride, float* out0, int64_t out_stride, int64_t C) {
  const float *d0 = in0, *d1 = in0 + in_stride, *d2 = in0 + 2 * in_stride, *d3 = in0 + 3 * in_stride,
              *d4 = in0 + 4 * in_stride, *d5 = in0 + 5 * in_stride;
  float *o0 = out0, *o1 = out0 + out_stride, *o2 = out0 + 2 * out_stride, *o3 = out0 + 3 * out_stride,
        *o4 = out0 + 4 * out_stride, *o5 = out0 + 5 * out_stride;
  for (int64_t c = 0; c < C; ++c) {
    const float a = d0[c], b = d1[c], e = d2[c], f = d3[c], g = d4[c], h = d5[c];
    o0[c] = 4.f * a - 5.f * e + g;
    o1[c] = -4.f * b - 4.f * e + f + g;
    o2[c] = 4.f * b - 4.f * e - f + g;
    o3[c] = -2.f * b - e + 2.f * f + g;
    o4[c] = 2.f * b - e - 2.f * f + g;
    o5[c] = 4.f * b - 5.f * f + h;
  }
}

// A^T of F(4x4, 3x3): 6 vectors in, 4 out.
inline void at4(const float* in0, int64_t in_stride, float* out0, int64_t out_stride, int64_t C) {
  const float *m0 = in0, *m1 = in0 + in_stride, *m2 = in0 + 2 * in_stride, *m3 = in0 + 3 * in_stride,
              *m4 = in0 + 4 * in_stride, *m5 = in0 + 5 * in_stride;
  float *o0 = out0, *o1 = out0 + out_stride, *o2 = out0 + 2 * out_stride, *o3 = out0 + 3 * out_stride;
  for (int64_t c = 0; c < C; ++c) {
    const float p = m1[c] + m2[c], q = m1[c] - m2[c], r = m3[c] + m4[c], s = m3[c] - m4[c];
    o0[c] = m0[c] + p + r;
    o1[c] = q + 2.f * s;
    o2[c] = p + 4.f * r;
    o3[c] = q + 8.f * s + m5[c];
  }
}

// Image n and top-left output pixel (y0, x0) of tile `tile` in the (n, tile row, tile column) order
// of the 4x4 tiling of an (Ho, Wo) output.
struct Tile {
  int64_t n, y0, x0;
};
inline Tile tile_at(int64_t tile, int64_t Ho, int64_t Wo) {
  const int64_t th = (Ho + 3) / 4, tw = (Wo + 3) / 4;
  return {tile / (th * tw), 4 * ((tile / tw) % th), 4 * (tile % tw)};
}

}  // namespace

void winograd_f43_weight(const float* w, int64_t Cout, int64_t Cin, float* U) {
  // G of F(4x4, 3x3); U[i*6+j][ci][co] = (G g G^T)[i][j] with g = w[co][ci], computed in double.
  static const double G[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                 {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                 {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
  for (int64_t co = 0; co < Cout; ++co) {
    for (int64_t ci = 0; ci < Cin; ++ci) {
      const float* g = w + (co * Cin + ci) * 9;
      double t[6][3];
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[0 * 3 + j] + G[i][1] * g[1 * 3 + j] + G[i][2] * g[2 * 3 + j];
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 6; ++j)
          U[((i * 6 + j) * Cin + ci) * Cout + co] =
              static_cast<float>(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
    }
  }
}

void winograd_f43_input(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, bool upsample, int64_t tile0,
                        int64_t P, int64_t P_stride, float* V, int num_threads) {
  const int64_t Ho = upsample ? 2 * H : H, Wo = upsample ? 2 * W : W;
  (void)N;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> d(36 * C), t(36 * C);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const Tile t0 = tile_at(tile0 + p, Ho, Wo);
      const int64_t n = t0.n;
      // the 6x6 input patch around the tile, zero outside the (upsampled) image
      for (int i = 0; i < 6; ++i) {
        const int64_t y = t0.y0 - 1 + i;
        for (int j = 0; j < 6; ++j) {
          const int64_t xx = t0.x0 - 1 + j;
          float* dst = d.data() + (i * 6 + j) * C;
          if (y < 0 || y >= Ho || xx < 0 || xx >= Wo) {
            std::memset(dst, 0, sizeof(float) * C);
          } else {
            const int64_t sy = upsample ? y / 2 : y, sx = upsample ? xx / 2 : xx;
            std::memcpy(dst, x + ((n * H + sy) * W + sx) * C, sizeof(float) * C);
          }
        }
      }
      for (int j = 0; j < 6; ++j) bt6(d.data() + j * C, 6 * C, t.data() + j * C, 6 * C, C);  // columns
      for (int i = 0; i < 6; ++i)  // rows, straight into V[(i*6+j)][p][:]
        bt6(t.data() + i * 6 * C, C, V + ((i * 6) * P_stride + p) * C, P_stride * C, C);
    }
  }
}

void winograd_f43_output(const float* M, int64_t P, int64_t P_stride, int64_t tile0, int64_t N, int64_t Ho,
                         int64_t Wo, int64_t Cout, const float* bias, float* y, int num_threads) {
  (void)N;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> s(24 * Cout), o(16 * Cout);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const Tile t0 = tile_at(tile0 + p, Ho, Wo);
      const int64_t n = t0.n;
      for (int j = 0; j < 6; ++j)  // s[r][j] = sum_k AT[r][k] M[k*6+j]
        at4(M + ((j)*P_stride + p) * Cout, 6 * P_stride * Cout, s.data() + j * Cout, 6 * Cout, Cout);
      for (int r = 0; r < 4; ++r) at4(s.data() + r * 6 * Cout, Cout, o.data() + r * 4 * Cout, Cout, Cout);
      for (int r = 0; r < 4; ++r) {
        const int64_t yy = t0.y0 + r;
        if (yy >= Ho) break;
        for (int c = 0; c < 4; ++c) {
          const int64_t xx = t0.x0 + c;
          if (xx >= Wo) break;
          float* dst = y + ((n * Ho + yy) * Wo + xx) * Cout;
          const float* src = o.data() + (r * 4 + c) * Cout;
          if (bias) {
            for (int64_t k = 0; k < Cout; ++k) dst[k] = src[k] + bias[k];
          } else {
            std::memcpy(dst, src, sizeof(float) * Cout);
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace mage_fast
