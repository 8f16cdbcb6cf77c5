// One decode task's work: a GQA group of queries against a span of one KV head's keys, read through
// the block table, into a partial softmax (max, sum, weighted values) that paged_decode.cpp merges.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "vec.h"

namespace pdserve_decode {

constexpr int64_t kSpan = 128;  // keys a task scores
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Where keys live: a sequence's block table into the pool, one layer and KV head.
struct Keys {
  const int64_t* table;
  const void* pool;  // the layer's and head's first element in block 0
  int64_t block_stride, block_size, row, v_off;  // in elements

  // out[j] = key t0 + j, for t in [t0, t1): one division, then a walk along the blocks.
  template <typename T>
  void walk(int64_t t0, int64_t t1, const T** out) const {
    int64_t b = t0 / block_size, off = t0 % block_size;
    for (int64_t t = t0; t < t1; ++t) {
      out[t - t0] = static_cast<const T*>(pool) + table[b] * block_stride + off * row;
      if (++off == block_size) off = 0, ++b;
    }
  }
};

// Reads a byte of every line of keys [t0, t1)'s whole rows (from head 0's `keys`, every head's),
// key row then value row: the demand loads that keep the prefetchers streaming ahead, so the heads'
// tasks read from L2. Prefetches alone don't (docs/engine.md, "Decode attention reads its span first").
template <typename T>
inline void touch_span(const Keys& keys, int64_t t0, int64_t t1) {
  const T* k[kSpan];
  keys.walk(t0, t1, k);
  const int64_t row_bytes = keys.row * int64_t{sizeof(T)};
  unsigned char seen = 0;
  for (int64_t j = 0; j < t1 - t0; ++j) {
    const auto* key = reinterpret_cast<const unsigned char*>(k[j]);
    const auto* value = reinterpret_cast<const unsigned char*>(k[j] + keys.v_off);
    for (int64_t b = 0; b < row_bytes; b += 64) seen |= key[b] | value[b];
  }
  asm volatile("" : : "r"(seen));  // the loads have no other use
}

#if defined(PDSERVE_VECTOR)
// A task's rows are scattered (blocks over the pool, one head's rows between the other heads'), a
// pattern the prefetcher doesn't follow: every line of them is asked for up front, `bytes` from each
// key row (to L1) and from its value row (to L2).
template <typename T>
inline void prefetch_rows(const T* const* k, int64_t n, int64_t bytes, int64_t v_off) {
  // GCC 12 deletes the calls of a function of prefetches alone, as free of side effects; the empty
  // volatile asm is one (tests/engine/test_cpu_kernels.py looks for the prefetches in the build).
  asm volatile("" : : "r"(k));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(k[j]) + b, _MM_HINT_T0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(k[j] + v_off) + b, _MM_HINT_T1);
}

// out[g * (D + 2) + x] = sum over keys j < n of p[g * gs + j * js] * value j's dim x (value j at
// k[j] + v_off), for G queries: four vectors of dims at a time, so the 4 G sums, the G weights and
// one vector of the row stay in registers at either vector width (AVX2's 16 hold G = 3; the row's
// four vectors at once spilled there: docs/engine.md, "On a real AVX2-only CPU").
template <typename T, int64_t D, int64_t G>
inline void weigh_values(const T* const* k, int64_t v_off, int64_t n, const float* p, int64_t gs, int64_t js,
                         float* out) {
  using namespace pdserve_vec;
  static_assert(D % (4 * kLanes) == 0, "weigh_values: a head dim of whole four-vector chunks");
  for (int64_t c0 = 0; c0 < D; c0 += 4 * kLanes) {
    floats acc[G][4];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < 4; ++c) acc[g][c] = zeros();
    for (int64_t j = 0; j < n; ++j) {
      const T* v = k[j] + v_off + c0;
      floats w[G];
      for (int64_t g = 0; g < G; ++g) w[g] = splat(p[g * gs + j * js]);
      for (int64_t c = 0; c < 4; ++c) {
        const floats vr = load(v + c * kLanes);
        for (int64_t g = 0; g < G; ++g) acc[g][c] = fmadd(w[g], vr, acc[g][c]);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < 4; ++c) store(out + g * (D + 2) + c0 + c * kLanes, acc[g][c]);
  }
}

