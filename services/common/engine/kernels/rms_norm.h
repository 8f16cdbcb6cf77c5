// RMSNorm's last step, shared by the norm ops (layer_ops.cpp) and the matmul that ends in one
// (linear_norm.cpp), so both round alike: out = weight * T(x * inv), inv = 1 / rms(x).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "vec.h"

namespace pdserve_norm {

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

// out = weight * T(x * inv), a row of h.
template <typename T>
inline void scale_row(const T* xr, const T* w, T* o, int64_t h, float inv) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (pdserve_vec::kVec16<T>) {
    const __m512 s = _mm512_set1_ps(inv);
    for (; i + 16 <= h; i += 16) {
      const __m512 n = pdserve_vec::round16<T>(_mm512_mul_ps(pdserve_vec::load16(xr + i), s));
      pdserve_vec::store16(o + i, _mm512_mul_ps(pdserve_vec::load16(w + i), n));
    }
  }
#endif
  for (; i < h; ++i)
    o[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(round_to<T>(static_cast<float>(xr[i]) * inv)));
}

inline float inv_rms(float sum_squares, int64_t h, float eps) {
  return 1.f / std::sqrt(sum_squares / static_cast<float>(h) + eps);
}

}  // namespace pdserve_norm
