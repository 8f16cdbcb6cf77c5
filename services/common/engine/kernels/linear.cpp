// Matmuls of our own: `linear_f32`, the LM head with float32 logits (every product summed in float32
// and nothing rounded to bf16, whose 8-bit mantissa would tie the top logits: a logit of 20 rounds to
// a multiple of 0.125); `linear_tiles` for the layers' bf16 matmuls over packed panels (AMX tiles, or
// AVX512_BF16 vectors); `linear_rows` for the layers' matmuls through the row kernel (row_kernel.h)
// where there are no panels (float32, or bf16 on a CPU without AVX512_BF16).
// Each output is summed in one order whatever the batch, so a row's result does not depend on
// what else ran in its step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "amx.h"
#include "panel_product.h"
#include "row_kernel.h"
#include "vec.h"

namespace {

// Whether bf16 matmuls run through AMX tiles here (not only through panels on vectors).
bool amx_usable() {
#if defined(PDSERVE_AMX)
  return pdserve_amx::ready();
#else
  return false;
#endif
}

#if defined(PDSERVE_PANELS)
// AMX: C[16 x 16] += A[16 rows x 32 k] . B[32 k x 16 n], B in pairs of k ("VNNI"). The weight is
// packed once into [N/16][K/32][16 k-pairs][16 n][2], so each B tile is 1 KB read in one load.
at::Tensor pack_vnni(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  if (!pdserve_tiles::usable() || w.scalar_type() != at::kBFloat16 || N % 16 || K % 32)
    return at::empty({0}, w.options());
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({N * K}, w.options());
  const at::BFloat16* src = wc.data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 16, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kb = 0; kb < K / 32; ++kb) {
        at::BFloat16* tile = dst + (nb * (K / 32) + kb) * 512;
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t n = 0; n < 16; ++n)
            for (int64_t j = 0; j < 2; ++j) tile[(p * 16 + n) * 2 + j] = src[(nb * 16 + n) * K + kb * 32 + 2 * p + j];
      }
  });
  return out;
}

// Stores a C tile's rows [r0, r1) into out [., N] at column n0, as O (bf16: rounded once, here),
// each column times its scale where there are scales (int8 weights).
template <typename O>
inline void store_tile(const float* c, O* out, int64_t r0, int64_t r1, int64_t N, int64_t n0, const float* scales) {
  const __m512 scale = scales ? _mm512_loadu_ps(scales + n0) : _mm512_set1_ps(1.f);
  for (int64_t m = r0; m < r1; ++m)
    pdserve_vec::store(out + m * N + n0, _mm512_mul_ps(_mm512_load_ps(c + m * 16), scale));
}

// out [M, N] = x [M, K] . w^T from w's pack_vnni (or int8 in the same layout, with `scales`): pair p
// is panels 2p and 2p + 1. Int8 panels are widened to bf16 in cache (panel_product.h): half the
// bytes read, the widening on the cores the memory leaves idle.
template <typename O>
void linear_panels(const at::BFloat16* xp, const at::BFloat16* packed, O* op, int64_t M, int64_t N, int64_t K,
                   const int8_t* q = nullptr, const float* scales = nullptr) {
  const pdserve_tiles::Panels w{packed, q, N / 16};
  const auto store = [&](int64_t p, int64_t m, const float* c0, const float* c1, int64_t r0, int64_t r1) {
    store_tile(c0, op + m * N, r0, r1, N, p * 32, scales);
    if (c1) store_tile(c1, op + m * N, r0, r1, N, p * 32 + 16, scales);
  };
  pdserve_tiles::product(xp, M, K, w, store);
}

// A linear layer in bf16 through AMX tiles: x [M, K] . w^T, w given as its pack_vnni, N its rows.
at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.numel() == N * x.size(1),
              "linear_tiles: x [M, K] bf16 and a pack_vnni of [N, K]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  linear_panels(xc.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                x.size(0), N, x.size(1));
  return out;
}

