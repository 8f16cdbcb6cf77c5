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
#if defined(PDSERVE_VECTOR)
  if constexpr (pdserve_vec::kVector<T>) {
    using namespace pdserve_vec;
    const floats s = splat(inv);
    for (; i + kLanes <= h; i += kLanes) store(o + i, load(w + i) * rounded<T>(load(xr + i) * s));
  }
#endif
  for (; i < h; ++i)
    o[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(round_to<T>(static_cast<float>(xr[i]) * inv)));
}

inline float inv_rms(float sum_squares, int64_t h, float eps) {
  return 1.f / std::sqrt(sum_squares / static_cast<float>(h) + eps);
}

}  // namespace pdserve_norm
