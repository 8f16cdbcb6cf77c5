// Causal attention of one sequence's prefill chunk through AMX tiles (AVX512_BF16 vectors where the
// CPU has no AMX), reading its KV in place.
//
// Flash attention: every (query head, 16 query rows) is one task. It walks the keys in blocks of up
// to 128: scores them with tiles (bf16 products summed in float32), keeps a running softmax in
// float32, and adds the values weighted by the softmax numerators (rounded to bf16, as torch's CPU
// flash attention rounds them) through tiles again, the output's tiles held across the block. Keys
// past a row's own position are never summed, and whole chunks of them are skipped. Each KV head's
// keys, and its values transposed, are first packed from the pool's blocks, once per call. On
// vectors (no AMX) the scores come from dpbf16, and the numerators and values stay float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "amx.h"
#include "prefill_task.h"
#include "vec.h"

namespace {

#if defined(__AVX512BF16__)
using namespace pdserve_prefill;

#if defined(PDSERVE_AMX)
constexpr int kTogether = 4;  // tasks a thread runs in lockstep (RowTask): 2 measured no faster than 1
#else
constexpr int kTogether = 1;  // vectors have no tile stores to wait on (4 measured no faster)
#endif

// 32 keys' values of one dim, as bf16 or (on vectors) widened to float32.
inline void store_keys(at::BFloat16* to, __m512i v) { _mm512_storeu_si512(to, v); }
#if !defined(PDSERVE_AMX)
inline void store_keys(float* to, __m512i v) {
  _mm512_storeu_ps(to, pdserve_vec::widen(_mm512_castsi512_si256(v)));
  _mm512_storeu_ps(to + 16, pdserve_vec::widen(_mm512_extracti64x4_epi64(v, 1)));
}
#endif

// A KV head's keys as they are, [padded][d] (the A operand of k . q^T), and its values transposed,
// [d][vstride] (the A operand of v^T . p^T); here keys t0 .. t0 + kChunk. Keys past ctx are zeros:
// their weights are zero, and zero times a zero value stays zero.
void pack_keys(const at::BFloat16* cache, const int64_t* blocks, int64_t block_size, int64_t block_stride,
               int64_t v_off, int64_t row, const Shape& s, int64_t h, int64_t t0, at::BFloat16* kp, Value* vt) {
  const int64_t d = s.d;
  alignas(64) at::BFloat16 values[kChunk * 128];  // the chunk's values, [key][d]
  for (int64_t t = t0; t < t0 + kChunk; ++t) {
    at::BFloat16 *k = kp + t * d, *v = values + (t - t0) * d;
    if (t >= s.ctx) {
      std::fill(k, k + d, at::BFloat16(0.f));
      std::fill(v, v + d, at::BFloat16(0.f));
      continue;
    }
    const at::BFloat16* src = cache + blocks[t / block_size] * block_stride + (t % block_size) * row + h * d;
    std::copy(src, src + d, k);
    std::copy(src + v_off, src + v_off + d, v);
  }
  // Transposed 32 keys by 2 dims at a time: gather the (2q, 2q + 1) pairs of 16 keys twice, then
  // split the pairs into dim 2q's row and dim 2q + 1's.
  const __m512i keys = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(d / 2));
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24,
                                        22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const auto* v32 = reinterpret_cast<const int*>(values);
  for (int64_t k0 = 0; k0 < kChunk; k0 += 32)
    for (int64_t q = 0; q < d / 2; ++q) {
      const __m512i a = _mm512_i32gather_epi32(keys, v32 + k0 * (d / 2) + q, 4);
      const __m512i b = _mm512_i32gather_epi32(keys, v32 + (k0 + 16) * (d / 2) + q, 4);
      store_keys(vt + 2 * q * s.vstride() + t0 + k0, _mm512_permutex2var_epi16(a, even, b));
      store_keys(vt + (2 * q + 1) * s.vstride() + t0 + k0, _mm512_permutex2var_epi16(a, odd, b));
    }
}

// Which row tile a head's i-th task takes: groups of kTogether tiles from either end in turn (first,
// last, second, ...). Where a thread's share ends mid-head (9 heads on 2 threads) each side then holds
// about half of that head's causal work, not a quarter and three quarters; a lockstep group keeps
// neighbouring rows.
inline int64_t folded(int64_t i, int64_t tiles) {
  const int64_t groups = (tiles + kTogether - 1) / kTogether;
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t id = k % 2 == 0 ? k / 2 : groups - 1 - k / 2;
    const int64_t size = std::min<int64_t>(kTogether, tiles - id * kTogether);
    if (i < size) return id * kTogether + i;
    i -= size;
  }
  return i;  // not reached: i < tiles
}

