// AMX tile basics shared by the kernels that multiply through tiles (linear.cpp, prefill_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define PDSERVE_AMX 1  // built with AMX tiles (whether the kernel grants them: ready())
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace pdserve_amx {

// Linux hands out the tile state only to a process that asks for it, once.
inline bool ready() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kTileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles as 16 rows of 64 bytes: A (16 x 32 bf16), B (16 k-pairs x 16 columns) and C (16 x 16 float).
// The config is a static, not a local: GCC does not see ldtilecfg read its operand, and in a large
// enough caller it dropped a local config's stores (ldtilecfg then faulted on zero column widths).
inline void configure_full_tiles() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    return c;
  }();
  _tile_loadconfig(&cfg);
}

}  // namespace pdserve_amx
#endif

namespace pdserve_amx {

// p rounded up to a cache line (a buffer 32 elements longer holds what it needs): malloc's blocks are
// 16-byte aligned, and a tile's 64-byte rows would each straddle two lines.
inline at::BFloat16* aligned(at::BFloat16* p) {
  return reinterpret_cast<at::BFloat16*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

}  // namespace pdserve_amx