// x [M, K] bf16 . (q * scales)^T: a linear layer's weight [N, K] quantized per row to int8 and laid
// out as pack_vnni lays bf16 out (quantize.py), its float32 scales [N].
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  const int64_t N = scales.numel();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kFloat && q.numel() == N * x.size(1) && N % 16 == 0 && x.size(1) % 32 == 0,
              "linear_int8: x [M, K] bf16, q int8 [N * K] in pack_vnni's layout, scales float32 [N]");
  TORCH_CHECK(pdserve_tiles::usable() && q.is_contiguous() && scales.is_contiguous(),
              "linear_int8: needs AMX or AVX512_BF16, and contiguous q and scales");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  linear_panels(xc.data_ptr<at::BFloat16>(), static_cast<const at::BFloat16*>(nullptr), out.data_ptr<at::BFloat16>(),
                x.size(0), N, x.size(1), q.data_ptr<int8_t>(), scales.data_ptr<float>());
  return out;
}
// silu(x . gate^T) * (x . up^T) [M, I] from the pack_vnni of [gate; up] [2I, K] (the MLP's fused
// gate_up): linear_tiles then silu_mul, rounded alike, without writing and reading back [M, 2I].
// Pair p is gate's panel p and up's panel p, so each C tile pair is 16 of the result's columns.
at::Tensor gate_up_silu(const at::Tensor& x, const at::Tensor& packed, int64_t inter) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.numel() == 2 * inter * x.size(1) &&
                  inter % 16 == 0,
              "gate_up_silu: x [M, K] bf16 and a pack_vnni of [2 * inter, K]");
  using pdserve_vec::rounded;
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, inter}, x.options());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const auto silu_mul = [&](int64_t p, int64_t m, const float* gate, const float* up, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const __m512 g = rounded<at::BFloat16>(_mm512_load_ps(gate + r * 16));
      const __m512 u = rounded<at::BFloat16>(_mm512_load_ps(up + r * 16));
      const __m512 silu = rounded<at::BFloat16>(pdserve_vec::silu(g));
      pdserve_vec::store(op + (m + r) * inter + p * 16, _mm512_mul_ps(silu, u));
    }
  };
  const pdserve_tiles::Panels w{packed.data_ptr<at::BFloat16>(), nullptr, 2 * inter / 16, inter / 16};
  pdserve_tiles::product(xc.data_ptr<at::BFloat16>(), M, x.size(1), w, silu_mul);
  return out;
}
#else
at::Tensor pack_vnni(const at::Tensor& w) { return at::empty({0}, w.options()); }
at::Tensor linear_int8(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_int8: built without AMX or AVX512_BF16");
}
at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(false, "linear_tiles: built without AMX or AVX512_BF16");
}
at::Tensor gate_up_silu(const at::Tensor& x, const at::Tensor& packed, int64_t inter) {
  TORCH_CHECK(false, "gate_up_silu: built without AMX or AVX512_BF16");
}
#endif

// x [M, K], w [N, K], both float32 or both bf16 -> [M, N] in their dtype: the row kernel, each
// output rounded once from its float32 sum (as torch's bf16 matmul rounds).
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_rows: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_rows: x and w both float32 or both bf16");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  if (x.scalar_type() == at::kFloat)
    pdserve_rows::rows_product(xc.data_ptr<float>(), wc.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  else
    pdserve_rows::rows_product(xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                               M, N, K);
  return out;
}

// x [M, K], w [N, K] (a linear layer's weight), both bf16 or both float32 -> float32 [M, N]; bf16
// through AMX tiles where `packed` is w's pack_vnni (not empty), else on vectors (dpbf16 where the
// CPU has it).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_f32: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_f32: dtypes differ");
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kFloat) return at::linear(x.to(at::kFloat), w.to(at::kFloat));
  if (x.scalar_type() == at::kFloat) return linear_rows(x, w);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const at::BFloat16 *xp = xc.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
#if defined(PDSERVE_PANELS)
  if (packed.has_value() && packed->numel() == N * K) {
    linear_panels(xp, packed->data_ptr<at::BFloat16>(), op, M, N, K);
    return out;
  }
#endif
  pdserve_rows::rows_product(xp, wp, op, M, N, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("amx_usable() -> bool");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? packed=None) -> Tensor");
  m.def("linear_rows(Tensor x, Tensor w) -> Tensor");
  m.def("pack_vnni(Tensor w) -> Tensor");
  m.def("linear_tiles(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("gate_up_silu(Tensor x, Tensor packed, int inter) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_rows", &linear_rows);
  m.impl("pack_vnni", &pack_vnni);
  m.impl("linear_tiles", &linear_tiles);
  m.impl("linear_int8", &linear_int8);
  m.impl("gate_up_silu", &gate_up_silu);
}

TORCH_LIBRARY_IMPL(pdserve, CompositeExplicitAutograd, m) { m.impl("amx_usable", &amx_usable); }
