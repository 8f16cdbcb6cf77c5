// float32 linear layers over weights packed once into 16-column panels (float_panels.h): where a
// build has them (AVX2), they take the row kernel's place for every row count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "float_panels.h"

namespace {

bool float_panels_built() {
#if defined(PDSERVE_FLOAT_PANELS)
  return true;
#else
  return false;
#endif
}

// w [N, K] float32 as [N/16][K][16], flat; empty where this build has no float panels or N % 16.
at::Tensor pack_float_panels(const at::Tensor& w) {
  if (!float_panels_built() || w.dim() != 2 || w.scalar_type() != at::kFloat || w.size(0) % 16)
    return at::empty({0}, w.options());
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({w.numel()}, w.options());
  pdserve_float_panels::pack(wc.data_ptr<float>(), out.data_ptr<float>(), w.size(0), w.size(1));
  return out;
}

// x [M, K] float32 . w^T, w given as its pack_float_panels, n its rows.
at::Tensor linear_float_panels(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(float_panels_built(), "linear_float_panels: this build packs no float32 panels");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat &&
                  packed.numel() == n * x.size(1) && n % 16 == 0 && packed.is_contiguous(),
              "linear_float_panels: x [M, K] float32 and a pack_float_panels of [n, K]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
#if defined(PDSERVE_FLOAT_PANELS)
  pdserve_float_panels::product(xc.data_ptr<float>(), packed.data_ptr<float>(), out.data_ptr<float>(), x.size(0), n,
                                x.size(1));
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("float_panels_built() -> bool");
  m.def("pack_float_panels(Tensor w) -> Tensor");
  m.def("linear_float_panels(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("pack_float_panels", &pack_float_panels);
  m.impl("linear_float_panels", &linear_float_panels);
}

TORCH_LIBRARY_IMPL(pdserve, CompositeExplicitAutograd, m) { m.impl("float_panels_built", &float_panels_built); }
