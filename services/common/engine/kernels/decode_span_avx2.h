// A decode task's work on 8-lane vectors, for CPUs with AVX2 and FMA but no AVX-512: what
// span_avx512 (decode_span.h) does, with the same partial softmax, for float and bf16 pools.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "decode_span.h"
#include "vec.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
namespace pdserve_decode {

// lane j of the result = the sum of v[j]'s lanes: 9 instructions for 8 dot products.
inline __m256 sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// A task over keys [t0, t1) for `group` queries (qf: scaled): part[g] = {max, sum, weighted values [D]}.
template <typename T, int64_t D>
void span_avx2(const float* qf, int64_t group, const Keys& keys, int64_t t0, int64_t t1, float* scores, float* part) {
  const int64_t n = t1 - t0;
  const T* k[kSpan + 7];
  keys.walk(t0, t1, k);
  std::fill(k + n, k + (n + 7) / 8 * 8, k[n - 1]);  // a last partial 8 scores the last key again
  prefetch_rows(k, n, D * int64_t{sizeof(T)}, keys.v_off);
  for (int64_t j0 = 0; j0 < n; j0 += 8)
    for (int64_t g = 0; g < group; ++g) {
      __m256 dots[8];
      for (int64_t j = 0; j < 8; ++j) dots[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qf + g * D + c);
        for (int64_t j = 0; j < 8; ++j) dots[j] = _mm256_fmadd_ps(qv, pdserve_vec::load(k[j0 + j] + c), dots[j]);
      }
      _mm256_storeu_ps(scores + g * kSpan + j0, sum8(dots));
    }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * kSpan;
    const float top = *std::max_element(sg, sg + n);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = pdserve_vec::vexp(_mm256_sub_ps(_mm256_loadu_ps(sg + j), _mm256_set1_ps(top)));
      _mm256_storeu_ps(sg + j, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = pdserve_vec::sum(total);
    for (; j < n; ++j) sum += (sg[j] = std::exp(sg[j] - top));
    part[g * (D + 2)] = top;
    part[g * (D + 2) + 1] = sum;
  }
  weigh_group<T, D>(k, keys.v_off, n, scores, kSpan, 1, group, part + 2);
}

}  // namespace pdserve_decode
#endif