// Runs tasks in lockstep, a block's step at a time (a task with fewer blocks sits its last ones out).
void run_together(RowTask* tasks, int n) {
  int64_t blocks = 0;
  for (int i = 0; i < n; ++i) blocks = std::max(blocks, tasks[i].blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < n; ++i)
      if (b < tasks[i].blocks) tasks[i].score(b);
    for (int i = 0; i < n; ++i)
      if (b < tasks[i].blocks) tasks[i].softmax(b);
    for (int i = 0; i < n; ++i)
      if (b < tasks[i].blocks) tasks[i].add(b);
  }
}

// Whether prefill_attention runs here for heads of size d (else the caller keeps SDPA).
bool prefill_attention_usable(int64_t d) {
#if defined(PDSERVE_AMX)
  if (!pdserve_amx::ready()) return false;
#endif
  return d % 64 == 0 && d <= 128;
}

// q [q_len, heads, d] (bf16), the chunk's queries at positions ctx - q_len .. ctx - 1; block_ids cover ctx tokens.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_ids,
                             int64_t ctx, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 6 && block_ids.dim() == 1, "prefill_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && cache.scalar_type() == at::kBFloat16, "prefill_attention: bf16 only");
  TORCH_CHECK(prefill_attention_usable(q.size(2)),
              "prefill_attention: needs AMX or AVX512_BF16, and a head dim of 64 or 128");
  TORCH_CHECK(cache.is_contiguous() && block_ids.scalar_type() == at::kLong, "prefill_attention: pool and block ids");
  TORCH_CHECK(q.size(1) % cache.size(4) == 0 && q.size(2) == cache.size(5), "prefill_attention: head shapes");
  TORCH_CHECK(q.size(0) <= ctx && block_ids.numel() * cache.size(3) >= ctx, "prefill_attention: context");
  const at::Tensor qc = q.contiguous(), ids = block_ids.contiguous();
  const int64_t q_len = q.size(0), d = q.size(2);
  const Shape s{q.size(1), cache.size(4), d, ctx, (ctx + kChunk - 1) / kChunk * kChunk};
  const int64_t group = s.heads / s.kv_heads, tiles = (q_len + kRows - 1) / kRows;
  // Kept between calls: a fresh allocation of this size is a fresh mapping, faulted in page by page.
  thread_local std::vector<at::BFloat16> packed;
  const int64_t value_halves = sizeof(Value) / sizeof(at::BFloat16);
  packed.resize(std::max<size_t>(packed.size(), s.kv_heads * (s.padded + s.vstride() * value_halves) * d + 32));
  at::BFloat16* kp = pdserve_amx::aligned(packed.data());
  Value* vt = reinterpret_cast<Value*>(kp + s.kv_heads * s.padded * d);
  const at::BFloat16* cp = cache.data_ptr<at::BFloat16>() + layer * cache.stride(1);
  const int64_t chunks = s.padded / kChunk;
  at::parallel_for(0, s.kv_heads * chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t h = c / chunks;
      pack_keys(cp, ids.data_ptr<int64_t>(), cache.size(3), cache.stride(0), cache.stride(2), s.kv_heads * d, s, h,
                c % chunks * kChunk, kp + h * s.padded * d, vt + h * s.vstride() * d);
    }
  });
  at::Tensor out = at::empty_like(qc);
  const at::BFloat16* qp = qc.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // Tasks in (head, rows) order: a contiguous share of them holds whole heads' worth of causal work.
  // A thread runs its tasks kTogether at a time (RowTask).
  at::parallel_for(0, s.heads * tiles, 1, [&](int64_t t0, int64_t t1) {
#if defined(PDSERVE_AMX)
    pdserve_amx::configure_full_tiles();
#endif
    RowTask tasks[kTogether];
    for (int64_t t = t0; t < t1; t += kTogether) {
      const int n = static_cast<int>(std::min<int64_t>(kTogether, t1 - t));
      for (int i = 0; i < n; ++i) {
        const int64_t h = (t + i) / tiles, g = h / group;
        tasks[i].start(qp + h * d, s.heads * d, q_len, kp + g * s.padded * d, vt + g * s.vstride() * d, s,
                       folded((t + i) % tiles, tiles) * kRows, ctx - q_len, static_cast<float>(scale));
      }
      run_together(tasks, n);
      for (int i = 0; i < n; ++i) tasks[i].finish(op + (t + i) / tiles * d, s.heads * d);
    }
#if defined(PDSERVE_AMX)
    _tile_release();
#endif
  });
  return out;
}
#else
bool prefill_attention_usable(int64_t) { return false; }
at::Tensor prefill_attention(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t, double) {
  TORCH_CHECK(false, "prefill_attention: built without AVX512_BF16");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("prefill_attention(Tensor q, Tensor cache, int layer, Tensor block_ids, int ctx, float scale) -> Tensor");
  m.def("prefill_attention_usable(int d) -> bool");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }

TORCH_LIBRARY_IMPL(pdserve, CompositeExplicitAutograd, m) {
  m.impl("prefill_attention_usable", &prefill_attention_usable);
}
