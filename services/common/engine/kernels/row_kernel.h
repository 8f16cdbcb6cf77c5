// pdserve's row kernel: x [M, K] . w [N, K]^T summed in float32, weight rows split over the threads
// and each read from memory once for all of x, so a few rows cost about one read of the weights.
// float32 or bf16 (widened in registers, or dpbf16 where the CPU has AVX512_BF16); the result is
// stored as O, rounded once. Each output is summed in one order whatever M, so a row's result does
// not depend on what else ran in its step.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace pdserve_rows {

// Activation rows per pass over a weight row: kRows x kRowsW sums stay in registers (32 with AVX-512,
// 16 with AVX2).
#if defined(__AVX512F__) || !defined(PDSERVE_VECTOR)
constexpr int64_t kRows = 4;
#else
constexpr int64_t kRows = 2;
#endif
constexpr int64_t kRowsW = 4;  // weight rows per pass
// For a single activation row (a decode step of one sequence, memory-bound): more weight rows, so
// more lines in flight (fp32, one row: 7% faster than 4 as AVX2, over a step's layers).
constexpr int64_t kRowsWOne = 8;
constexpr int64_t kTile = 16;
// One row's pass leaves its weights, one contiguous stream, to the hardware prefetcher on AVX2: on
// an AVX2-only AMD EPYC (Zen 3) asking 1 KB ahead along each row read a step's weights 20% slower.
// The AVX-512 hosts keep the prefetch that was timed faster there.
#if defined(__AVX512F__)
constexpr bool kStreamOne = false;
#else
constexpr bool kStreamOne = true;
#endif  // weight rows that stay in L1 while every activation row passes over them

// sums[r * kRows + m] = x[m] . w[r] for r < NR weight rows and m < rows <= MR activation rows, in
// float32. NR x rows independent sums keep the multiply-add units busy (one chain would wait on its
// latency). MR = 1 for one row: with a bound known only at run time, bf16's one-row pass read a
// step's weights 15% slower (AVX-512; float32 the same either way).
// Not inlined: inlined into a caller with more values live, its sums spilled to the stack and a pass
// took twice as long (bf16 at 32 rows as AVX2, with the result rounded to bf16; at times float32 too).
template <int64_t NR, typename T, int64_t MR = kRows>
[[gnu::noinline]] void dot(const T* x, const T* w, int64_t K, int64_t rows_given, float* sums) {
  static_assert(MR == 1 || MR == kRows);
  const int64_t rows = MR == 1 ? 1 : rows_given;
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    __m512 acc[NR][MR];
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t m = 0; m < rows; ++m) acc[r][m] = _mm512_setzero_ps();
    auto step = [&](__mmask32 mask) {
      __m512bh wv[NR];
      for (int64_t r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
      for (int64_t m = 0; m < rows; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
        for (int64_t r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    };
    for (; k + 32 <= K; k += 32) step((__mmask32)~0u);
    if (k < K) {
      step((__mmask32)((1ull << (K - k)) - 1));
      k = K;
    }
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t m = 0; m < rows; ++m) sums[r * kRows + m] = _mm512_reduce_add_ps(acc[r][m]);
  } else
#endif
  {
#if defined(PDSERVE_VECTOR)
    using namespace pdserve_vec;
    floats acc[NR][MR];
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t m = 0; m < rows; ++m) acc[r][m] = zeros();
    for (; k + kLanes <= K; k += kLanes) {
      floats wv[NR];
      for (int64_t r = 0; r < NR; ++r) {
        if (k * int64_t{sizeof(T)} % 64 == 0 && !(MR == 1 && kStreamOne))  // once a line (AVX2: every other load)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + 1024, _MM_HINT_T0);
        wv[r] = load(w + r * K + k);
      }
      for (int64_t m = 0; m < rows; ++m) {
        const floats xv = load(x + m * K + k);
        for (int64_t r = 0; r < NR; ++r) acc[r][m] = fmadd(wv[r], xv, acc[r][m]);
      }
    }
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t m = 0; m < rows; ++m) sums[r * kRows + m] = sum(acc[r][m]);
#else
    for (int64_t i = 0; i < NR * kRows; ++i) sums[i] = 0.f;
