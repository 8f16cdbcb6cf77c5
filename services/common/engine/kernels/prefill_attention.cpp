// Causal attention of one sequence's prefill chunk through AMX tiles, reading its KV in place.
//
// Flash attention: every (query head, 16 query rows) is one task. It walks the keys in blocks of up
// to 128: scores them with tiles (bf16 products summed in float32), keeps a running softmax in
// float32, and adds the values weighted by the softmax numerators (rounded to bf16, as torch's CPU
// flash attention rounds them) through tiles again, the output's tiles held across the block. Keys
// past a row's own position are never summed, and whole chunks of them are skipped. Each KV head's
// keys, and its values transposed, are first packed from the pool's blocks, once per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "amx.h"
#include "vec.h"

namespace {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr int64_t kRows = 16;    // query rows a task: one tile's width
constexpr int64_t kChunk = 64;   // keys a step of k . q^T
constexpr int64_t kBlock = 128;  // keys a step of the softmax and of v^T . p^T
// How far a score may pass the max its numerators are taken against before they are rescaled:
// numerators stay <= 2^8, and what was summed is rarely rescaled.
constexpr float kSlack = 8.f;

struct Shape {
  int64_t heads, kv_heads, d, ctx, padded;  // padded: ctx rounded up to kChunk
  // A row of the transposed values is a cache line longer than `padded`: at a power-of-two stride
  // the 16 rows a tile loads share two L1 sets and evict each other (v^T . p^T ran at a third of
  // the tiles' speed).
  int64_t vstride() const { return padded + 32; }
};

// 2^x for x <= kSlack, kept at least 2^-100: a subnormal result would cost a microcode assist in every op
// it meets. 2^x = 2^floor(x) 2^f with f in [0, 1): 2^f by a degree-3 minimax polynomial (relative
// error < 8e-5, far below the bf16 rounding of the numerators), and vscalefps applies 2^floor(x).
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.07802278f), f, _mm512_set1_ps(0.22606549f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.69583648f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.99992476f));
  return _mm512_scalef_ps(y, x);
}

// A KV head's keys as they are, [padded][d] (the A operand of k . q^T), and its values transposed,
// [d][vstride] (the A operand of v^T . p^T); here keys t0 .. t0 + kChunk. Keys past ctx are zeros:
// their weights are zero, and zero times a zero value stays zero.
void pack_keys(const at::BFloat16* cache, const int64_t* blocks, int64_t block_size, int64_t block_stride,
               int64_t v_off, int64_t row, const Shape& s, int64_t h, int64_t t0, at::BFloat16* kp, at::BFloat16* vt) {
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
      _mm512_storeu_si512(vt + 2 * q * s.vstride() + t0 + k0, _mm512_permutex2var_epi16(a, even, b));
      _mm512_storeu_si512(vt + (2 * q + 1) * s.vstride() + t0 + k0, _mm512_permutex2var_epi16(a, odd, b));
    }
}

// k . q^T for keys k0 .. k0 + kChunk into sc, [key][row] (tiles 4-7).
void score_chunk(const at::BFloat16* kp, const uint32_t* qb, int64_t d, int64_t k0, float* sc) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t c = 0; c < d / 32; ++c) {
    const at::BFloat16* kt = kp + k0 * d + c * 32;
    _tile_loadd(0, qb + c * 16 * kRows, 64);
    _tile_loadd(2, kt, d * 2);
    _tile_dpbf16ps(4, 2, 0);
    _tile_loadd(3, kt + 16 * d, d * 2);
    _tile_dpbf16ps(5, 3, 0);
    _tile_loadd(2, kt + 32 * d, d * 2);
    _tile_dpbf16ps(6, 2, 0);
    _tile_loadd(3, kt + 48 * d, d * 2);
    _tile_dpbf16ps(7, 3, 0);
  }
  _tile_stored(4, sc, 64);
  _tile_stored(5, sc + 16 * kRows, 64);
  _tile_stored(6, sc + 32 * kRows, 64);
  _tile_stored(7, sc + 48 * kRows, 64);
}

