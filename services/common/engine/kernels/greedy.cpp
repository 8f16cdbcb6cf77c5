// Greedy sampling's argmax over each row of the logits, as torch.max(dim=-1).indices gives it (the
// first maximum; the first NaN where a row has one), parallel over the rows and vectorized: torch's
// took 0.42-0.45 ms of a 32-sequence step's 37, this 0.15.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kChunk = 64;  // values checked at once for the maximum, before a scalar look inside

// The first j in [c, e) with x[j] == v, or with x[j] a NaN where `nan`; -1 if there is none. The
// vector loop only says whether there is one: an early exit would keep it scalar.
inline int64_t first_in(const float* x, int64_t c, int64_t e, float v, bool nan) {
  int hit = 0;
  if (nan) {
#pragma omp simd reduction(| : hit)
    for (int64_t j = c; j < e; ++j) hit |= x[j] != x[j];
  } else {
#pragma omp simd reduction(| : hit)
    for (int64_t j = c; j < e; ++j) hit |= x[j] == v;
  }
  if (hit)
    for (int64_t j = c; j < e; ++j)
      if (nan ? x[j] != x[j] : x[j] == v) return j;
  return -1;
}

int64_t row_argmax(const float* x, int64_t n) {
  float top = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    top = x[j] > top ? x[j] : top;  // a NaN compares false: NaNs are flagged apart
    nan |= x[j] != x[j];
  }
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t j = first_in(x, c, std::min(n, c + kChunk), top, nan);
    if (j >= 0) return j;
  }
  return 0;  // an empty row
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_rows: float32 logits [n, vocab]");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
