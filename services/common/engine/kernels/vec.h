// A vector of floats, from and to float or bfloat16 memory (float math throughout): 16 lanes with
// AVX-512, 8 with AVX2 and FMA. The small ops (layer_ops.cpp, rms_norm.h) are written once over it, so
// an AVX2-only CPU runs them vectorized too; what only AVX-512 does (transposes, tiles) is guarded.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PDSERVE_VECTOR 1  // one of the two backends below is built
#include <immintrin.h>

namespace pdserve_vec {

template <typename T>
constexpr bool kVector = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;

}  // namespace pdserve_vec
#endif

#if defined(__AVX512F__)
namespace pdserve_vec {

using floats = __m512;
inline constexpr int64_t kLanes = 16;

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
// 16 packed bf16 as floats: bf16 is float's upper half, so widen and shift.
inline __m512 widen(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }
inline __m512 load(const at::BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Round to nearest even, NaN kept a NaN: what c10::BFloat16(float) does, so both paths round alike.
// Returns the bf16 bits in each lane's low half.
inline __m512i bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// x rounded to bf16 as 16 packed halves. With AVX512_BF16 it is one instruction, which rounds alike
// but flushes subnormals (below 1.2e-38) to zero.
inline __m256i to_bf16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  return _mm512_cvtepi32_epi16(bf16_bits(x));
#endif
}

#if defined(__AVX512BF16__)
// The bf16 pair at p in every lane, as vdpbf16ps takes one operand (copied out: p is not int32 memory).
inline __m512bh broadcast_pair(const at::BFloat16* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}
#endif

inline void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store(at::BFloat16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }

// What storing to T and loading back gives: float is kept, bf16 rounded, as torch rounds each op's result.
template <typename T>
inline __m512 rounded(__m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
  }
}

// e^x, x <= 0: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (error < 2e-7).
inline __m512 vexp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 y = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(y, n);
}

// The 16 x 16 floats in m, transposed in registers: m[i][j] becomes m[j][i] (64 shuffles, where
// gathering the columns costs 16 loads each).
inline void transpose16(__m512 m[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows, interleaved within each 128-bit lane
    t[i] = _mm512_unpacklo_ps(m[i], m[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(m[i], m[i + 1]);
  }
  const auto lo = [&](int a, int b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b])));
  };
  const auto hi = [&](int a, int b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b])));
  };
  for (int g = 0; g < 16; g += 4) {  // then pairs of pairs: lane L of m[g + c] is rows g..g+3 at column 4L + c
    m[g] = lo(g, g + 2);
    m[g + 1] = hi(g, g + 2);
    m[g + 2] = lo(g + 1, g + 3);
    m[g + 3] = hi(g + 1, g + 3);
  }
  for (int c = 0; c < 4; ++c) {  // then whole lanes: column 4L + c is lane L of m[c], m[4 + c], m[8 + c], m[12 + c]
    const __m512 v = _mm512_shuffle_f32x4(m[c], m[4 + c], 0x88), w = _mm512_shuffle_f32x4(m[c], m[4 + c], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(m[8 + c], m[12 + c], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(m[8 + c], m[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(v, v2, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(v, v2, 0xDD);
    t[4 + c] = _mm512_shuffle_f32x4(w, w2, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(w, w2, 0xDD);
  }
  for (int i = 0; i < 16; ++i) m[i] = t[i];
}

inline __m512 zeros() { return _mm512_setzero_ps(); }
inline __m512 splat(float x) { return _mm512_set1_ps(x); }
inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(__m512 x) { return _mm512_reduce_add_ps(x); }
inline __m512 abs(__m512 x) { return _mm512_abs_ps(x); }
// Lanes of `if_negative` where x < 0, else of `otherwise`.
inline __m512 where_negative(__m512 x, __m512 if_negative, __m512 otherwise) {
  return _mm512_mask_mov_ps(otherwise, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), if_negative);
}

}  // namespace pdserve_vec
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
namespace pdserve_vec {

using floats = __m256;
inline constexpr int64_t kLanes = 8;

inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const at::BFloat16* p) {  // bf16 is float's upper half: widen and shift
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// Round to nearest even, NaN kept a NaN (c10::BFloat16(float)'s rounding); bits in each lane's low half.
inline __m256i bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

inline void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store(at::BFloat16* p, __m256 x) {  // the 8 low halves, packed (packus works within 128-bit lanes)
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(x), bf16_bits(x)), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename T>
inline __m256 rounded(__m256 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16));
  }
}

inline __m256 zeros() { return _mm256_setzero_ps(); }
inline __m256 splat(float x) { return _mm256_set1_ps(x); }
inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(__m256 x) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
inline __m256 abs(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
inline __m256 where_negative(__m256 x, __m256 if_negative, __m256 otherwise) {
  return _mm256_blendv_ps(otherwise, if_negative, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// 2^n for whole n in [-150, 0], as two normal factors so that a subnormal result rounds once, as scalef's.
inline __m256 pow2_times(__m256 y, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  const auto pow2 = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2(half)), pow2(_mm256_sub_epi32(ni, half)));
}

// e^x, x <= 0: as the AVX-512 vexp (same reduction and polynomial).
inline __m256 vexp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-104.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 y = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  return pow2_times(y, n);
}

}  // namespace pdserve_vec
#endif

#if defined(PDSERVE_VECTOR)
namespace pdserve_vec {

// RoPE (rotate_half form) on kLanes dims i.. of a head: x1 at dims i, x2 at half + i, c and s the
// token's cos and sin from dim i; each product rounded to T, then the sum, as transformers' unfused
// ops round. (Operators on the vector types are the plain add/sub/mul instructions.)
template <typename T>
inline void rope(floats x1, floats x2, const T* c, const T* s, int64_t half, T* out1, T* out2) {
  const floats lo = rounded<T>(x1 * load(c)) + rounded<T>(zeros() - x2 * load(s));
  const floats hi = rounded<T>(x2 * load(c + half)) + rounded<T>(x1 * load(s + half));
  store(out1, lo);
  store(out2, hi);
}

// silu(x) = x / (1 + e^-x), as 1/(1+e) or e/(1+e) with e = e^-|x| so that nothing overflows.
inline floats silu(floats x) {
  const floats e = vexp(zeros() - abs(x));
  return x * (where_negative(x, e, splat(1.f)) / (splat(1.f) + e));
}

}  // namespace pdserve_vec
#endif