// acc += v^T . p^T for keys k0 .. k0 + n, 64 value dims at a time: the output's tiles (4-7) are
// loaded and stored once for the n keys.
void add_values(const at::BFloat16* vt, const at::BFloat16* pb, const Shape& s, int64_t k0, int64_t n, float* acc) {
  const int64_t stride = s.vstride();
  for (int64_t e0 = 0; e0 < s.d; e0 += 64) {
    _tile_loadd(4, acc + e0 * kRows, 64);
    _tile_loadd(5, acc + (e0 + 16) * kRows, 64);
    _tile_loadd(6, acc + (e0 + 32) * kRows, 64);
    _tile_loadd(7, acc + (e0 + 48) * kRows, 64);
    for (int64_t k = 0; k < n; k += 32) {
      const at::BFloat16* v = vt + e0 * stride + k0 + k;
      _tile_loadd(0, pb + k * kRows, 64);
      _tile_loadd(2, v, stride * 2);
      _tile_dpbf16ps(4, 2, 0);
      _tile_loadd(3, v + 16 * stride, stride * 2);
      _tile_dpbf16ps(5, 3, 0);
      _tile_loadd(2, v + 32 * stride, stride * 2);
      _tile_dpbf16ps(6, 2, 0);
      _tile_loadd(3, v + 48 * stride, stride * 2);
      _tile_dpbf16ps(7, 3, 0);
    }
    _tile_stored(4, acc + e0 * kRows, 64);
    _tile_stored(5, acc + (e0 + 16) * kRows, 64);
    _tile_stored(6, acc + (e0 + 32) * kRows, 64);
    _tile_stored(7, acc + (e0 + 48) * kRows, 64);
  }
}

// Rows [r0, r0 + 16) of query head h, whose first row sits at position `first`. Everything is
// computed transposed, a query row per lane: scores as [key][row], so the running softmax is
// elementwise across the rows (no horizontal reductions), and the output as [d][row].
void attend_rows(const at::BFloat16* q, int64_t q_stride, int64_t q_len, const at::BFloat16* kp,
                 const at::BFloat16* vt, const Shape& s, int64_t r0, int64_t first, float scale,
                 at::BFloat16* out, int64_t out_stride) {
  const int64_t d = s.d, rows = std::min(kRows, q_len - r0);
  alignas(64) uint32_t qb[128 / 2 * kRows];     // q^T in pairs of d: the B operand of k . q^T
  alignas(64) at::BFloat16 pb[kBlock * kRows];  // p^T in pairs of keys: the B operand of v^T . p^T
  alignas(64) float sc[kBlock * kRows];         // a block's scores, [key][row]
  alignas(64) float acc[128 * kRows];           // the output, [d][row]
  const auto* q32 = reinterpret_cast<const uint32_t*>(q);
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t p = 0; p < d / 2; ++p) qb[p * kRows + r] = r < rows ? q32[((r0 + r) * q_stride) / 2 + p] : 0u;
  std::fill(acc, acc + d * kRows, 0.f);

  const __m512 k2 = _mm512_set1_ps(scale * 1.44269504f);  // scores in base 2: 2^(x k2) = e^(x scale)
  const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(first + r0),
                                       _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  // top: the max the numerators are taken against, scaled to base 2.
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), total = _mm512_setzero_ps();
  const int64_t low = first + r0, high = std::min(first + r0 + rows - 1, s.ctx - 1);  // the rows' positions
  for (int64_t b0 = 0; b0 <= high; b0 += kBlock) {
    const int64_t n = std::min(kBlock, (high - b0) / kChunk * kChunk + kChunk);  // whole chunks
    for (int64_t k0 = b0; k0 < b0 + n; k0 += kChunk) score_chunk(kp, qb, d, k0, sc + (k0 - b0) * kRows);

    // The block's max: a key past a row's position is never its max, nor summed.
    const int64_t unmasked = std::clamp<int64_t>(low + 1 - b0, 0, n);  // keys every row sees
    __m512 m0 = top, m1 = top;
    int64_t j = 0;
    for (; j + 1 < unmasked; j += 2) {
      m0 = _mm512_max_ps(m0, _mm512_mul_ps(_mm512_load_ps(sc + j * kRows), k2));
      m1 = _mm512_max_ps(m1, _mm512_mul_ps(_mm512_load_ps(sc + (j + 1) * kRows), k2));
    }
    for (; j < n; ++j)
      m0 = _mm512_mask_max_ps(m0, _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j)), m0,
                              _mm512_mul_ps(_mm512_load_ps(sc + j * kRows), k2));
    const __m512 mx = _mm512_max_ps(m0, m1);
    if (_mm512_cmp_ps_mask(mx, _mm512_add_ps(top, _mm512_set1_ps(kSlack)), _CMP_GT_OQ)) {
      const __m512 alpha = exp2_16(_mm512_sub_ps(top, mx));  // 0 on the first block
      total = _mm512_mul_ps(total, alpha);
      for (int64_t e = 0; e < d; ++e)
        _mm512_store_ps(acc + e * kRows, _mm512_mul_ps(_mm512_load_ps(acc + e * kRows), alpha));
      top = mx;
    }

    __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < n; j += 2) {
      __m512 p0 = exp2_16(_mm512_fmsub_ps(_mm512_load_ps(sc + j * kRows), k2, top));
      __m512 p1 = exp2_16(_mm512_fmsub_ps(_mm512_load_ps(sc + (j + 1) * kRows), k2, top));
      if (j + 1 >= unmasked) {
        p0 = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j)), p0);
        p1 = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(b0 + j + 1)), p1);
      }
      sums[j / 2 % 2] = _mm512_add_ps(sums[j / 2 % 2], p0);
      sums[2 + j / 2 % 2] = _mm512_add_ps(sums[2 + j / 2 % 2], p1);
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0's 16 rows, then p1's
      _mm512_store_si512(pb + j * kRows, _mm512_permutexvar_epi16(pairs, both));
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3])));
    add_values(vt, pb, s, b0, n, acc);
  }

  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), total);
  for (int64_t e0 = 0; e0 < d; e0 += 16) {  // back to [row][d], 16 dims at a time
    __m512 m[16];
    for (int64_t i = 0; i < 16; ++i) m[i] = _mm512_mul_ps(_mm512_load_ps(acc + (e0 + i) * kRows), inv);
    pdserve_vec::transpose16(m);
    for (int64_t r = 0; r < rows; ++r) pdserve_vec::store16(out + (r0 + r) * out_stride + e0, m[r]);
  }
}

