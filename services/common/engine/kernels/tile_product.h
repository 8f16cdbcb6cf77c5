// x [M, K] times a weight's 16-column panels through AMX tiles: the blocking that linear.cpp's ops
// share, each handing the float32 results to an epilogue of its own (a store, SiLU of a gate).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "amx.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
namespace pdserve_tiles {

// n int8 values (a multiple of 32) as bf16: exact, |q| <= 127 needs 7 of bf16's 8 mantissa bits.
inline void widen_int8(const int8_t* q, at::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {
    const auto widen16 = [&](int64_t at) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + at))));
    };
    const __m512 lo = widen16(i), hi = widen16(i + 16);
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// A weight in pack_vnni's layout, [panel][K/32][16 k-pairs][16 n][2] (1 KB a B tile), bf16 or int8.
// Pair p multiplies panels p * step and p * step + offset; `second(p)` says whether it has the latter.
struct Panels {
  const at::BFloat16* bf16 = nullptr;
  const int8_t* int8 = nullptr;  // widened to bf16 a pair at a time, into a buffer of the thread's
  int64_t count = 0, step = 2, offset = 1;
  bool second(int64_t p) const { return p * step + offset < count; }
};

// Column pairs per block: a block's panels stay in L2 while every 32 rows of x pass over them, and
// those rows stay in L1 across the block. One pair (int8) is widened once for all the rows.
constexpr int64_t kBlockPairs = 16;

// For every pair p and 32 rows m0 of x: two A tiles (x's rows) by two B tiles (the pair's panels)
// into four C tiles, so each tile load feeds two multiplies; rows past M read zeros. Then
// epilogue(p, m, c0, c1, r0, r1) gets rows [r0, r1) of panel p * step's C tile (c0, [16][16]
// float32) and of the second panel's (c1, or nullptr), which are x's rows m + r0 .. m + r1 - 1.
//
// The tiles multiply apart from the vector units, so a block's epilogue runs a few rows at a time
// inside the next block's multiplies, where it costs almost nothing, instead of after its own.
template <typename Epilogue>
void tile_product(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, int64_t pairs, Epilogue epilogue) {
  const int64_t kbs = K / 32, full = M / 16 * 16, tile = kbs * 512;
  std::vector<at::BFloat16> tail_rows(16 * K + 32, at::BFloat16(0.f));
  at::BFloat16* tail = pdserve_amx::aligned(tail_rows.data());  // the last, partial block of rows
  std::copy(xp + full * K, xp + M * K, tail);
  auto rows_at = [&](int64_t m0) { return m0 < full ? xp + m0 * K : tail; };
  const int64_t block = w.int8 ? 1 : kBlockPairs;
  at::parallel_for(0, pairs, 16, [&](int64_t p0, int64_t p1) {
    pdserve_amx::configure_full_tiles();
    alignas(64) float c[2][4][16 * 16];  // a block's four C tiles, and the previous block's
    int cur = 0;
    struct {
      int64_t p = 0, m0 = 0, low = 0, high = 0, done = 0;  // low, high: rows of m0's tiles and of m0 + 16's
      bool two_n = false;
    } prev;
    // The previous block's epilogue up to its row `upto` of low + high.
    auto drain = [&](int64_t upto) {
      float(*pc)[16 * 16] = c[cur ^ 1];
      if (prev.done < std::min(upto, prev.low)) {
        epilogue(prev.p, prev.m0, pc[0], prev.two_n ? pc[1] : nullptr, prev.done, std::min(upto, prev.low));
        prev.done = std::min(upto, prev.low);
      }
      if (prev.done < upto) {
        epilogue(prev.p, prev.m0 + 16, pc[2], prev.two_n ? pc[3] : nullptr, prev.done - prev.low, upto - prev.low);
        prev.done = upto;
      }
    };
    std::vector<at::BFloat16> widened_panels(w.int8 ? 2 * tile + 32 : 0);
    at::BFloat16* widened = pdserve_amx::aligned(widened_panels.data());
    for (int64_t c0 = p0; c0 < p1; c0 += block)
      for (int64_t m0 = 0; m0 < M; m0 += 32)
        for (int64_t p = c0; p < std::min(p1, c0 + block); ++p) {
          const bool two_n = w.second(p), two_m = m0 + 16 < M;
          const at::BFloat16 *b0 = widened, *b1 = b0 + tile;
          if (!w.int8) {
            b0 = w.bf16 + p * w.step * tile, b1 = b0 + w.offset * tile;
          } else if (m0 == 0) {
            drain(prev.low + prev.high);  // before its panels are overwritten
            widen_int8(w.int8 + p * w.step * tile, widened, tile);
            if (two_n) widen_int8(w.int8 + (p * w.step + w.offset) * tile, widened + tile, tile);
          }
          const at::BFloat16 *a0 = rows_at(m0), *a1 = two_m ? rows_at(m0 + 16) : a0;
          // Interleaved only past a tile's rows: a decode step's row or two measured faster after the loop.
          const int64_t waiting = prev.low + prev.high, per_step = (waiting + kbs - 1) / kbs;
          const bool interleave = waiting > 16;
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int64_t kb = 0; kb < kbs; ++kb) {
            _tile_loadd(0, a0 + kb * 32, K * 2);
            _tile_loadd(2, b0 + kb * 512, 64);
            _tile_dpbf16ps(4, 0, 2);
            if (two_n) {
              _tile_loadd(3, b1 + kb * 512, 64);
              _tile_dpbf16ps(5, 0, 3);
            }
            if (two_m) {
              _tile_loadd(1, a1 + kb * 32, K * 2);
              _tile_dpbf16ps(6, 1, 2);
              if (two_n) _tile_dpbf16ps(7, 1, 3);
            }
            if (interleave && kb * per_step < waiting) drain(std::min(waiting, (kb + 1) * per_step));
          }
          drain(waiting);
          float(*cc)[16 * 16] = c[cur];
          _tile_stored(4, cc[0], 64);
          if (two_n) _tile_stored(5, cc[1], 64);
          if (two_m) {
            _tile_stored(6, cc[2], 64);
            if (two_n) _tile_stored(7, cc[3], 64);
          }
          prev.p = p, prev.m0 = m0, prev.two_n = two_n, prev.done = 0;
          prev.low = std::min<int64_t>(16, M - m0), prev.high = two_m ? std::min<int64_t>(16, M - m0 - 16) : 0;
          cur ^= 1;
        }
    drain(prev.low + prev.high);
    _tile_release();
  });
}

}  // namespace pdserve_tiles
#endif
