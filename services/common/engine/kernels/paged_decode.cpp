// Decode attention that reads each sequence's KV in place, through its block table.
//
// One query token per sequence; every (sequence, KV head) is one task: its query
// heads (the GQA group) are scored against the sequence's keys, block by block
// straight from the pool, then the values are summed with the softmax weights.
// Nothing is gathered or padded, so every sequence pays for its own context only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// D: the head dim as a constant (the common 64 and 128: loops the compiler unrolls), or 0: q.size(2).
template <typename T, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  // q, out [n, heads, d]; cache [blocks, layers, 2, block_size, kv_heads, d]; tables [n, max_blocks]
  const int64_t n = q.size(0), heads = q.size(1), d = D ? D : q.size(2);
  const int64_t block_size = cache.size(3), kv_heads = cache.size(4), group = heads / kv_heads;
  const int64_t block_stride = cache.stride(0), layer_off = layer * cache.stride(1), v_off = cache.stride(2);
  const int64_t row = kv_heads * d;  // one token's keys (or values), all KV heads
  const int64_t max_blocks = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), kv(d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kv_heads, h = task % kv_heads, ctx = lp[i];
      const T* qi = qp + (i * heads + h * group) * d;
      for (int64_t x = 0; x < group * d; ++x) qf[x] = static_cast<float>(qi[x]) * s;
      scores.assign(group * ctx, 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const T* k = cp + tp[i * max_blocks + t / block_size] * block_stride + layer_off + (t % block_size) * row + h * d;
        for (int64_t x = 0; x < d; ++x) kv[x] = static_cast<float>(k[x]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t x = 0; x < d; ++x) dot += qg[x] * kv[x];
          scores[g * ctx + t] = dot;
        }
      }
      std::vector<float> total(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * ctx;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < ctx; ++t) {
          sg[t] = std::exp(sg[t] - mx);
          sum += sg[t];
        }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const T* v = cp + tp[i * max_blocks + t / block_size] * block_stride + layer_off + v_off + (t % block_size) * row + h * d;
        for (int64_t x = 0; x < d; ++x) kv[x] = static_cast<float>(v[x]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * ctx + t];
          float* ag = acc.data() + g * d;
#pragma omp simd
          for (int64_t x = 0; x < d; ++x) ag[x] += p * kv[x];
        }
      }
      T* oi = op + (i * heads + h * group) * d;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t x = 0; x < d; ++x) oi[g * d + x] = static_cast<T>(acc[g * d + x] / total[g]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
                        const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 6 && tables.dim() == 2 && lens.dim() == 1, "paged_decode: bad ranks");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "paged_decode: q and cache dtypes differ");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "paged_decode: int64 tables/lens");
  TORCH_CHECK(cache.is_contiguous() && tables.is_contiguous() && lens.is_contiguous(), "paged_decode: contiguous inputs");
  TORCH_CHECK(q.size(1) % cache.size(4) == 0 && q.size(2) == cache.size(5), "paged_decode: head shapes");
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "paged_decode: one table per query");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    switch (qc.size(2)) {
      case 64: attend<scalar_t, 64>(qc, cache, layer, tables, lens, scale, out); break;
      case 128: attend<scalar_t, 128>(qc, cache, layer, tables, lens, scale, out); break;
      default: attend<scalar_t, 0>(qc, cache, layer, tables, lens, scale, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode(Tensor q, Tensor cache, int layer, Tensor tables, Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
