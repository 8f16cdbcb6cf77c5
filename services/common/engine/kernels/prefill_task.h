// One prefill-attention task's work, for prefill_attention.cpp: 16 query rows of one head against
// blocks of keys packed from the pool (scores and values through AMX tiles, the softmax between).
// Where the CPU has no AMX, on vectors: scores by AVX512_BF16 dot products, values in float32.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "amx.h"
#include "vec.h"

#if defined(__AVX512BF16__)
namespace pdserve_prefill {

constexpr int64_t kRows = 16;    // query rows a task: one tile's width
constexpr int64_t kChunk = 64;   // keys a step of k . q^T
constexpr int64_t kBlock = 128;  // keys a step of the softmax and of v^T . p^T
// How far a score may pass the max its numerators are taken against before they are rescaled:
// numerators stay <= 2^8, and what was summed is rarely rescaled.
constexpr float kSlack = 8.f;

#if defined(PDSERVE_AMX)
using Value = at::BFloat16;  // the transposed values, as the tiles take them
#else
// On vectors the softmax numerators stay float32 and meet the values in float32. Rounded to bf16 for
// dpbf16 (40% faster), bf16 agreed with fp32's next tokens at 97.5%, under the 98% gate.
using Value = float;
#endif

struct Shape {
  int64_t heads, kv_heads, d, ctx, padded;  // padded: ctx rounded up to kChunk
  // A row of the transposed values is a cache line longer than `padded`: at a power-of-two stride
  // the 16 rows a tile loads share two L1 sets and evict each other (v^T . p^T ran at a third of
  // the tiles' speed).
  int64_t vstride() const { return padded + 32; }
};

// 2^x for x <= kSlack, kept at least 2^-100: a subnormal result would cost a microcode assist in every op
// it meets. 2^x = 2^floor(x) 2^f with f in [0, 1): 2^f by a degree-3 minimax polynomial (relative
// error < 8e-5, far below the bf16 rounding of the numerators, and of the scores' inputs), and
// vscalefps applies 2^floor(x).
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.07802278f), f, _mm512_set1_ps(0.22606549f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.69583648f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.99992476f));
  return _mm512_scalef_ps(y, x);
}

#if defined(PDSERVE_AMX)
// Tiles 4-7 += four A tiles of 16 rows each, 64 consecutive rows of `a` (`stride` elements apart),
// times the B tile in tile 0.
inline void multiply_four(const at::BFloat16* a, int64_t stride) {
  _tile_loadd(2, a, stride * 2);
  _tile_dpbf16ps(4, 2, 0);
  _tile_loadd(3, a + 16 * stride, stride * 2);
  _tile_dpbf16ps(5, 3, 0);
  _tile_loadd(2, a + 32 * stride, stride * 2);
  _tile_dpbf16ps(6, 2, 0);
  _tile_loadd(3, a + 48 * stride, stride * 2);
  _tile_dpbf16ps(7, 3, 0);
}

// k . q^T for keys k0 .. k0 + kChunk into sc, [key][row] (tiles 4-7).
inline void score_chunk(const at::BFloat16* kp, const uint32_t* qb, int64_t d, int64_t k0, float* sc) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t c = 0; c < d / 32; ++c) {
    _tile_loadd(0, qb + c * 16 * kRows, 64);
    multiply_four(kp + k0 * d + c * 32, d);
  }
  _tile_stored(4, sc, 64);
  _tile_stored(5, sc + 16 * kRows, 64);
  _tile_stored(6, sc + 32 * kRows, 64);
  _tile_stored(7, sc + 48 * kRows, 64);
}

// acc += v^T . p^T for keys k0 .. k0 + n, 64 value dims at a time: the output's tiles (4-7) are
// loaded and stored once for the n keys.
inline void add_values(const at::BFloat16* vt, const at::BFloat16* pb, const Shape& s, int64_t k0, int64_t n,
                       float* acc) {
  const int64_t stride = s.vstride();
  for (int64_t e0 = 0; e0 < s.d; e0 += 64) {
    _tile_loadd(4, acc + e0 * kRows, 64);
    _tile_loadd(5, acc + (e0 + 16) * kRows, 64);
    _tile_loadd(6, acc + (e0 + 32) * kRows, 64);
    _tile_loadd(7, acc + (e0 + 48) * kRows, 64);
    for (int64_t k = 0; k < n; k += 32) {
      _tile_loadd(0, pb + k * kRows, 64);
      multiply_four(vt + e0 * stride + k0 + k, stride);
    }
    _tile_stored(4, acc + e0 * kRows, 64);
    _tile_stored(5, acc + (e0 + 16) * kRows, 64);
    _tile_stored(6, acc + (e0 + 32) * kRows, 64);
    _tile_stored(7, acc + (e0 + 48) * kRows, 64);
  }
}
#else
// The same two products on vectors, a query row per lane: k . q^T by dpbf16, one pair of d at a time,
// the key's pair broadcast; v^T . p^T by float32 multiply-adds, the value broadcast.
constexpr int64_t kKeys = 16;  // keys (scores) or dims (values) whose sums stay in registers