#endif
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = k; j < K; ++j)
        sums[r * kRows + m] += static_cast<float>(x[m * K + j]) * static_cast<float>(w[r * K + j]);
}

// n float sums into O, bf16 rounded by the vector store for every element, the tail too (with
// AVX512_BF16 it flushes subnormals, which c10's conversion keeps): a row's bits then never depend
// on where a thread's chunk of columns ends.
template <typename O>
inline void store_as(const float* src, O* dst, int64_t n) {
#if defined(PDSERVE_VECTOR)
  if constexpr (pdserve_vec::kVector<O>) {
    using namespace pdserve_vec;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
    if (i < n) {
      float padded[kLanes] = {};
      O rounded_tail[kLanes];
      std::copy(src + i, src + n, padded);
      store(rounded_tail, load(padded));
      std::copy(rounded_tail, rounded_tail + (n - i), dst + i);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<O>(src[i]);
}

// rows_product for one activation row, kRowsWOne weight rows a pass.
template <typename T, typename O>
void row_product(const T* xp, const T* wp, O* op, int64_t N, int64_t K) {
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    float sums[kRowsWOne * kRows];
    std::vector<float> own;  // a bf16 result's sums, rounded at the end
    float* out;
    if constexpr (std::is_same_v<O, float>) {
      out = op + n0;
    } else {
      own.resize(n1 - n0);
      out = own.data();
    }
    int64_t n = n0;
    for (; n + kRowsWOne <= n1; n += kRowsWOne) {
      dot<kRowsWOne, T, 1>(xp, wp + n * K, K, 1, sums);
      for (int64_t r = 0; r < kRowsWOne; ++r) out[n - n0 + r] = sums[r * kRows];
    }
    for (; n < n1; ++n) {
      dot<1, T, 1>(xp, wp + n * K, K, 1, sums);
      out[n - n0] = sums[0];
    }
    if constexpr (!std::is_same_v<O, float>) store_as(out, op + n0, n1 - n0);
  });
}

// Weight rows [t, t + width) (wt: row t's) against every activation row: out[m * ld + n - t], float32.
template <typename T>
inline void tile_sums(const T* xp, const T* wt, float* out, int64_t ld, int64_t M, int64_t K, int64_t width) {
  float sums[kRowsW * kRows];
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    int64_t n = 0;
    for (; n + kRowsW <= width; n += kRowsW) {
      dot<kRowsW>(xp + m0 * K, wt + n * K, K, rows, sums);
      for (int64_t r = 0; r < kRowsW; ++r)
        for (int64_t m = 0; m < rows; ++m) out[(m0 + m) * ld + n + r] = sums[r * kRows + m];
    }
    for (; n < width; ++n) {
      dot<1>(xp + m0 * K, wt + n * K, K, rows, sums);
      for (int64_t m = 0; m < rows; ++m) out[(m0 + m) * ld + n] = sums[m];
    }
  }
}

// out [M, N] = x [M, K] . w [N, K]^T, weight rows split over the threads, kTile at a time.
template <typename T, typename O>
void rows_product(const T* xp, const T* wp, O* op, int64_t M, int64_t N, int64_t K) {
  if (M == 1) return row_product(xp, wp, op, N, K);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    std::vector<float> own(std::is_same_v<O, float> ? 0 : M * kTile);  // a bf16 result's sums, a tile at a time
    for (int64_t t = n0; t < n1; t += kTile) {
      const int64_t width = std::min(kTile, n1 - t);
      if constexpr (std::is_same_v<O, float>) {
        tile_sums(xp, wp + t * K, op + t, N, M, K, width);
      } else {
        tile_sums(xp, wp + t * K, own.data(), kTile, M, K, width);
        for (int64_t m = 0; m < M; ++m) store_as(own.data() + m * kTile, op + m * N + t, width);
      }
    }
  });
}

}  // namespace pdserve_rows
