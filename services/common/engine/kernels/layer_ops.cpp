// A Llama layer's small ops, fused: RMSNorm (with the residual add before it), RoPE with the
// KV write into the pool, and SiLU(gate) * up. Each rounds where transformers' torch ops round
// (every op's result in the model's dtype), so bf16 results match the unfused modules'.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "rms_norm.h"
#include "vec.h"

namespace {

using pdserve_norm::inv_rms;
using pdserve_norm::round_to;
using pdserve_norm::scale_row;

// out = weight * T(x / rms(x)) over each row (transformers' LlamaRMSNorm).
template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      int64_t i = 0;
      float ss = 0.f;
#if defined(PDSERVE_VECTOR)
      if constexpr (pdserve_vec::kVector<T>) {
        using namespace pdserve_vec;
        floats acc = zeros();
        for (; i + kLanes <= h; i += kLanes) {
          const floats v = load(xr + i);
          acc = fmadd(v, v, acc);
        }
        ss = sum(acc);
      }
#endif
      for (int64_t j = i; j < h; ++j) ss += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
      scale_row(xr, w, out + r * h, h, inv_rms(ss, h, eps));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.size(-1) == weight.size(0), "rms_norm: shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: dtypes differ");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       x.numel() / x.size(-1), x.size(-1), static_cast<float>(eps));
  });
  return out;
}

// residual += x (rounded as a torch add), then out = the RMSNorm of the new residual: a row at a
// time, so the row is normalized while it is in L1 (one pass over x and the residual, not two).
template <typename T>
void add_rms_rows(const T* x, T* residual, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* res = residual + r * h;
      int64_t i = 0;
      float ss = 0.f;
#if defined(PDSERVE_VECTOR)
      if constexpr (pdserve_vec::kVector<T>) {
        using namespace pdserve_vec;
        floats acc = zeros();
        for (; i + kLanes <= h; i += kLanes) {
          const floats v = rounded<T>(load(res + i) + load(xr + i));
          store(res + i, v);
          acc = fmadd(v, v, acc);
        }
        ss = sum(acc);
      }
#endif
      for (int64_t j = i; j < h; ++j) {
        res[j] = round_to<T>(static_cast<float>(res[j]) + static_cast<float>(xr[j]));
        ss += static_cast<float>(res[j]) * static_cast<float>(res[j]);
      }
      scale_row(res, w, out + r * h, h, inv_rms(ss, h, eps));
    }
  });
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.is_contiguous() && residual.is_contiguous(), "add_rms_norm: shapes");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "add_rms_norm: dtypes differ");
  TORCH_CHECK(weight.is_contiguous() && x.size(-1) == weight.size(0) && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: weight");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), x.numel() / x.size(-1), x.size(-1), static_cast<float>(eps));
  });
  return out;
}

// [T, 2I] -> [T, I]: T(T(silu(gate)) * up), silu(g) = g / (1 + e^-g).
template <typename T>
void silu_mul_rows(const T* gp, T* op, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * inter;
      const T* u = g + inter;
      T* o = op + r * inter;
      int64_t i = 0;
#if defined(PDSERVE_VECTOR)
      if constexpr (pdserve_vec::kVector<T>) {
        using namespace pdserve_vec;
        for (; i + kLanes <= inter; i += kLanes) store(o + i, rounded<T>(silu(load(g + i))) * load(u + i));
      }
#endif
      for (; i < inter; ++i) {
        const float x = static_cast<float>(g[i]);
        const T silu = round_to<T>(x / (1.f + std::exp(-x)));
        o[i] = round_to<T>(static_cast<float>(silu) * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "silu_mul: [T, 2I]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
  });
  return out;
}

// One head's rotary embedding (rotate_half form): out = T(T(x * cos) + T(rotate_half(x) * sin)).
template <typename T>
inline void rotate(const T* x, const T* c, const T* s, T* out, int64_t d) {
  const int64_t half = d / 2;
  int64_t i = 0;
#if defined(PDSERVE_VECTOR)
  if constexpr (pdserve_vec::kVector<T>) {
    using namespace pdserve_vec;
    for (; i + kLanes <= half; i += kLanes)
      rope(load(x + i), load(x + half + i), c + i, s + i, half, out + i, out + half + i);
  }
#endif
  for (; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    const float a = static_cast<float>(round_to<T>(x1 * static_cast<float>(c[i])));
    const float b = static_cast<float>(round_to<T>(-(x2 * static_cast<float>(s[i]))));
    const float a2 = static_cast<float>(round_to<T>(x2 * static_cast<float>(c[half + i])));
    const float b2 = static_cast<float>(round_to<T>(x1 * static_cast<float>(s[half + i])));
    out[i] = round_to<T>(a + b);
    out[half + i] = round_to<T>(a2 + b2);
  }
}

// qkv [T, (heads + 2 kv_heads) * d] -> q [T, heads, d], rotated; the rotated keys and the values
// are written into the pool [blocks, layers, 2, block_size, kv_heads, d] at each token's slot.
at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache,
                      int64_t layer, const at::Tensor& slot_blocks, const at::Tensor& slot_offsets, int64_t heads,
                      int64_t kv_heads) {
  const int64_t tokens = qkv.size(0), d = cache.size(5);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * d, "rope_cache: qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * d && sin.numel() == tokens * d,
              "rope_cache: cos/sin [T, d]");
  TORCH_CHECK(cache.is_contiguous() && cache.size(4) == kv_heads && d % 2 == 0, "rope_cache: cache");
  TORCH_CHECK(qkv.scalar_type() == cache.scalar_type() && cos.scalar_type() == qkv.scalar_type(), "rope_cache: dtypes");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.numel() == tokens && slot_offsets.numel() == tokens,
              "rope_cache: int64 slots, one per token");
  at::Tensor q = at::empty({tokens, heads, d}, qkv.options());
  const at::Tensor sb = slot_blocks.contiguous(), so = slot_offsets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_cache", [&] {
    using T = scalar_t;
    const T *xp = qkv.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
    const int64_t *bp = sb.data_ptr<int64_t>(), *offp = so.data_ptr<int64_t>();
    T* qp = q.data_ptr<T>();
    T* pool = cache.data_ptr<T>();
    const int64_t width = qkv.size(1), row = kv_heads * d;
    at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* x = xp + t * width;
        const T *c = cp + t * d, *s = sp + t * d;
        for (int64_t h = 0; h < heads; ++h) rotate(x + h * d, c, s, qp + (t * heads + h) * d, d);
        T* k = pool + bp[t] * cache.stride(0) + layer * cache.stride(1) + offp[t] * row;
        T* v = k + cache.stride(2);
        for (int64_t h = 0; h < kv_heads; ++h) rotate(x + (heads + h) * d, c, s, k + h * d, d);
        std::copy(x + (heads + kv_heads) * d, x + width, v);
      }
    });
  });
  return q;
}

// Whether these kernels run on vectors (AVX-512 or AVX2); elsewhere their portable loops are slower than torch's ops.
bool vectorized() {
#if defined(PDSERVE_VECTOR)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("vectorized() -> bool");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rope_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) cache, int layer, Tensor slot_blocks, "
      "Tensor slot_offsets, int heads, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CompositeExplicitAutograd, m) { m.impl("vectorized", &vectorized); }

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_cache", &rope_cache);
}