// Whether prefill_attention runs here for heads of size d (else the caller keeps SDPA).
bool prefill_attention_usable(int64_t d) { return pdserve_amx::ready() && d % 64 == 0 && d <= 128; }

// q [q_len, heads, d] (bf16), the chunk's queries at positions ctx - q_len .. ctx - 1; block_ids cover ctx tokens.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_ids,
                             int64_t ctx, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 6 && block_ids.dim() == 1, "prefill_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && cache.scalar_type() == at::kBFloat16, "prefill_attention: bf16 only");
  TORCH_CHECK(prefill_attention_usable(q.size(2)), "prefill_attention: needs AMX and a head dim of 64 or 128");
  TORCH_CHECK(cache.is_contiguous() && block_ids.scalar_type() == at::kLong, "prefill_attention: pool and block ids");
  TORCH_CHECK(q.size(1) % cache.size(4) == 0 && q.size(2) == cache.size(5), "prefill_attention: head shapes");
  TORCH_CHECK(q.size(0) <= ctx && block_ids.numel() * cache.size(3) >= ctx, "prefill_attention: context");
  const at::Tensor qc = q.contiguous(), ids = block_ids.contiguous();
  const int64_t q_len = q.size(0), d = q.size(2);
  const Shape s{q.size(1), cache.size(4), d, ctx, (ctx + kChunk - 1) / kChunk * kChunk};
  const int64_t group = s.heads / s.kv_heads, tiles = (q_len + kRows - 1) / kRows;
  // Kept between calls: a fresh allocation of this size is a fresh mapping, faulted in page by page.
  thread_local std::vector<at::BFloat16> packed;
  packed.resize(std::max<size_t>(packed.size(), s.kv_heads * (s.padded + s.vstride()) * d));
  at::BFloat16* kp = packed.data();
  at::BFloat16* vt = kp + s.kv_heads * s.padded * d;
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
  at::parallel_for(0, s.heads * tiles, 1, [&](int64_t t0, int64_t t1) {
    pdserve_amx::configure_full_tiles();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / tiles, g = h / group;
      attend_rows(qp + h * d, s.heads * d, q_len, kp + g * s.padded * d, vt + g * s.vstride() * d, s, t % tiles * kRows,
                  ctx - q_len, static_cast<float>(scale), op + h * d, s.heads * d);
    }
    _tile_release();
  });
  return out;
}
#else
bool prefill_attention_usable(int64_t) { return false; }
at::Tensor prefill_attention(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t, double) {
  TORCH_CHECK(false, "prefill_attention: built without AMX");
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
