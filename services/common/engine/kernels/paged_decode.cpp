// Decode attention that reads each sequence's KV in place, through its block table.
//
// One query token per sequence. A task is one KV head of one sequence over a span of kSpan of its
// keys: it scores the head's GQA group of queries against them, read straight from the pool, and
// keeps a partial softmax (max, sum, weighted values); a second pass merges a sequence's spans.
// Spans have a fixed size, so a sequence's result never depends on what else is in its batch, and
// one long sequence alone still gives every thread work. Nothing is gathered or padded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode_span.h"

namespace {

using namespace pdserve_decode;

struct Task {
  int64_t seq, head, t0, t1;  // keys [t0, t1) of KV head `head`
};

// D: the head dim as a constant (64 and 128: loops the compiler unrolls and the AVX-512 path), or 0: q.size(2).
template <typename T, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  // q, out [n, heads, d]; cache [blocks, layers, 2, block_size, kv_heads, d]; tables [n, max_blocks]
  const int64_t n = q.size(0), heads = q.size(1), d = D ? D : q.size(2);
  const int64_t block_size = cache.size(3), kv_heads = cache.size(4), group = heads / kv_heads;
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= max_blocks * block_size, "paged_decode: a context outside its block table");
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t t0 = 0; t0 < lp[i]; t0 += kSpan) tasks.push_back({i, h, t0, std::min(t0 + kSpan, lp[i])});
  }
  const int64_t width = d + 2;  // a partial: max, sum, values
  std::vector<float> parts(tasks.size() * group * width);
  const T* qp = q.data_ptr<T>();
  const T* pool = cache.data_ptr<T>() + layer * cache.stride(1);
  const float s = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * kSpan), qf(group * d), kv(d);
    int64_t scaled_for = -1;  // the sequence whose queries qf holds
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const T* qh = qp + (task.seq * heads + task.head * group) * d;
      const Keys keys{tp + task.seq * max_blocks, pool + task.head * d, cache.stride(0), block_size, kv_heads * d,
                      cache.stride(2)};
      float* part = parts.data() + t * group * width;
      const int64_t key = task.seq * kv_heads + task.head;
      if (key != scaled_for) {
        for (int64_t x = 0; x < group * d; ++x) qf[x] = static_cast<float>(qh[x]) * s;
        scaled_for = key;
      }
#if defined(__AVX512F__)
      if constexpr (D % 16 == 0 && D > 0 && D <= 128 && pdserve_vec::kVector<T>) {
        span_avx512<T, D>(qh, qf.data(), group, s, keys, task.t0, task.t1, scores.data(), part);
        continue;
      }
#endif
      span_portable<T, D>(qf.data(), group, d, keys, task.t0, task.t1, scores.data(), part, kv.data());
    }
  });
  // Merge each query head's spans: rescale every partial to the largest max, sum, divide.
  std::vector<int64_t> first(n + 1, 0);  // each sequence's first task
  for (const Task& task : tasks) first[task.seq + 1] += 1;
  for (int64_t i = 0; i < n; ++i) first[i + 1] += first[i];
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / heads, h = r % heads / group, g = r % group;
      const int64_t spans = (first[i + 1] - first[i]) / kv_heads, t0 = first[i] + h * spans;
      auto part = [&](int64_t sp) { return parts.data() + ((t0 + sp) * group + g) * width; };
      float top = kNegInf;
      for (int64_t sp = 0; sp < spans; ++sp) top = std::max(top, part(sp)[0]);
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t sp = 0; sp < spans; ++sp) {
        const float* p = part(sp);
        const float w = spans == 1 ? 1.f : std::exp(p[0] - top);
        total += p[1] * w;
        for (int64_t x = 0; x < d; ++x) acc[x] += p[2 + x] * w;
      }
      for (int64_t x = 0; x < d; ++x) op[r * d + x] = static_cast<T>(acc[x] / total);
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
