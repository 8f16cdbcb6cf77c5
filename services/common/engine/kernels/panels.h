// A bf16 weight packed once into 16-column panels in pairs of k (pack_vnni's layout), and x's rows
// as the products over them read them: the parts that AMX tiles (tile_product.h) and AVX512_BF16
// vectors (panel_product.h) share.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "amx.h"

#if defined(PDSERVE_AMX) || defined(__AVX512BF16__)
#define PDSERVE_PANELS 1  // pack_vnni and the products over its panels are built
#include <immintrin.h>

namespace pdserve_tiles {

// Whether this build's panel product can run: AMX tiles need the kernel's permission; vectors don't.
inline bool usable() {
#if defined(PDSERVE_AMX)
  return pdserve_amx::ready();
#else
  return true;
#endif
}

// A weight in pack_vnni's layout, [panel][K/32][16 k-pairs][16 n][2] (1 KB a B tile), bf16 or int8.
// The panels go in runs of 2 * group: pair p multiplies a run's panel f = first(p) with f + group.
// So group 1 pairs neighbours, and group g pairs the two halves of a run of 32 g columns.
struct Panels {
  const at::BFloat16* bf16 = nullptr;
  const int8_t* int8 = nullptr;  // widened to bf16 a pair at a time, into a buffer of the thread's
  int64_t count = 0, group = 1;
  int64_t first(int64_t p) const { return p / group * 2 * group + p % group; }
  bool second(int64_t p) const { return first(p) + group < count; }
  // How many pairs there are: every p whose first panel exists.
  int64_t pairs() const { return count / (2 * group) * group + std::min(group, count % (2 * group)); }
};

// 32 int8 values as bf16, in registers: exact, |q| <= 127 needs 7 of bf16's 8 mantissa bits.
inline __m512bh widen_pair(const int8_t* q) {
  const auto widen16 = [](const int8_t* at) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
  };
  return _mm512_cvtne2ps_pbh(widen16(q + 16), widen16(q));
}

// n int8 values (a multiple of 32) as bf16, into out.
inline void widen_int8(const int8_t* q, at::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) _mm512_storeu_si512(out + i, (__m512i)widen_pair(q + i));
}

// x's rows in groups of 16: a partial last group is copied, zero-padded, so a tile load (or a
// vector block of rows) never reads past x.
class Rows {
 public:
  Rows(const at::BFloat16* xp, int64_t M, int64_t K)
      : xp_(xp), K_(K), full_(M / 16 * 16), buffer_(16 * K + 32, at::BFloat16(0.f)) {
    tail_ = pdserve_amx::aligned(buffer_.data());
    std::copy(xp + full_ * K, xp + M * K, tail_);
  }
  const at::BFloat16* at(int64_t m0) const { return m0 < full_ ? xp_ + m0 * K_ : tail_; }

 private:
  const at::BFloat16* xp_;
  int64_t K_, full_;
  std::vector<at::BFloat16> buffer_;
  at::BFloat16* tail_;
};

}  // namespace pdserve_tiles
#endif
