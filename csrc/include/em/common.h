// Macros and constants shared by every header in csrc/include/em (framework-free: no torch, no
// CUDA runtime; compiles as plain C++17 and as CUDA device code).
#pragma once

#if defined(__CUDACC__)
#define EM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EM_HOST_DEVICE inline
#endif

namespace em {

// The kernels work in base 2: u = z * kLog2e / T is a logit in bits, exp(z / T - c) =
// exp2(u - c * kLog2e), and results go back to nats by one multiplication with kLn2 per row.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Exponents (in bits, relative to the row max) are clamped below at this value where they multiply
// p: 0 * kExp2Floor = 0 replaces the 0 * -inf = NaN of a masked entry. The CPU exp2 (em/cpu_simd.h)
// also takes the clamped exponent and returns exactly 0 there. The CUDA build keeps subnormals
// (no flush-to-zero), where 2^-127 is a subnormal, not 0: CUDA kernels pass the unclamped exponent
// to exp2 (2^-inf = 0) and clamp only the factor it multiplies.
constexpr float kExp2Floor = -127.0f;

}  // namespace em
