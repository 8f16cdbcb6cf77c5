// x [M, K] times a weight's 16-column panels through AMX tiles: the blocking that linear.cpp's ops
// share, each handing the float32 results to an epilogue of its own (a store, SiLU of a gate).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "amx.h"
#include "panels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
namespace pdserve_tiles {

// Column pairs per block: a block's panels stay in L2 while every 32 rows of x pass over them, and
// those rows stay in L1 across the block. One pair (int8) is widened once for all the rows.
constexpr int64_t kBlockPairs = 16;

// B tiles asked for this far ahead of their load: a panel streams from memory once per call, and at
// 17-32 rows the tile loads alone left it at 11 GB/s a core (2 ahead: 3% faster; 4: no better).
constexpr int64_t kTilesAhead = 2;

// A B tile's 16 lines to L1 (the asm: GCC drops calls of a function of prefetches alone).
inline void prefetch_tile(const at::BFloat16* t) {
  asm volatile("" : : "r"(t));
  for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(t) + 64 * i, _MM_HINT_T0);
}

// One thread's tile multiplies: run(p, m0) multiplies 32 rows m0 of x (two A tiles) by pair p's two
// panels (two B tiles) into four C tiles, so each tile load feeds two multiplies; rows past M read
// zeros. Then epilogue(p, m, c0, c1, r0, r1) gets rows [r0, r1) of panel first(p)'s C tile (c0,
// [16][16] float32) and of the second panel's (c1, or nullptr), which are x's rows m + r0 .. m + r1 - 1.
//
// The tiles multiply apart from the vector units, so a pair's epilogue runs a few rows at a time
// inside the next pair's multiplies, where it costs almost nothing, instead of after its own;
// drain() runs what is left of it.
template <typename Epilogue>
class TileLoop {
 public:
  TileLoop(const Rows& rows, int64_t M, int64_t K, const Panels& w, Epilogue& epilogue)
      : rows_(rows), M_(M), kbs_(K / 32), tile_(K / 32 * 512), w_(w), epilogue_(epilogue),
        widened_panels_(w.int8 ? 2 * tile_ + 32 : 0) {
    widened_ = pdserve_amx::aligned(widened_panels_.data());
    pdserve_amx::configure_full_tiles();
  }
  ~TileLoop() { _tile_release(); }

