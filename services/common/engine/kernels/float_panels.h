// float32 x [M, K] times a weight packed once into 16-column panels, [N/16][K][16], on AVX2: each k
// of a panel is two vectors, and a block of MR rows by NP panels sums x's broadcast element times
// them (an outer product, as BLIS's micro-kernels do), with no sums left to add across lanes. Each
// output is one running sum over k in order, whatever M, so a row's result does not depend on what
// else ran in its step. A panel is one contiguous stream: at one row it is read faster than the row
// kernel's eight (docs/engine.md, "float32 panels").
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

#if defined(PDSERVE_VECTOR) && !defined(__AVX512F__)
#define PDSERVE_FLOAT_PANELS 1  // AVX2 builds pack float32 weights; AVX-512 keeps the row kernel's tiles
#endif

namespace pdserve_float_panels {

constexpr int64_t kWidth = 16;  // a panel's columns
// Panels a group: a block of rows passes over a group's panels before the next group is read.
constexpr int64_t kGroup = 4;
// x's rows a chunk, so that a chunk stays in L2 while every panel of a thread passes over it.
constexpr int64_t kChunkBytes = 256 << 10;

#if defined(PDSERVE_FLOAT_PANELS)
// out[m * ldo + j * 16 + n] = x's row m . column n of panel j, for MR rows (ldx apart) and NP panels.
// MR * NP * 2 sums in registers, 8 to 12: enough to hide the multiply-add's latency, few enough to stay.
template <int MR, int NP>
[[gnu::noinline]] void block(const float* x, int64_t ldx, const float* panel, int64_t K, float* out, int64_t ldo) {
  __m256 acc[MR][NP][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[m][j][0] = acc[m][j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NP][2];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      b[j][0] = _mm256_loadu_ps(panel + (j * K + k) * kWidth);
      b[j][1] = _mm256_loadu_ps(panel + (j * K + k) * kWidth + 8);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) {
        acc[m][j][0] = _mm256_fmadd_ps(a, b[j][0], acc[m][j][0]);
        acc[m][j][1] = _mm256_fmadd_ps(a, b[j][1], acc[m][j][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      _mm256_storeu_ps(out + m * ldo + j * kWidth, acc[m][j][0]);
      _mm256_storeu_ps(out + m * ldo + j * kWidth + 8, acc[m][j][1]);
    }
}

// Rows [m, m + MR) against panels [j0, j1) of w: NP panels a block (NP of a group's 4), then one by one.
template <int MR, int NP>
inline void rows_over(const float* x, const float* w, float* out, int64_t m, int64_t j0, int64_t j1, int64_t N,
                      int64_t K) {
  int64_t j = j0;
  for (; j + NP <= j1; j += NP) block<MR, NP>(x + m * K, K, w + j * K * kWidth, K, out + m * N + j * kWidth, N);
  for (; j < j1; ++j) block<MR, 1>(x + m * K, K, w + j * K * kWidth, K, out + m * N + j * kWidth, N);
}

// Rows [m, m + rows) (rows <= 6) against panels [j0, j1): NP by rows, so a block holds 8 to 12 sums.
inline void rows_over(int64_t rows, const float* x, const float* w, float* out, int64_t m, int64_t j0, int64_t j1,
                      int64_t N, int64_t K) {
  switch (rows) {
    case 1: return rows_over<1, 4>(x, w, out, m, j0, j1, N, K);
    case 2: return rows_over<2, 2>(x, w, out, m, j0, j1, N, K);
    case 3: return rows_over<3, 2>(x, w, out, m, j0, j1, N, K);
    case 4: return rows_over<4, 1>(x, w, out, m, j0, j1, N, K);
    case 5: return rows_over<5, 1>(x, w, out, m, j0, j1, N, K);
    default: return rows_over<6, 1>(x, w, out, m, j0, j1, N, K);
  }
}

// out [M, N] = x [M, K] . w^T, w packed by pack(). The threads split the panels in groups of 4; each
// thread passes x in chunks that stay in L2, and every 6 rows of a chunk over a group's panels.
inline void product(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kWidth, groups = (panels + kGroup - 1) / kGroup;
  const int64_t chunk = std::max<int64_t>(6, kChunkBytes / (K * 4) / 6 * 6);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t j0 = g * kGroup, j1 = std::min(panels, j0 + kGroup);
        for (int64_t m = c0; m < c1; m += 6) rows_over(std::min<int64_t>(6, c1 - m), x, w, out, m, j0, j1, N, K);
      }
    }
  });
}
#endif

// w [N, K] as [N/16][K][16] into dst (N * K floats).
inline void pack(const float* w, float* dst, int64_t N, int64_t K) {
  at::parallel_for(0, N / kWidth, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < kWidth; ++n) dst[(j * K + k) * kWidth + n] = w[(j * kWidth + n) * K + k];
  });
}

}  // namespace pdserve_float_panels
