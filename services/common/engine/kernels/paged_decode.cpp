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
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

#if defined(__AVX512F__)
using pdserve_vec::exp16;
using pdserve_vec::load16;

// AVX-512 path for float and bfloat16 KV at head dims that are multiples of 16: a block's
// keys are scored and its values summed 16 lanes at a time, in float32.
template <typename T, int64_t D>
void attend_task_avx512(const float* qf, int64_t group, const T* const* blocks, int64_t block_size, int64_t row,
                        int64_t v_off, int64_t ctx, float* scores, float* acc, T* out) {
  constexpr int64_t C = D / 16;
  for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, ++b) {  // scores, block by block
    const int64_t used = std::min(block_size, ctx - t0);
    for (int64_t j = 0; j < used; ++j) {
      __m512 k[C];
      for (int64_t c = 0; c < C; ++c) k[c] = load16(blocks[b] + j * row + c * 16);
      for (int64_t g = 0; g < group; ++g) {
        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qf + g * D), k[0]);
        for (int64_t c = 1; c < C; ++c) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c * 16), k[c], dot);
        scores[g * ctx + t0 + j] = _mm512_reduce_add_ps(dot);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax numerators in place; the sum divides at the end
    float* sg = scores + g * ctx;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < ctx; t += 16) {
      const __mmask16 m = ctx - t >= 16 ? 0xFFFF : (__mmask16)((1u << (ctx - t)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, m, sg + t));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; t += 16) {
      const __mmask16 m = ctx - t >= 16 ? 0xFFFF : (__mmask16)((1u << (ctx - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), top)));
      _mm512_mask_storeu_ps(sg + t, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    __m512 a[C];
    for (int64_t c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
    for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, ++b) {
      const int64_t used = std::min(block_size, ctx - t0);
      const T* v = blocks[b] + v_off;
      for (int64_t j = 0; j < used; ++j) {
        const __m512 p = _mm512_set1_ps(sg[t0 + j]);
        for (int64_t c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(p, load16(v + j * row + c * 16), a[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(acc + c * 16, _mm512_div_ps(a[c], _mm512_set1_ps(total)));
    for (int64_t x = 0; x < D; ++x) out[g * D + x] = static_cast<T>(acc[x]);
  }
}
#endif

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

  // Fewer (sequence, KV head) tasks than two a thread (one sequence, 3 KV heads on 2 threads): a task
  // per query head instead, which reads its KV head's blocks again (from cache) but keeps every thread busy.
  const int64_t per = n * kv_heads < 2 * at::get_num_threads() ? 1 : group, splits = group / per;  // heads a task
  at::parallel_for(0, n * kv_heads * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(per * d), acc(per * d), kv(d), scores;
    std::vector<const T*> blocks;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (kv_heads * splits), h = task / splits % kv_heads, g0 = task % splits * per;
      const int64_t ctx = lp[i], first = i * heads + h * group + g0;  // query heads first .. first + per
      const T* qi = qp + first * d;
      for (int64_t x = 0; x < per * d; ++x) qf[x] = static_cast<float>(qi[x]) * s;
      scores.assign(per * ctx, 0.f);
#if defined(__AVX512F__)
      if constexpr (D % 16 == 0 && D > 0 && (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>)) {
        const int64_t nblocks = (ctx + block_size - 1) / block_size;
        blocks.resize(nblocks);
        for (int64_t b = 0; b < nblocks; ++b) blocks[b] = cp + tp[i * max_blocks + b] * block_stride + layer_off + h * d;
        attend_task_avx512<T, D>(qf.data(), per, blocks.data(), block_size, row, v_off, ctx, scores.data(),
                                 acc.data(), op + first * d);
        continue;
      }
#endif
      for (int64_t t = 0; t < ctx; ++t) {
        const T* k = cp + tp[i * max_blocks + t / block_size] * block_stride + layer_off + (t % block_size) * row + h * d;
        for (int64_t x = 0; x < d; ++x) kv[x] = static_cast<float>(k[x]);
        for (int64_t g = 0; g < per; ++g) {
          const float* qg = qf.data() + g * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t x = 0; x < d; ++x) dot += qg[x] * kv[x];
          scores[g * ctx + t] = dot;
        }
      }
      std::vector<float> total(per);
      for (int64_t g = 0; g < per; ++g) {
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
        for (int64_t g = 0; g < per; ++g) {
          const float p = scores[g * ctx + t];
          float* ag = acc.data() + g * d;
#pragma omp simd
          for (int64_t x = 0; x < d; ++x) ag[x] += p * kv[x];
        }
      }
      T* oi = op + first * d;
      for (int64_t g = 0; g < per; ++g)
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