inline void score_chunk(const at::BFloat16* kp, const uint32_t* qb, int64_t d, int64_t k0, float* sc) {
  for (int64_t t = k0; t < k0 + kChunk; t += kKeys) {
    __m512 acc[kKeys];
    for (int64_t i = 0; i < kKeys; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; ++p) {
      const __m512bh qv = (__m512bh)_mm512_load_si512(qb + p * kRows);
      for (int64_t i = 0; i < kKeys; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], qv, pdserve_vec::broadcast_pair(kp + (t + i) * d + 2 * p));
    }
    for (int64_t i = 0; i < kKeys; ++i) _mm512_store_ps(sc + (t - k0 + i) * kRows, acc[i]);
  }
}

// acc += v^T . p^T for keys k0 .. k0 + n, p the float32 numerators as the softmax left them, [key][row].
inline void add_values(const float* vt, const float* p, const Shape& s, int64_t k0, int64_t n, float* acc) {
  const int64_t stride = s.vstride();
  for (int64_t e0 = 0; e0 < s.d; e0 += kKeys) {
    __m512 a[kKeys];
    for (int64_t i = 0; i < kKeys; ++i) a[i] = _mm512_load_ps(acc + (e0 + i) * kRows);
    for (int64_t k = 0; k < n; ++k) {
      const __m512 pv = _mm512_load_ps(p + k * kRows);
      for (int64_t i = 0; i < kKeys; ++i)
        a[i] = _mm512_fmadd_ps(pv, _mm512_set1_ps(vt[(e0 + i) * stride + k0 + k]), a[i]);
    }
    for (int64_t i = 0; i < kKeys; ++i) _mm512_store_ps(acc + (e0 + i) * kRows, a[i]);
  }
}
#endif

// Rows [r0, r0 + 16) of one query head, whose first row sits at position `first`. Everything is
// computed transposed, a query row per lane: scores as [key][row], so the running softmax is
// elementwise across the rows (no horizontal reductions), and the output as [d][row].
//
// A block of keys is three steps: its scores (tiles), their softmax (vector units) and its values
// (tiles). Each step reads what the one before stored, and a load waits for the stores it reads to
// finish, so a thread runs four tasks in lockstep: the others' steps run while one's stores complete
// (on vectors, one task at a time).
struct RowTask {
  const at::BFloat16* kp;
  const Value* vt;
  const Shape* s;
  int64_t r0, rows, low, high, blocks;  // low, high: the rows' positions (within the context)
  __m512 k2, top, total;  // top: the max the numerators are taken against, scaled to base 2
  __m512i pos;
  alignas(64) uint32_t qb[128 / 2 * kRows];     // q^T in pairs of d: the B operand of k . q^T
#if defined(PDSERVE_AMX)
  alignas(64) at::BFloat16 pb[kBlock * kRows];  // p^T in pairs of keys: the B operand of v^T . p^T
#endif
  alignas(64) float sc[kBlock * kRows];         // a block's scores, [key][row]
  alignas(64) float acc[128 * kRows];           // the output, [d][row]

