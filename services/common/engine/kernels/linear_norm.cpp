// A matmul that ends a residual branch (o_proj, down_proj) with the residual add and the next
// RMSNorm as its epilogue: linear_tiles then add_rms_norm, bit for bit, without writing the matmul's
// output and reading it back. The threads split the rows, so all of a row is at hand for its norm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "amx.h"
#include "rms_norm.h"
#include "panel_product.h"
#include "vec.h"

namespace {

#if defined(PDSERVE_PANELS)
// residual [M, N] += x [M, K] . w^T (w given as its pack_vnni), rounded as a torch add of the bf16
// product; returns weight * the RMSNorm of the new residual, as add_rms_norm does.
at::Tensor linear_add_rms_norm(const at::Tensor& x, const at::Tensor& packed, at::Tensor& residual,
                               const at::Tensor& weight, double eps) {
  using T = at::BFloat16;
  using namespace pdserve_vec;
  const int64_t M = x.size(0), K = x.size(1), N = residual.size(-1);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.numel() == N * K && N % 16 == 0,
              "linear_add_rms_norm: x [M, K] bf16 and a pack_vnni of [N, K], N a multiple of 16");
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == M && residual.is_contiguous() &&
                  residual.scalar_type() == at::kBFloat16,
              "linear_add_rms_norm: residual [M, N] bf16");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == N && weight.scalar_type() == at::kBFloat16,
              "linear_add_rms_norm: weight [N] bf16");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(residual);
  T *rp = residual.data_ptr<T>(), *op = out.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  // Each row's sum of squares in 16 lanes, added to a 16-column chunk at a time in column order,
  // as add_rms_norm adds them.
  std::vector<float> sums(M * 16);
  const auto add = [&](int64_t p, int64_t m, const float* c0, const float* c1, int64_t r0, int64_t r1) {
    for (int64_t t = m + r0; t < m + r1; ++t) {
      __m512 acc = p == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(&sums[t * 16]);
      T* res = rp + t * N + p * 32;
      for (const float* c : {c0, c1}) {
        if (!c) break;
        const __m512 v = rounded<T>(_mm512_add_ps(load(res), rounded<T>(_mm512_load_ps(c + (t - m) * 16))));
        store(res, v);
        acc = _mm512_fmadd_ps(v, v, acc);
        res += 16;
      }
      _mm512_storeu_ps(&sums[t * 16], acc);
    }
  };
  const auto norm = [&](int64_t m0, int64_t n) {
    for (int64_t t = m0; t < m0 + n; ++t) {
      const float ss = _mm512_reduce_add_ps(_mm512_loadu_ps(&sums[t * 16]));
      pdserve_norm::scale_row(rp + t * N, wp, op + t * N, N, pdserve_norm::inv_rms(ss, N, static_cast<float>(eps)));
    }
  };
  const pdserve_tiles::Panels w{packed.data_ptr<T>(), nullptr, N / 16};
  pdserve_tiles::product_rows(xc.data_ptr<T>(), M, K, w, add, norm);
  return out;
}
#else
at::Tensor linear_add_rms_norm(const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&, double) {
  TORCH_CHECK(false, "linear_add_rms_norm: built without AMX or AVX512_BF16");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("linear_add_rms_norm(Tensor x, Tensor packed, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("linear_add_rms_norm", &linear_add_rms_norm); }