// weigh_values for `group` queries, as many at a time as the registers hold (4 with AVX-512, 3 with AVX2).
template <typename T, int64_t D>
inline void weigh_group(const T* const* k, int64_t v_off, int64_t n, const float* p, int64_t gs, int64_t js,
                        int64_t group, float* out) {
  for (int64_t g = 0; g < group;) {
    const float* pg = p + g * gs;
    float* og = out + g * (D + 2);
    const int64_t left = group - g;
    if (pdserve_vec::kLanes == 16 && left >= 4) {
      weigh_values<T, D, 4>(k, v_off, n, pg, gs, js, og), g += 4;
    } else if (left >= 3) {
      weigh_values<T, D, 3>(k, v_off, n, pg, gs, js, og), g += 3;
    } else if (left == 2) {
      weigh_values<T, D, 2>(k, v_off, n, pg, gs, js, og), g += 2;
    } else {
      weigh_values<T, D, 1>(k, v_off, n, pg, gs, js, og), g += 1;
    }
  }
}
#endif

#if defined(__AVX512BF16__)
constexpr bool kDpbf16 = true;
#else
constexpr bool kDpbf16 = false;
#endif
// Whether bf16 scores come from dpbf16 (unscaled query, scale applied to the sum).
template <typename T>
constexpr bool kPairs = kDpbf16 && std::is_same_v<T, at::BFloat16>;

#if defined(__AVX512F__)
using pdserve_vec::load;

// lane j of the result = the sum of v[j]'s lanes: a transpose-and-add tree, 45 instructions for 16
// dot products against 16 horizontal reductions' 128.
inline __m512 sum16(__m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// One query's dot product with one key, as 16 partial sums: bf16 pairs by dpbf16 where the CPU
// has it, else widened to float against the scaled query.
template <typename T, int64_t D>
inline __m512 dot_lanes(const T* q, const float* qf, const T* k) {
#if defined(__AVX512BF16__)
  if constexpr (kPairs<T>) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c), (__m512bh)_mm512_loadu_si512(k + c));
    return acc;
  }
#endif
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qf), load(k));
  for (int64_t c = 16; c < D; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + c), load(k + c), acc);
  return acc;
}

// A task over keys [t0, t1) for `group` queries: part[g] = {max, sum, sum of weighted values [D]}.
template <typename T, int64_t D>
void span_avx512(const T* q, const float* qf, int64_t group, float scale, const Keys& keys, int64_t t0, int64_t t1,
                 float* scores, float* part) {
  const int64_t n = t1 - t0;
  const T* k[kSpan + 15];
  keys.walk(t0, t1, k);
  std::fill(k + n, k + (n + 15) / 16 * 16, k[n - 1]);  // a last partial 16 scores the last key again
  prefetch_rows(k, n, D * int64_t{sizeof(T)}, keys.v_off);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t g = 0; g < group; ++g) {
      __m512 dots[16];
      for (int64_t j = 0; j < 16; ++j) dots[j] = dot_lanes<T, D>(q + g * D, qf + g * D, k[j0 + j]);
      __m512 s = sum16(dots);
      if constexpr (kPairs<T>) s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
      _mm512_storeu_ps(scores + g * kSpan + j0, s);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * kSpan;
    __m512 mx = _mm512_set1_ps(kNegInf);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, m, sg + j));
    }
    const float top = _mm512_reduce_max_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, pdserve_vec::vexp(_mm512_sub_ps(_mm512_loadu_ps(sg + j), _mm512_set1_ps(top))));
      _mm512_storeu_ps(sg + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    part[g * (D + 2)] = top;
    part[g * (D + 2) + 1] = _mm512_reduce_add_ps(sum);
  }
  weigh_group<T, D>(k, keys.v_off, n, scores, kSpan, 1, group, part + 2);
}
#endif

// The same for any dtype and head dim, against the scaled query qf: each key and value row widened
// to float once (into kv, d floats), then used by every query of the group.
template <typename T, int64_t D>
void span_portable(const float* qf, int64_t group, int64_t head_dim, const Keys& keys, int64_t t0, int64_t t1,
                   float* scores, float* part, float* kv) {
  const int64_t d = D ? D : head_dim, n = t1 - t0;
  const T* k[kSpan];
  keys.walk(t0, t1, k);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t x = 0; x < d; ++x) kv[x] = static_cast<float>(k[j][x]);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t x = 0; x < d; ++x) dot += qg[x] * kv[x];
      scores[g * kSpan + j] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * kSpan;
    float top = kNegInf;
    for (int64_t j = 0; j < n; ++j) top = std::max(top, sg[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += (sg[j] = std::exp(sg[j] - top));
    part[g * (d + 2)] = top;
    part[g * (d + 2) + 1] = sum;
    std::fill(part + g * (d + 2) + 2, part + (g + 1) * (d + 2), 0.f);
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t x = 0; x < d; ++x) kv[x] = static_cast<float>(k[j][keys.v_off + x]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * kSpan + j];
      float* acc = part + g * (d + 2) + 2;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) acc[x] += p * kv[x];
    }
  }
}

}  // namespace pdserve_decode