  void start(const at::BFloat16* q, int64_t q_stride, int64_t q_len, const at::BFloat16* keys,
             const Value* values, const Shape& shape, int64_t row0, int64_t first, float scale) {
    kp = keys, vt = values, s = &shape, r0 = row0, rows = std::min(kRows, q_len - r0);
    low = first + r0, high = std::min(first + r0 + rows - 1, s->ctx - 1);
    blocks = high / kBlock + 1;
    // q^T: 16 pairs of d a row, for 16 rows, transposed in registers (the bits moved, not converted).
    for (int64_t c = 0; c < s->d / 32; ++c) {
      __m512 m[16];
      for (int64_t r = 0; r < kRows; ++r)
        m[r] = r < rows ? _mm512_loadu_ps(q + (r0 + r) * q_stride + c * 32) : _mm512_setzero_ps();
      pdserve_vec::transpose16(m);
      for (int64_t j = 0; j < 16; ++j) _mm512_store_ps(reinterpret_cast<float*>(qb + (c * 16 + j) * kRows), m[j]);
    }
    std::fill(acc, acc + s->d * kRows, 0.f);
    k2 = _mm512_set1_ps(scale * 1.44269504f);  // scores in base 2: 2^(x k2) = e^(x scale)
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    pos = _mm512_add_epi32(_mm512_set1_epi32(low), lanes);
    top = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), total = _mm512_setzero_ps();
  }

  // The keys of the block from key b0 on: whole chunks, up to the last row's position.
  int64_t keys_in(int64_t b0) const { return std::min(kBlock, (high - b0) / kChunk * kChunk + kChunk); }

  void score(int64_t b) {
    const int64_t b0 = b * kBlock;
    for (int64_t k0 = b0; k0 < b0 + keys_in(b0); k0 += kChunk) score_chunk(kp, qb, s->d, k0, sc + (k0 - b0) * kRows);
  }

  void softmax(int64_t b) {
    const int64_t b0 = b * kBlock, n = keys_in(b0);
    // The block's max: a key past a row's position is never its max, nor summed.
    const int64_t unmasked = std::clamp<int64_t>(low + 1 - b0, 0, n);  // keys every row sees
    __m512 m0 = top, m1 = top;
    int64_t j = 0;
    for (; j + 1 < unmasked; j += 2) {
      m0 = _mm512_max_ps(m0, _mm512_mul_ps(_mm512_load_ps(sc + j * kRows), k2));
      m1 = _mm512_max_ps(m1, _mm512_mul_ps(_mm512_load_ps(sc + (j + 1) * kRows), k2));
    }
    for (; j < n; ++j)
      m0 = _mm512_mask_max_ps(m0, _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j)), m0,
                              _mm512_mul_ps(_mm512_load_ps(sc + j * kRows), k2));
    const __m512 mx = _mm512_max_ps(m0, m1);
    if (_mm512_cmp_ps_mask(mx, _mm512_add_ps(top, _mm512_set1_ps(kSlack)), _CMP_GT_OQ)) {
      const __m512 alpha = exp2_16(_mm512_sub_ps(top, mx));  // 0 on the first block
      total = _mm512_mul_ps(total, alpha);
      for (int64_t e = 0; e < s->d; ++e)
        _mm512_store_ps(acc + e * kRows, _mm512_mul_ps(_mm512_load_ps(acc + e * kRows), alpha));
      top = mx;
    }
#if defined(PDSERVE_AMX)
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#endif
    __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < n; j += 2) {
      __m512 p0 = exp2_16(_mm512_fmsub_ps(_mm512_load_ps(sc + j * kRows), k2, top));
      __m512 p1 = exp2_16(_mm512_fmsub_ps(_mm512_load_ps(sc + (j + 1) * kRows), k2, top));
      if (j + 1 >= unmasked) {
        p0 = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j)), p0);
        p1 = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j + 1)), p1);
      }
      sums[j / 2 % 2] = _mm512_add_ps(sums[j / 2 % 2], p0);
      sums[2 + j / 2 % 2] = _mm512_add_ps(sums[2 + j / 2 % 2], p1);
#if defined(PDSERVE_AMX)
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0's 16 rows, then p1's
      _mm512_store_si512(pb + j * kRows, _mm512_permutexvar_epi16(pairs, both));
#else
      _mm512_store_ps(sc + j * kRows, p0);
      _mm512_store_ps(sc + (j + 1) * kRows, p1);
#endif
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3])));
  }

#if defined(PDSERVE_AMX)
  void add(int64_t b) { add_values(vt, pb, *s, b * kBlock, keys_in(b * kBlock), acc); }
#else
  void add(int64_t b) { add_values(vt, sc, *s, b * kBlock, keys_in(b * kBlock), acc); }
#endif

  void finish(at::BFloat16* out, int64_t out_stride) {
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), total);
    for (int64_t e0 = 0; e0 < s->d; e0 += 16) {  // back to [row][d], 16 dims at a time
      __m512 m[16];
      for (int64_t i = 0; i < 16; ++i) m[i] = _mm512_mul_ps(_mm512_load_ps(acc + (e0 + i) * kRows), inv);
      pdserve_vec::transpose16(m);
      for (int64_t r = 0; r < rows; ++r) pdserve_vec::store(out + (r0 + r) * out_stride + e0, m[r]);
    }
  }
};

}  // namespace pdserve_prefill
#endif
