// One decode task through AMX tiles, for paged_decode.cpp: every query head of one sequence against
// a span of its keys, read in place (bf16, head dim 64 or 128, blocks of a multiple of 16 keys).
//
// A tile's 16 rows are 16 consecutive keys of one block at the pool's row stride, so keys go into
// the tiles as they lie: k . q^T comes out as [key][query head], every head in one tile (a KV head's
// rows meet only its own GQA group's columns of q^T). The softmax then runs down the keys with a
// query head per lane, and each value row is weighed in float32 for its group's query heads
// (weigh_group, decode_span.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "amx.h"
#include "decode_span.h"
#include "prefill_task.h"
#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
namespace pdserve_decode {

constexpr int64_t kTileKeys = 16;  // keys a tile's rows hold
constexpr int64_t kTileHeads = 16;  // query heads a tile's columns hold

// Whether a call can go through the tiles: every query head in one tile's columns, and tiles that
// stay within a block.
inline bool tiles_usable(int64_t heads, int64_t d, int64_t block_size) {
  return pdserve_amx::ready() && heads <= kTileHeads && (d == 64 || d == 128) && block_size % kTileKeys == 0;
}

// A sequence's q^T as the B operand of k . q^T: for each KV head and 32 dims, 16 pairs of dims by 16
// query heads, zero outside the head's GQA group.
struct QueryTiles {
  alignas(64) uint32_t b[kTileHeads * 4][16 * kTileHeads];  // [kv head * d / 32 + chunk][pair][query head]

  template <int64_t D>
  void fill(const at::BFloat16* q, int64_t heads, int64_t kv_heads) {
    const int64_t group = heads / kv_heads;
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t c = 0; c < D / 32; ++c) {
        __m512 m[16];  // row r: query head r's 16 pairs of this chunk, if it is in h's group
        for (int64_t r = 0; r < 16; ++r)
          m[r] = r < heads && r / group == h ? _mm512_loadu_ps(q + r * D + c * 32) : _mm512_setzero_ps();
        pdserve_vec::transpose16(m);
        for (int64_t p = 0; p < 16; ++p)
          _mm512_store_ps(reinterpret_cast<float*>(&b[h * D / 32 + c][p * kTileHeads]), m[p]);
      }
  }
};

// part[i] = {max, sum, weighted values [D]} of query head i over keys [t0, t1), as span_avx512 gives;
// keys points at KV head 0. Tiles 0-2 and 4-5 (configure_full_tiles, by the caller).
template <int64_t D>
void span_tiles(const QueryTiles& qt, int64_t heads, int64_t kv_heads, float scale, const Keys& keys, int64_t t0,
                int64_t t1, float* part) {
  const int64_t n = t1 - t0, group = heads / kv_heads, blocks = (n + kTileKeys - 1) / kTileKeys;
  const at::BFloat16* k[kSpan];
  keys.walk(t0, t1, k);
  const int64_t stride = keys.row * int64_t{sizeof(at::BFloat16)};  // bytes from a key's row to the next
  prefetch_rows(k, n, stride, keys.v_off);                           // every head's rows: whole lines
  alignas(64) float sc[kSpan * kTileHeads];  // scores, then weights, [key][query head]
  for (int64_t b = 0; b < blocks; b += 2) {  // two blocks' tiles at a time: their products interleave
    const bool two = b + 1 < blocks;
    _tile_zero(4);
    _tile_zero(5);
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t c = 0; c < D / 32; ++c) {
        _tile_loadd(1, qt.b[h * D / 32 + c], 64);
        _tile_loadd(0, k[b * kTileKeys] + h * D + c * 32, stride);
        _tile_dpbf16ps(4, 0, 1);
        if (two) {
          _tile_loadd(2, k[(b + 1) * kTileKeys] + h * D + c * 32, stride);
          _tile_dpbf16ps(5, 2, 1);
        }
      }
    _tile_stored(4, sc + b * kTileKeys * kTileHeads, 64);
    if (two) _tile_stored(5, sc + (b + 1) * kTileKeys * kTileHeads, 64);
  }
  // Softmax down the keys in base 2, a query head per lane; a block's rows past the context (scored
  // from whatever the pool holds there) are never read.
  const __m512 k2 = _mm512_set1_ps(scale * 1.44269504f);
  __m512 top = _mm512_set1_ps(kNegInf), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) top = _mm512_max_ps(top, _mm512_mul_ps(_mm512_load_ps(sc + j * kTileHeads), k2));
  for (int64_t j = 0; j < n; ++j) {
    const __m512 p = pdserve_prefill::exp2_16(_mm512_fmsub_ps(_mm512_load_ps(sc + j * kTileHeads), k2, top));
    sum = _mm512_add_ps(sum, p);
    _mm512_store_ps(sc + j * kTileHeads, p);
  }
  alignas(64) float tops[kTileHeads], sums[kTileHeads];
  _mm512_store_ps(tops, _mm512_mul_ps(top, _mm512_set1_ps(0.69314718f)));  // base e, as the merge takes it
  _mm512_store_ps(sums, sum);
  for (int64_t i = 0; i < heads; ++i) part[i * (D + 2)] = tops[i], part[i * (D + 2) + 1] = sums[i];
  for (int64_t h = 0; h < kv_heads; ++h)  // the weights of h's group: columns of sc, kTileHeads apart
    weigh_group<at::BFloat16, D>(k, keys.v_off + h * D, n, sc + h * group, 1, kTileHeads, group,
                                 part + h * group * (D + 2) + 2);
}

}  // namespace pdserve_decode
#endif
