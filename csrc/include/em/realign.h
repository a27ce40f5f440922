// Cutting a 16-byte vector that starts at a 2-byte offset out of the two aligned 16-byte vectors
// around it: how the CUDA entropy forward reads a chunk whose start is not 16-byte aligned while
// keeping each thread's entries those of an aligned chunk (see csrc/cuda/entropy.cu). Host and
// device code, so that tests/test_extension.py checks it on the CPU for every offset.
#pragma once

#include <cstdint>

#include "em/common.h"

namespace em {

// The low 32 bits of the 64-bit (hi:lo) shifted right by bits (0 <= bits < 32).
EM_HOST_DEVICE uint32_t funnel_shift_right(uint32_t lo, uint32_t hi, unsigned bits) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, bits);  // one SHF instruction
#else
  return bits == 0 ? lo : (lo >> bits) | (hi << (32 - bits));
#endif
}

// out = the 16 bytes that start shift_bytes into words[0..3] and run on into words[4..7] (two
// consecutive aligned vectors, little-endian), for shift_bytes in [0, 16) and a multiple of 2: a
// select picks the words (constant indices only, so everything stays in registers), a funnel
// shift the 2-byte remainder.
EM_HOST_DEVICE void realign_words(const uint32_t (&words)[8], int shift_bytes,
                                  uint32_t (&out)[4]) {
  const int skip = shift_bytes / 4;               // whole words
  const unsigned bits = (shift_bytes % 4) * 8;    // then 0 or 16 bits
  uint32_t picked[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) {
    picked[i] = skip == 0 ? words[i] : skip == 1 ? words[i + 1] : skip == 2 ? words[i + 2]
                                                                            : words[i + 3];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = funnel_shift_right(picked[i], picked[i + 1], bits);
}

}  // namespace em
