// x [M, K] times a weight's panels (panels.h) with an epilogue of the caller's: through AMX tiles
// (tile_product.h) where the CPU has them, else on AVX512_BF16 vectors (below), so linear.cpp's ops
// and their epilogues run on either. On vectors, each panel's 16 columns are a vector's lanes: a
// pair of k of x's row, broadcast, times the panel's pair by vdpbf16ps, summed in float32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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
// Up to these rows a call widens int8 panels in registers, for each block of rows; past them, once
// into a buffer for all its blocks. A decode step of 8 sequences took 10.1-10.5 ms against 13.3-14.5
// with the buffer from 5 rows on; 16 sequences 16.6-17.9 against 20.4-21.2; 32 alike.
constexpr int64_t kWidenInRegisterRows = 16;
// Bytes of panels a thread of vector_product_rows keeps in L2 while its rows pass over them.
constexpr int64_t kVectorBlockBytes = 1 << 20;

// A panel's pair of k for its 16 columns: 32 bf16, or 32 int8 widened to bf16 in registers.
inline __m512bh load_pair(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_pair(const int8_t* p) { return widen_pair(p); }

// c[j][r * 16 + n] = x's row r . panel j's column n, for rows 0 .. R - 1 of x (K apart) and NP panels.
template <int R, int NP, typename P>
inline void vector_block(const at::BFloat16* x, int64_t K, const P* const* panel, float* const* c) {
  const int64_t pairs = K / 2;
  for (int64_t k0 = 0; k0 < pairs; k0 += kPairsSummed) {
    __m512 acc[R][NP];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(pairs, k0 + kPairsSummed); ++k) {
      __m512bh b[NP];
      for (int j = 0; j < NP; ++j) b[j] = load_pair(panel[j] + k * 32);
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

template <int R, typename P>
inline void vector_block(int n, const at::BFloat16* x, int64_t K, const P* const* panel, float* const* c) {
  switch (n) {
    case 1: return vector_block<R, 1>(x, K, panel, c);
    case 2: return vector_block<R, 2>(x, K, panel, c);
    case 3: return vector_block<R, 3>(x, K, panel, c);
    default: return vector_block<R, 4>(x, K, panel, c);
  }
}

// The panels' pointers of pairs p .. p + np - 1 (np <= 2) in `base` (bf16 or int8), and each one's C.
template <typename P>
inline int pair_panels(const P* base, int64_t K, const Panels& w, int64_t p, int64_t np, float (*c)[16 * 16],
                       const P** panel, float** out) {
  int n = 0;
  for (int64_t i = 0; i < np; ++i) {
    panel[n] = base + w.first(p + i) * K * 16, out[n++] = c[2 * i];
    if (w.second(p + i)) panel[n] = panel[n - 1] + w.group * K * 16, out[n++] = c[2 * i + 1];
  }
  return n;
}

// x's rows r0 .. r0 + rows - 1 of a 16-row group (a) times n panels, into out, a block of up to 4 rows at a time.
template <typename P>
inline void vector_rows(const at::BFloat16* a, int64_t rows, int64_t K, int n, const P* const* panel,
                        float* const* out) {
  for (int64_t r = 0; r < rows; r += kBlockRows) {
    float* o[4];
    for (int j = 0; j < n; ++j) o[j] = out[j] + r * 16;
    const at::BFloat16* x = a + r * K;
    switch (std::min(kBlockRows, rows - r)) {
      case 1: vector_block<1>(n, x, K, panel, o); break;
      case 2: vector_block<2>(n, x, K, panel, o); break;
      case 3: vector_block<3>(n, x, K, panel, o); break;
      default: vector_block<4>(n, x, K, panel, o);
    }
  }
}

// Pairs p .. p + np - 1 (np <= 2) times x's 16-row group from m0, into c ([16][16] a panel), then each
// pair's epilogue(p, m0, c0, c1, 0, rows), as tile_product hands it a C tile. int8 panels are widened
// in registers for a decode step's few rows (the bytes halved, the widening under the reads), else
// into `widened` (the thread's, 4 panels) at the pairs' first row group, for every group after it:
// vector_product passes a pair's groups in turn.
template <typename Epilogue>
inline void vector_pairs(const Rows& rows, int64_t M, int64_t K, const Panels& w, int64_t p, int64_t np, int64_t m0,
                         float (*c)[16 * 16], at::BFloat16* widened, Epilogue& epilogue) {
  float* out[4];
  const int64_t group_rows = std::min<int64_t>(16, M - m0);
  const at::BFloat16* a = rows.at(m0);  // 16 rows, zero-padded past M
  if (!w.int8) {
    const at::BFloat16* panel[4];
    const int n = pair_panels(w.bf16, K, w, p, np, c, panel, out);
    vector_rows(a, group_rows, K, n, panel, out);
  } else {
    const int8_t* panel[4];
    const int n = pair_panels(w.int8, K, w, p, np, c, panel, out);
    if (M <= kWidenInRegisterRows) {
      vector_rows(a, group_rows, K, n, panel, out);
    } else {
      const at::BFloat16* wide[4];
      for (int j = 0; j < n; ++j) {
        at::BFloat16* dst = widened + j * K * 16;
        if (m0 == 0) widen_int8(panel[j], dst, K * 16);
        wide[j] = dst;
      }
      vector_rows(a, group_rows, K, n, wide, out);
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
  const Rows rows(xp, M, K);
  at::parallel_for(0, w.pairs(), 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float c[4][16 * 16];
    std::vector<at::BFloat16> widened(w.int8 && M > kWidenInRegisterRows ? 4 * K * 16 : 0);
    for (int64_t p = p0; p < p1; p += 2)
      for (int64_t m0 = 0; m0 < M; m0 += 16)
        vector_pairs(rows, M, K, w, p, std::min<int64_t>(2, p1 - p), m0, c, widened.data(), epilogue);
  });
}

// tile_product_rows on vectors: the threads split the rows; whole(m0, n) gets rows m0 .. m0 + n - 1
// once every pair's epilogue is done with them.
template <typename Epilogue, typename Whole>
void vector_product_rows(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue,
                         Whole whole) {
  TORCH_CHECK(!w.int8, "vector_product_rows: bf16 panels only (int8 layers add their norm apart)");
  const Rows rows(xp, M, K);
  const int64_t pairs = w.pairs();
  const int64_t block = std::max<int64_t>(1, kVectorBlockBytes / (K * 64)) * 2;  // pairs, an even number
  at::parallel_for(0, (M + 15) / 16, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float c[4][16 * 16];
    for (int64_t c0 = 0; c0 < pairs; c0 += block) {
      const int64_t c1 = std::min(pairs, c0 + block);
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t p = c0; p < c1; p += 2)
          vector_pairs(rows, M, K, w, p, std::min<int64_t>(2, c1 - p), g * 16, c, nullptr, epilogue);
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