  void run(int64_t p, int64_t m0) {
    const bool two_n = w_.second(p), two_m = m0 + 16 < M_;
    const at::BFloat16 *b0 = widened_, *b1 = b0 + tile_;
    if (!w_.int8) {
      b0 = w_.bf16 + w_.first(p) * tile_, b1 = b0 + w_.group * tile_;
    } else if (p != widened_pair_) {  // a pair widened once for all the rows that pass over it
      drain();
      widen_int8(w_.int8 + w_.first(p) * tile_, widened_, tile_);
      if (two_n) widen_int8(w_.int8 + (w_.first(p) + w_.group) * tile_, widened_ + tile_, tile_);
      widened_pair_ = p;
    }
    const at::BFloat16 *a0 = rows_.at(m0), *a1 = two_m ? rows_.at(m0 + 16) : a0;
    const int64_t K = kbs_ * 32;
    // Interleaved only past a tile's rows: a decode step's row or two measured faster after the loop.
    const int64_t waiting = prev_.low + prev_.high, per_step = (waiting + kbs_ - 1) / kbs_;
    const bool interleave = waiting > 16;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    // Only where each pair is read once (more rows find it in L2) and two A tiles slow the loads down
    // (with one, up to 16 rows, the loads keep up alone: asking ahead cost 5-14% at 4-12 rows).
    const bool streamed = !w_.int8 && M_ > 16 && M_ <= 32;
    for (int64_t kb = 0; kb < kbs_; ++kb) {
      if (streamed) {
        prefetch_tile(b0 + (kb + kTilesAhead) * 512);  // past a panel's end: the next pair's, in order
        if (two_n) prefetch_tile(b1 + (kb + kTilesAhead) * 512);
      }
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
    drain();
    float(*cc)[16 * 16] = c_[cur_];
    _tile_stored(4, cc[0], 64);
    if (two_n) _tile_stored(5, cc[1], 64);
    if (two_m) {
      _tile_stored(6, cc[2], 64);
      if (two_n) _tile_stored(7, cc[3], 64);
    }
    prev_.p = p, prev_.m0 = m0, prev_.two_n = two_n, prev_.done = 0;
    prev_.low = std::min<int64_t>(16, M_ - m0), prev_.high = two_m ? std::min<int64_t>(16, M_ - m0 - 16) : 0;
    cur_ ^= 1;
  }

  // The previous run's epilogue, up to its row `upto` of low + high (all of it by default).
  void drain(int64_t upto = -1) {
    if (upto < 0) upto = prev_.low + prev_.high;
    float(*pc)[16 * 16] = c_[cur_ ^ 1];
    if (prev_.done < std::min(upto, prev_.low)) {
      epilogue_(prev_.p, prev_.m0, pc[0], prev_.two_n ? pc[1] : nullptr, prev_.done, std::min(upto, prev_.low));
      prev_.done = std::min(upto, prev_.low);
    }
    if (prev_.done < upto) {
      epilogue_(prev_.p, prev_.m0 + 16, pc[2], prev_.two_n ? pc[3] : nullptr, prev_.done - prev_.low, upto - prev_.low);
      prev_.done = upto;
    }
  }

 private:
  const Rows& rows_;
  const int64_t M_, kbs_, tile_;
  const Panels& w_;
  Epilogue& epilogue_;
  alignas(64) float c_[2][4][16 * 16];  // a run's four C tiles, and the previous run's
  int cur_ = 0;
  struct {
    int64_t p = 0, m0 = 0, low = 0, high = 0, done = 0;  // low, high: rows of m0's tiles and of m0 + 16's
    bool two_n = false;
  } prev_;
  std::vector<at::BFloat16> widened_panels_;
  at::BFloat16* widened_;
  int64_t widened_pair_ = -1;
};

// x [M, K] times every pair, the threads splitting the pairs. A block of pairs' panels stays in L2
// while every 32 rows of x pass over them, and those rows stay in L1 across the block.
template <typename Epilogue>
void tile_product(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue) {
  const Rows rows(xp, M, K);
  const int64_t block = w.int8 ? 1 : kBlockPairs;
  at::parallel_for(0, w.pairs(), 16, [&](int64_t p0, int64_t p1) {
    TileLoop<Epilogue> loop(rows, M, K, w, epilogue);
    for (int64_t c0 = p0; c0 < p1; c0 += block)
      for (int64_t m0 = 0; m0 < M; m0 += 32)
        for (int64_t p = c0; p < std::min(p1, c0 + block); ++p) loop.run(p, m0);
    loop.drain();
  });
}

// Bytes of panels a thread of tile_product_rows keeps in L2 while its rows pass over them: half of
// a 2 MB L2. With down_proj's 1.8 MB at once, linear_add_rms_norm took 1.2-1.3x the time of the
// two ops it replaces at 1,024 rows; in 1 MB blocks, 0.96-1.0x.
constexpr int64_t kRowsBlockBytes = 1 << 20;

// x [M, K] times every pair, the threads splitting the rows. Each thread's rows pass over a block
// of pairs at a time, and in the last block, whole(m0, n) gets n rows from m0 once every pair's
// epilogue is done with them (for a norm over whole rows).
template <typename Epilogue, typename Whole>
void tile_product_rows(const at::BFloat16* xp, int64_t M, int64_t K, const Panels& w, Epilogue epilogue, Whole whole) {
  const Rows rows(xp, M, K);
  const int64_t pairs = w.pairs();
  const int64_t block = std::max<int64_t>(1, kRowsBlockBytes / (K * 64));
  at::parallel_for(0, (M + 31) / 32, 1, [&](int64_t g0, int64_t g1) {
    TileLoop<Epilogue> loop(rows, M, K, w, epilogue);
    for (int64_t c0 = 0; c0 < pairs; c0 += block)
      for (int64_t m0 = g0 * 32; m0 < std::min(M, g1 * 32); m0 += 32) {
        for (int64_t p = c0; p < std::min(pairs, c0 + block); ++p) loop.run(p, m0);
        if (c0 + block >= pairs) {
          loop.drain();
          whole(m0, std::min<int64_t>(32, M - m0));
        }
      }
  });
}

}  // namespace pdserve_tiles
#endif
