// Sixteen floats at a time with AVX-512, from and to float or bfloat16 memory (float math throughout).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace pdserve_vec {

template <typename T>
constexpr bool kVec16 = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is float's upper half: widen and shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

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

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(at::BFloat16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }

// What storing to T and loading back gives: float is kept, bf16 rounded, as torch rounds each op's result.
template <typename T>
inline __m512 round16(__m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
  }
}

// e^x, x <= 0: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (error < 2e-7).
inline __m512 exp16(__m512 x) {
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

// RoPE (rotate_half form) on 16 dims i.. of a head: x1 at dims i, x2 at half + i, c and s the token's
// cos and sin from dim i; each product rounded to T, then the sum, as transformers' unfused ops round.
template <typename T>
inline void rope16(__m512 x1, __m512 x2, const T* c, const T* s, int64_t half, T* out1, T* out2) {
  const __m512 lo = _mm512_add_ps(round16<T>(_mm512_mul_ps(x1, load16(c))),
                                  round16<T>(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(x2, load16(s)))));
  const __m512 hi =
      _mm512_add_ps(round16<T>(_mm512_mul_ps(x2, load16(c + half))), round16<T>(_mm512_mul_ps(x1, load16(s + half))));
  store16(out1, lo);
  store16(out2, hi);
}

// silu(x) = x / (1 + e^-x), as 1/(1+e) or e/(1+e) with e = e^-|x| so that nothing overflows.
inline __m512 silu16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 num = _mm512_mask_mov_ps(one, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e);
  return _mm512_mul_ps(x, _mm512_div_ps(num, _mm512_add_ps(one, e)));
}

}  // namespace pdserve_vec
#endif
