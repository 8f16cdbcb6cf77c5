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

// Activation rows a pass over a group of weight rows. With AVX-512's 32 registers, the groups are
// kRowsW rows of a kTile that stays in L1 while every activation row passes (AVX2: group_product).
constexpr int64_t kRows = 4;
constexpr int64_t kRowsW = 4;
// For a single activation row (a decode step of one sequence, memory-bound): more weight rows, so
// more lines in flight (fp32, one row: 7% faster than 4 as AVX2, over a step's layers).
constexpr int64_t kRowsWOne = 8;
constexpr int64_t kTile = 16;  // weight rows that stay in L1 while every activation row passes over them
// On AVX2 the weight rows, contiguous streams, are left to the hardware prefetcher: on an AVX2-only
// AMD EPYC (Zen 3), asking 1 KB ahead along each row read a step's weights 10-20% slower, one row or
// a few. The AVX-512 hosts keep the prefetch that was timed faster there.
#if defined(__AVX512F__)
constexpr bool kPrefetch = true;
#else
constexpr bool kPrefetch = false;
#endif

// sums[r * MR + m] = x[m] . w[r] for NR weight rows and MR activation rows, in float32. NR x MR
// independent sums keep the multiply-add units busy (one chain would wait on its latency). Both
// counts are constants: with a bound known only at run time, the sums left the registers (bf16's
// one-row pass 15% slower with AVX-512; float32 with 2-8 rows 20-30% slower as AVX2, on Zen 3).
// Not inlined: inlined into a caller with more values live, its sums spilled to the stack and a pass
// took twice as long (bf16 at 32 rows as AVX2, with the result rounded to bf16; at times float32 too).
template <int64_t NR, typename T, int64_t MR>
[[gnu::noinline]] void dot(const T* x, const T* w, int64_t K, float* sums) {
  constexpr int64_t rows = MR;
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
      for (int64_t m = 0; m < rows; ++m) sums[r * MR + m] = _mm512_reduce_add_ps(acc[r][m]);
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
        if (kPrefetch && k * int64_t{sizeof(T)} % 64 == 0)  // once a line
          _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + 1024, _MM_HINT_T0);
        wv[r] = load(w + r * K + k);
      }
      for (int64_t m = 0; m < rows; ++m) {
        const floats xv = load(x + m * K + k);
        for (int64_t r = 0; r < NR; ++r) acc[r][m] = fmadd(wv[r], xv, acc[r][m]);
      }
    }
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t m = 0; m < rows; ++m) sums[r * MR + m] = sum(acc[r][m]);
#else
    for (int64_t i = 0; i < NR * MR; ++i) sums[i] = 0.f;
#endif
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = k; j < K; ++j)
        sums[r * MR + m] += static_cast<float>(x[m * K + j]) * static_cast<float>(w[r * K + j]);
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

// f.template operator()<R>() for R = rows, a constant in 1..Max: dot's row count from a run-time one.
template <int64_t Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f.template operator()<Max>();
}

// out [M, N] = x [M, K] . w [N, K]^T as float32 sums, weight rows split over the threads: each(n, n1,
// out, ld) sums some of a thread's rows [n, n1) into out (column n, row stride ld) and says how many;
// a bf16 result is rounded once at the end of a thread's share.
template <typename O, typename Each>
void split_rows(O* op, int64_t M, int64_t N, Each&& each) {
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    std::vector<float> own(std::is_same_v<O, float> ? 0 : M * (n1 - n0));  // ld n1 - n0
    for (int64_t n = n0; n < n1;) {
      if constexpr (std::is_same_v<O, float>) {
        n += each(n, n1, op + n, N);
      } else {
        n += each(n, n1, own.data() + n - n0, n1 - n0);
      }
    }
    if constexpr (!std::is_same_v<O, float>)
      for (int64_t m = 0; m < M; ++m) store_as(own.data() + m * (n1 - n0), op + m * N + n0, n1 - n0);
  });
}

// NR weight rows from `w` against every activation row, MR at a time: out[m * ld + r], float32.
template <int64_t NR, int64_t MR, typename T>
inline void rows_against(const T* xp, const T* w, float* out, int64_t ld, int64_t M, int64_t K) {
  float sums[NR * MR];
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    with_rows<MR>(std::min(MR, M - m0), [&]<int64_t R>() {
      dot<NR, T, R>(xp + m0 * K, w, K, sums);
      for (int64_t r = 0; r < NR; ++r)
        for (int64_t m = 0; m < R; ++m) out[(m0 + m) * ld + r] = sums[r * R + m];
    });
}

// Weight rows [t, t + width) (wt: row t's) against every activation row: out[m * ld + n - t], float32.
template <typename T>
inline void tile_sums(const T* xp, const T* wt, float* out, int64_t ld, int64_t M, int64_t K, int64_t width) {
  int64_t n = 0;
  for (; n + kRowsW <= width; n += kRowsW) rows_against<kRowsW, kRows>(xp, wt + n * K, out + n, ld, M, K);
  for (; n < width; ++n) rows_against<1, kRows>(xp, wt + n * K, out + n, ld, M, K);
}

// Each group of NR weight rows read once while every activation row passes over it, kRows at a
// time: one row (any ISA, kRowsWOne) and, with AVX2's 16 registers, a few, NR chosen so that the
// sums, the weight vectors and an activation vector fill them (docs/engine.md has the timings).
template <int64_t NR, typename T, typename O>
void group_product(const T* xp, const T* wp, O* op, int64_t M, int64_t N, int64_t K) {
  split_rows(op, M, N, [&](int64_t n, int64_t n1, float* out, int64_t ld) -> int64_t {
    if (n + NR > n1) {
      rows_against<1, kRows>(xp, wp + n * K, out, ld, M, K);
      return 1;
    }
    rows_against<NR, kRows>(xp, wp + n * K, out, ld, M, K);
    return NR;
  });
}

// out [M, N] = x [M, K] . w [N, K]^T: the weight rows split over the threads, and each read from
// memory once for all of x.
template <typename T, typename O>
void rows_product(const T* xp, const T* wp, O* op, int64_t M, int64_t N, int64_t K) {
  if (M == 1) return group_product<kRowsWOne>(xp, wp, op, M, N, K);
#if !defined(__AVX512F__) && defined(PDSERVE_VECTOR)
  if (M == 2) return group_product<6>(xp, wp, op, M, N, K);
  if (M == 3) return group_product<4>(xp, wp, op, M, N, K);
  group_product<3>(xp, wp, op, M, N, K);
#else
  split_rows(op, M, N, [&](int64_t t, int64_t n1, float* out, int64_t ld) -> int64_t {
    const int64_t width = std::min(kTile, n1 - t);
    tile_sums(xp, wp + t * K, out, ld, M, K, width);
    return width;
  });
#endif
}

}  // namespace pdserve_rows
