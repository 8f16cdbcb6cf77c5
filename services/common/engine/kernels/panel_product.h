// x [M, K] times a weight's panels (panels.h) with an epilogue of the caller's: through AMX tiles
// (tile_product.h) where the CPU has them, else on AVX512_BF16 vectors (below), so linear.cpp's ops
// and their epilogues run on either. On vectors, each panel's 16 columns are a vector's lanes: a
// pair of k of x's row, broadcast, times the panel's pair by vdpbf16ps, summed in float32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "panels.h"
#include "tile_product.h"
#include "vec.h"

#if defined(PDSERVE_PANELS)
namespace pdserve_tiles {

#if !defined(PDSERVE_AMX)
// A block is up to 4 rows by up to 4 panels (two pairs) of sums: against oneDNN's packed bf16 matmul
// over a decode step's weights, 0.81-0.86x its time at 1-8 rows and 1.05x at 1,024 (8 rows by 2:
// 0.88-1.38x). Fewer rows take a block of their own size: one row in a 4-row block took 1.10-1.14x the time.
constexpr int64_t kBlockRows = 4;
// Pairs of k summed apart and then added, as oneDNN sums 1,024 of K: the same bits as its packed
// matmul, where one running sum over K = 1,536 differed in 0.02% of the outputs (and the bf16 engine's
// agreement with fp32 tokens fell from over 98% to 96.7%).
constexpr int64_t kPairsSummed = 512;
// Bytes of panels a thread of vector_product_rows keeps in L2 while its rows pass over them.
constexpr int64_t kVectorBlockBytes = 1 << 20;

// c[j][r * 16 + n] = x's row r . panel j's column n, for rows 0 .. R - 1 of x (K apart) and NP panels.
template <int R, int NP>
inline void vector_block(const at::BFloat16* x, int64_t K, const at::BFloat16* const* panel, float* const* c) {
  const int64_t pairs = K / 2;
  for (int64_t k0 = 0; k0 < pairs; k0 += kPairsSummed) {
    __m512 acc[R][NP];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(pairs, k0 + kPairsSummed); ++k) {
      __m512bh b[NP];
      for (int j = 0; j < NP; ++j) b[j] = (__m512bh)_mm512_loadu_si512(panel[j] + k * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh a = pdserve_vec::broadcast_pair(x + r * K + 2 * k);
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], b[j], a);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NP; ++j) {
        float* out = c[j] + r * 16;
        _mm512_store_ps(out, k0 == 0 ? acc[r][j] : _mm512_add_ps(_mm512_load_ps(out), acc[r][j]));
      }
  }
}

template <int R>
inline void vector_block(int n, const at::BFloat16* x, int64_t K, const at::BFloat16* const* panel, float* const* c) {
  switch (n) {
    case 1: return vector_block<R, 1>(x, K, panel, c);
    case 2: return vector_block<R, 2>(x, K, panel, c);
    case 3: return vector_block<R, 3>(x, K, panel, c);
    default: return vector_block<R, 4>(x, K, panel, c);
  }
}

// Pairs p .. p + np - 1 (np <= 2) times x's 16-row group from m0, into c ([16][16] a panel), then each
// pair's epilogue(p, m0, c0, c1, 0, rows), as tile_product hands it a C tile.
template <typename Epilogue>
inline void vector_pairs(const Rows& rows, int64_t M, int64_t K, const Panels& w, int64_t p, int64_t np, int64_t m0,
                         float (*c)[16 * 16], Epilogue& epilogue) {
  const at::BFloat16* panel[4];
  float* out[4];
  int n = 0;
  for (int64_t i = 0; i < np; ++i) {
    panel[n] = w.bf16 + w.first(p + i) * K * 16, out[n++] = c[2 * i];
    if (w.second(p + i)) panel[n] = panel[n - 1] + w.group * K * 16, out[n++] = c[2 * i + 1];
  }
  const int64_t group_rows = std::min<int64_t>(16, M - m0);
  const at::BFloat16* a = rows.at(m0);  // 16 rows, zero-padded past M
  for (int64_t r = 0; r < group_rows; r += kBlockRows) {
    float* o[4];
    for (int j = 0; j < n; ++j) o[j] = out[j] + r * 16;
    const at::BFloat16* x = a + r * K;
    switch (std::min(kBlockRows, group_rows - r)) {
      case 1: vector_block<1>(n, x, K, panel, o); break;
      case 2: vector_block<2>(n, x, K, panel, o); break;
      case 3: vector_block<3>(n, x, K, panel, o); break;
      default: vector_block<4>(n, x, K, panel, o);
    }
  }
  for (int64_t i = 0; i < np; ++i)
    epilogue(p + i, m0, c[2 * i], w.second(p + i) ? c[2 * i + 1] : nullptr, 0, group_rows);
}

// tile_product on vectors: the threads split the pairs, and take theirs two at a time; a thread's pairs
// stay in L2 while every row of x passes over them. Split two pairs at a time, a step's weights of
// 18 pairs (576 columns) went 10 to 8, and the step's matmuls took 1.01-1.03x the time.
template <typename Epilogue>
void vector_product(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue) {
  TORCH_CHECK(!w.int8, "int8 panels need AMX");
  const Rows rows(xp, M, K);
  at::parallel_for(0, w.pairs(), 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float c[4][16 * 16];
    for (int64_t p = p0; p < p1; p += 2)
      for (int64_t m0 = 0; m0 < M; m0 += 16)
        vector_pairs(rows, M, K, w, p, std::min<int64_t>(2, p1 - p), m0, c, epilogue);
  });
}

// tile_product_rows on vectors: the threads split the rows; whole(m0, n) gets rows m0 .. m0 + n - 1
// once every pair's epilogue is done with them.
template <typename Epilogue, typename Whole>
void vector_product_rows(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue,
                         Whole whole) {
  TORCH_CHECK(!w.int8, "int8 panels need AMX");
  const Rows rows(xp, M, K);
  const int64_t pairs = w.pairs();
  const int64_t block = std::max<int64_t>(1, kVectorBlockBytes / (K * 64)) * 2;  // pairs, an even number
  at::parallel_for(0, (M + 15) / 16, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float c[4][16 * 16];
    for (int64_t c0 = 0; c0 < pairs; c0 += block) {
      const int64_t c1 = std::min(pairs, c0 + block);
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t p = c0; p < c1; p += 2)
          vector_pairs(rows, M, K, w, p, std::min<int64_t>(2, c1 - p), g * 16, c, epilogue);
        if (c1 == pairs) whole(g * 16, std::min<int64_t>(16, M - g * 16));
      }
    }
  });
}
#endif

// The product over panels this build runs.
template <typename Epilogue>
void product(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue) {
#if defined(PDSERVE_AMX)
  tile_product(xp, M, K, w, epilogue);
#else
  vector_product(xp, M, K, w, epilogue);
#endif
}

template <typename Epilogue, typename Whole>
void product_rows(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue, Whole whole) {
#if defined(PDSERVE_AMX)
  tile_product_rows(xp, M, K, w, epilogue, whole);
#else
  vector_product_rows(xp, M, K, w, epilogue, whole);
#endif
}

}  // namespace pdserve_tiles
#endif
