// The LM head with float32 logits from bfloat16 weights and activations: every product summed
// in float32 and nothing rounded to bf16, whose 8-bit mantissa would tie the top logits (a logit
// of 20 rounds to a multiple of 0.125). Each logit is summed in one order whatever the batch,
// so a token's logits do not depend on what else ran in its step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "vec.h"

namespace {

constexpr int64_t kRows = 4;   // activation rows per pass over a weight row
constexpr int64_t kRowsW = 4;  // weight rows per pass
constexpr int64_t kTile = 16;  // weight rows that stay in L1 while every activation row passes over them

// sums[r * kRows + m] = x[m] . w[r] for r < NR weight rows and m < rows activation rows; bf16 inputs.
// NR x rows independent sums keep the multiply-add units busy (one chain would wait on its latency).
template <int64_t NR>
inline void dot_bf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t rows, float* sums) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  __m512 acc[NR][kRows];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m) acc[r][m] = _mm512_setzero_ps();
  auto step = [&](__mmask32 mask) {
    __m512bh wv[NR];
    for (int64_t r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int64_t r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  };
  for (; k + 32 <= K; k += 32) step((__mmask32)~0u);
  if (k < K) {
    step((__mmask32)((1ull << (K - k)) - 1));
    k = K;
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m) sums[r * kRows + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(__AVX512F__)
  __m512 acc[NR][kRows];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m) acc[r][m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int64_t r = 0; r < NR; ++r) wv[r] = pdserve_vec::load16(w + r * K + k);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 xv = pdserve_vec::load16(x + m * K + k);
      for (int64_t r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m) sums[r * kRows + m] = _mm512_reduce_add_ps(acc[r][m]);
#else
  for (int64_t i = 0; i < NR * kRows; ++i) sums[i] = 0.f;
#endif
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = k; j < K; ++j)
        sums[r * kRows + m] += static_cast<float>(x[m * K + j]) * static_cast<float>(w[r * K + j]);
}

// x [M, K], w [N, K] (a linear layer's weight) -> float32 [M, N].
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_f32: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_f32: dtypes differ");
  if (x.scalar_type() != at::kBFloat16) return at::linear(x.to(at::kFloat), w.to(at::kFloat));
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const at::BFloat16 *xp = xc.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    float sums[kRowsW * kRows];
    for (int64_t t = n0; t < n1; t += kTile) {  // a tile of weight rows, read from memory once for all of x
      const int64_t t1 = std::min(t + kTile, n1);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        int64_t n = t;
        for (; n + kRowsW <= t1; n += kRowsW) {
          dot_bf16<kRowsW>(xp + m0 * K, wp + n * K, K, rows, sums);
          for (int64_t r = 0; r < kRowsW; ++r)
            for (int64_t m = 0; m < rows; ++m) op[(m0 + m) * N + n + r] = sums[r * kRows + m];
        }
        for (; n < t1; ++n) {
          dot_bf16<1>(xp + m0 * K, wp + n * K, K, rows, sums);
          for (int64_t m = 0; m < rows; ++m) op[(m0 + m) * N + n] = sums[m];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) { m.def("linear_f32(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("linear_f32", &linear_f32); }
