// Decode attention that reads each sequence's KV in place, through its block table.
//
// One query token per sequence. A sequence's keys are cut into spans of kSpan; a task scores
// queries against one span, read straight from the pool, and keeps a partial softmax (max, sum,
// weighted values); a second pass merges a sequence's spans. On vector units a task is one KV head
// and its GQA group (decode_span.h, decode_span_avx2.h), and a thread reads a span's rows, every
// head's, before its first task there; through AMX tiles, a task is every head of the span
// (decode_tiles.h). Spans have a fixed size, so a sequence's result never depends on what else is
// in its batch, and one long sequence alone still gives every thread work. Nothing is gathered.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "decode_span.h"
#include "decode_span_avx2.h"
#include "decode_tiles.h"

namespace {

using namespace pdserve_decode;

struct Span {
  int64_t seq, t0, t1;  // keys [t0, t1) of sequence `seq`
};

// Where a call's operands live: q, out [n, heads, d]; the pool [blocks, layers, 2, block_size,
// kv_heads, d]; tables [n, max_blocks]. Partials go to parts, [span][query head][max, sum, d values].
template <typename T>
struct Call {
  const T *q, *pool;  // pool: the layer's first element in block 0
  const int64_t* tables;
  int64_t heads, kv_heads, d, block_size, max_blocks, block_stride, v_off;
  float scale;
  std::vector<Span> spans;
  std::vector<int64_t> first;  // each sequence's first span, and the count at the end
  std::unique_ptr<float[]> parts;  // every element written by its span's task

  Keys keys(int64_t seq, int64_t head) const {
    return Keys{tables + seq * max_blocks, pool + head * d, block_stride, block_size, kv_heads * d, v_off};
  }
  float* part(int64_t span, int64_t head) { return parts.get() + (span * heads + head) * (d + 2); }
};

// D: the head dim as a constant (64 and 128: loops the compiler unrolls and the vector paths), or 0.
template <typename T, int64_t D>
void attend_heads(Call<T>& c) {  // a task: one KV head of one span
  const int64_t group = c.heads / c.kv_heads, d = c.d;
  at::parallel_for(0, static_cast<int64_t>(c.spans.size()) * c.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * kSpan), qf(group * d), kv(d);
    int64_t scaled_for = -1;  // the (sequence, KV head) whose queries qf holds
    for (int64_t t = begin; t < end; ++t) {
      const Span& sp = c.spans[t / c.kv_heads];
      const int64_t head = t % c.kv_heads, key = sp.seq * c.kv_heads + head;
      if (t == begin || head == 0) touch_span<T>(c.keys(sp.seq, 0), sp.t0, sp.t1);
      const T* qh = c.q + (sp.seq * c.heads + head * group) * d;
      const Keys keys = c.keys(sp.seq, head);
      float* part = c.part(t / c.kv_heads, head * group);
      if (key != scaled_for) {
        for (int64_t x = 0; x < group * d; ++x) qf[x] = static_cast<float>(qh[x]) * c.scale;
        scaled_for = key;
      }
#if defined(__AVX512F__)
      if constexpr (D % 16 == 0 && D > 0 && D <= 128 && pdserve_vec::kVector<T>) {
        span_avx512<T, D>(qh, qf.data(), group, c.scale, keys, sp.t0, sp.t1, scores.data(), part);
        continue;
      }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
      if constexpr (D % 32 == 0 && D > 0 && D <= 128 && pdserve_vec::kVector<T>) {
        span_avx2<T, D>(qf.data(), group, keys, sp.t0, sp.t1, scores.data(), part);
        continue;
      }
#endif
      span_portable<T, D>(qf.data(), group, d, keys, sp.t0, sp.t1, scores.data(), part, kv.data());
    }
  });
}

// Whether this call went through the tiles (bf16, AMX, a head dim and block size they take).
template <typename T, int64_t D>
bool attend_tiles(Call<T>& c) {  // a task: every head of one span
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && (D == 64 || D == 128)) {
    if (!tiles_usable(c.heads, D, c.block_size)) return false;
    at::parallel_for(0, static_cast<int64_t>(c.spans.size()), 1, [&](int64_t begin, int64_t end) {
      pdserve_amx::configure_full_tiles();
      QueryTiles qt;
      int64_t filled_for = -1;  // the sequence whose queries qt holds
      for (int64_t t = begin; t < end; ++t) {
        const Span& sp = c.spans[t];
        if (sp.seq != filled_for) qt.fill<D>(c.q + sp.seq * c.heads * D, c.heads, c.kv_heads), filled_for = sp.seq;
        span_tiles<D>(qt, c.heads, c.kv_heads, c.scale, c.keys(sp.seq, 0), sp.t0, sp.t1, c.part(t, 0));
      }
      _tile_release();
    });
    return true;
  }
#endif
  return false;
}

// Each query head's spans merged into out: every partial rescaled to the largest max, summed, divided.
template <typename T>
void merge(Call<T>& c, int64_t n, T* op) {
  const int64_t d = c.d;
  at::parallel_for(0, n * c.heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / c.heads, head = r % c.heads, spans = c.first[i + 1] - c.first[i];
      float top = kNegInf;
      for (int64_t sp = 0; sp < spans; ++sp) top = std::max(top, c.part(c.first[i] + sp, head)[0]);
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t sp = 0; sp < spans; ++sp) {
        const float* p = c.part(c.first[i] + sp, head);
        const float w = spans == 1 ? 1.f : std::exp(p[0] - top);
        total += p[1] * w;
        for (int64_t x = 0; x < d; ++x) acc[x] += p[2 + x] * w;
      }
      for (int64_t x = 0; x < d; ++x) op[r * d + x] = static_cast<T>(acc[x] / total);
    }
  });
}

template <typename T, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t n = q.size(0);
  Call<T> c{q.data_ptr<T>(), cache.data_ptr<T>() + layer * cache.stride(1), tables.data_ptr<int64_t>(),
            q.size(1), cache.size(4), q.size(2), cache.size(3), tables.size(1), cache.stride(0), cache.stride(2),
            static_cast<float>(scale)};
  const int64_t* lp = lens.data_ptr<int64_t>();
  c.first.assign(1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= c.max_blocks * c.block_size, "paged_decode: a context outside its block table");
    for (int64_t t0 = 0; t0 < lp[i]; t0 += kSpan) c.spans.push_back({i, t0, std::min(t0 + kSpan, lp[i])});
    c.first.push_back(static_cast<int64_t>(c.spans.size()));
  }
  c.parts.reset(new float[c.spans.size() * c.heads * (c.d + 2)]);
  if (!attend_tiles<T, D>(c)) attend_heads<T, D>(c);
  merge(c, n, out.data_ptr<T>());
}

// Whether a bf16 call of this shape goes through the tiles (decode_tiles.h), for the worker's start line.
bool decode_tiles_usable(int64_t heads, int64_t d, int64_t block_size) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  return tiles_usable(heads, d, block_size);
#else
  return false;
#endif
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
  m.def("decode_tiles_usable(int heads, int d, int block_size) -> bool");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("paged_decode", &paged_decode); }

TORCH_LIBRARY_IMPL(pdserve, CompositeExplicitAutograd, m) { m.impl("decode_tiles_usable", &decode_tiles_usable); }
