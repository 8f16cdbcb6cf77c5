// The attention block's input projection through AMX tiles with RoPE and the KV cache write as its
// epilogue: linear_tiles then rope_cache, bit for bit, without writing and reading back qkv [T, ...].
#include <ATen/ATen.h>
#include <torch/library.h>

#include "amx.h"
#include "panel_product.h"
#include "vec.h"

namespace {

#if defined(PDSERVE_PANELS)
// x [T, K] . w^T, w the pack_vnni of the fused [q; k; v] projection: q [T, heads, d] rotated; the
// rotated keys and the values go into the pool [blocks, layers, 2, block_size, kv_heads, d] at each
// token's slot. Pair p is 16 dims of one head's first half with the same 16 of its second half, so
// rotate_half's partners meet in one epilogue.
at::Tensor qkv_rope_cache(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& cos, const at::Tensor& sin,
                          at::Tensor& cache, int64_t layer, const at::Tensor& slot_blocks,
                          const at::Tensor& slot_offsets, int64_t heads, int64_t kv_heads) {
  using T = at::BFloat16;
  const int64_t tokens = x.size(0), d = cache.size(5), half = d / 2, width = (heads + 2 * kv_heads) * d;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.numel() == width * x.size(1),
              "qkv_rope_cache: x [T, K] bf16 and a pack_vnni of [(heads + 2 kv_heads) d, K]");
  TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == at::kBFloat16 && cache.size(4) == kv_heads && d % 32 == 0,
              "qkv_rope_cache: a bf16 cache of kv_heads heads, d a multiple of 32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * d && sin.numel() == tokens * d &&
                  cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "qkv_rope_cache: cos/sin [T, d] bf16");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.numel() == tokens && slot_offsets.numel() == tokens,
              "qkv_rope_cache: int64 slots, one per token");
  const at::Tensor xc = x.contiguous(), sb = slot_blocks.contiguous(), so = slot_offsets.contiguous();
  at::Tensor q = at::empty({tokens, heads, d}, x.options());
  const T *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  const int64_t *bp = sb.data_ptr<int64_t>(), *offp = so.data_ptr<int64_t>();
  T* qp = q.data_ptr<T>();
  const int64_t group = d / 32, row = kv_heads * d, block_stride = cache.stride(0), value_offset = cache.stride(2);
  T* layer_pool = cache.data_ptr<T>() + layer * cache.stride(1);
  const auto epilogue = [&](int64_t p, int64_t m, const float* c0, const float* c1, int64_t r0, int64_t r1) {
    const int64_t head = p / group, i = p % group * 16;  // q's heads, then k's, then v's
    for (int64_t t = m + r0; t < m + r1; ++t) {
      const __m512 x1 = pdserve_vec::rounded<T>(_mm512_load_ps(c0 + (t - m) * 16));
      const __m512 x2 = pdserve_vec::rounded<T>(_mm512_load_ps(c1 + (t - m) * 16));
      T* const slot = layer_pool + bp[t] * block_stride + offp[t] * row;  // the token's keys
      T* out = head < heads              ? qp + (t * heads + head) * d + i
               : head < heads + kv_heads ? slot + (head - heads) * d + i
                                         : slot + value_offset + (head - heads - kv_heads) * d + i;
      if (head < heads + kv_heads) {
        pdserve_vec::rope(x1, x2, cp + t * d + i, sp + t * d + i, half, out, out + half);
      } else {
        pdserve_vec::store(out, x1);
        pdserve_vec::store(out + half, x2);
      }
    }
  };
  const pdserve_tiles::Panels w{packed.data_ptr<T>(), nullptr, width / 16, group};
  pdserve_tiles::product(xc.data_ptr<T>(), tokens, x.size(1), w, epilogue);
  return q;
}
#else
at::Tensor qkv_rope_cache(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                          int64_t, const at::Tensor&, const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "qkv_rope_cache: built without AMX or AVX512_BF16");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def(
      "qkv_rope_cache(Tensor x, Tensor packed, Tensor cos, Tensor sin, Tensor(a!) cache, int layer, "
      "Tensor slot_blocks, Tensor slot_offsets, int heads, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("qkv_rope_cache", &qkv_rope_cache); }
