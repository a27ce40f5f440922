// Portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions, no intrinsics.
//
// One vector type of kLanes floats is used everywhere; the compiler lowers it to whatever the
// enclosing function's target allows (4 x SSE, 2 x AVX2 or 1 x AVX-512 register), so the same
// source compiles into each ISA variant the kernels dispatch between at run time (see
// csrc/cpu/entropy.cpp). Every helper is always_inline: called from a function compiled for
// AVX-512 it becomes AVX-512 code, and no out-of-line copy with a vector ABI is ever emitted.
//
// Conversions are exact bit manipulations (bf16 and fp16 round to nearest even, NaN stays NaN)
// that need no F16C and behave the same with denormals flushed (DAZ/FTZ) or not.
#pragma once

#include <stdint.h>
#include <string.h>

namespace em::cpu {

#define EM_SIMD_INLINE inline __attribute__((always_inline))

// 16 floats = one AVX-512 register, two AVX2 ones: enough independent work per instruction.
constexpr int kLanes = 16;

typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t VecU __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t VecU16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// Element storage types: raw bits, so that this header needs no framework half types.
struct BFloat16Bits { uint16_t bits; };
struct HalfBits { uint16_t bits; };

EM_SIMD_INLINE VecF splat(float x) { return VecF{} + x; }
EM_SIMD_INLINE VecU splat_u(uint32_t x) { return VecU{} + x; }
EM_SIMD_INLINE VecI iota() {
  VecI v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

// Reinterpret the bits (memcpy compiles to nothing; __builtin_bit_cast needs GCC 11).
EM_SIMD_INLINE VecU as_bits(VecF v) {
  VecU u;
  memcpy(&u, &v, sizeof u);
  return u;
}
EM_SIMD_INLINE VecF as_float(VecU u) {
  VecF v;
  memcpy(&v, &u, sizeof v);
  return v;
}

// ---- float <-> storage conversions ------------------------------------------------------------

EM_SIMD_INLINE VecF bf16_to_float(VecU16 h) { return as_float(__builtin_convertvector(h, VecU) << 16); }

EM_SIMD_INLINE VecU16 float_to_bf16(VecF v) {
  const VecU u = as_bits(v);
  const VecU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
  const VecU bits = (v != v) ? splat_u(0x7fc0u) : rounded;       // canonical quiet NaN
  return __builtin_convertvector(bits, VecU16);
}

EM_SIMD_INLINE VecF half_to_float(VecU16 h16) {
  const VecU h = __builtin_convertvector(h16, VecU);
  const VecU sign = (h & 0x8000u) << 16;
  const VecU exponent = h & 0x7c00u;
  const VecU magnitude = (h & 0x7fffu) << 13;  // exponent and mantissa at their float positions
  const VecU normal = magnitude + (112u << 23);  // rebias the exponent: 127 - 15
  // Subnormal halves are M * 2^-24; 0.5 + M * 2^-24 is exactly representable, so one exact
  // subtraction yields the value without touching float subnormals.
  const VecU subnormal = as_bits(as_float((h & 0x3ffu) | 0x3f000000u) - 0.5f);
  const VecU inf_nan = magnitude | 0x7f800000u;
  const VecU bits = (exponent == 0u) ? subnormal : ((exponent == 0x7c00u) ? inf_nan : normal);
  return as_float(bits | sign);
}

EM_SIMD_INLINE VecU16 float_to_half(VecF v) {
  const VecU u = as_bits(v);
  const VecU sign = (u >> 16) & 0x8000u;
  const VecU a = u & 0x7fffffffu;
  // Normal halves: rebias the exponent, round the 13 dropped mantissa bits to nearest even (a
  // carry into the exponent is the correct rounding, up to infinity at 65520).
  const VecU normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the half is subnormal, a multiple of 2^-24: adding 0.5 rounds |v| to that grid
  // (nearest even), and the low bits of the sum are the half's bits (0x400 when it rounds up to
  // the smallest normal, which is also right).
  const VecU subnormal = as_bits(as_float(a) + 0.5f) - 0x3f000000u;
  VecU bits = (a < 0x38800000u) ? subnormal : normal;
  bits = (a >= 0x47800000u) ? splat_u(0x7c00u) : bits;  // overflow to infinity
  bits = (a > 0x7f800000u) ? splat_u(0x7e00u) : bits;   // NaN
  return __builtin_convertvector(bits | sign, VecU16);
}

// ---- loads and stores of kLanes elements (any alignment) ---------------------------------------

template <typename T>
EM_SIMD_INLINE VecF load(const T* src);

template <>
EM_SIMD_INLINE VecF load<float>(const float* src) {
  VecF v;
  memcpy(&v, src, sizeof v);
  return v;
}

template <>
EM_SIMD_INLINE VecF load<BFloat16Bits>(const BFloat16Bits* src) {
  VecU16 h;
  memcpy(&h, src, sizeof h);
  return bf16_to_float(h);
}

template <>
EM_SIMD_INLINE VecF load<HalfBits>(const HalfBits* src) {
  VecU16 h;
  memcpy(&h, src, sizeof h);
  return half_to_float(h);
}

template <typename T>
EM_SIMD_INLINE void store(T* dst, VecF v);

template <>
EM_SIMD_INLINE void store<float>(float* dst, VecF v) { memcpy(dst, &v, sizeof v); }

template <>
EM_SIMD_INLINE void store<BFloat16Bits>(BFloat16Bits* dst, VecF v) {
  const VecU16 h = float_to_bf16(v);
  memcpy(dst, &h, sizeof h);
}

template <>
EM_SIMD_INLINE void store<HalfBits>(HalfBits* dst, VecF v) {
  const VecU16 h = float_to_half(v);
  memcpy(dst, &h, sizeof h);
}

// The first `count` (< kLanes) elements; the other lanes are `fill`.
template <typename T>
EM_SIMD_INLINE VecF load_partial(const T* src, int count, float fill) {
  T padded[kLanes];
  memcpy(padded, src, count * sizeof(T));
  VecF v = load<T>(padded);
  for (int i = count; i < kLanes; ++i) v[i] = fill;
  return v;
}

template <typename T>
EM_SIMD_INLINE void store_partial(T* dst, VecF v, int count) {
  T padded[kLanes];
  store<T>(padded, v);
  memcpy(dst, padded, count * sizeof(T));
}

// ---- arithmetic ------------------------------------------------------------------------------

// max(a, b) per lane that ignores NaN in b (a is never NaN where it is used: a running max).
EM_SIMD_INLINE VecF max_ignoring_nan(VecF a, VecF b) { return (b > a) ? b : a; }

EM_SIMD_INLINE float reduce_max(VecF v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Lane sum in a fixed order: deterministic on every ISA.
EM_SIMD_INLINE float reduce_sum(VecF v) {
  float s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

// Clamp exponents to [kExp2Floor, 128] keeping NaN: comparisons with NaN are false.
EM_SIMD_INLINE VecF clamp_exponent(VecF d, float floor) {
  d = (d < floor) ? splat(floor) : d;
  return (d > 128.0f) ? splat(128.0f) : d;
}

// 2^d for d already in [-127, 128] (or NaN): 2^d = 2^n * 2^f with n = round(d), |f| <= 1/2.
// 2^f is a degree-6 polynomial with p(0) = 1, fitted for minimax relative error on [-1/2, 1/2]
// (1.98e-9 in exact arithmetic, about 1e-7 = 1 ulp evaluated in float). 2^n is built in the
// exponent field: n = -127 gives the bit pattern 0, i.e. exactly 0.0 (so 2^kExp2Floor = 0), and
// n = 128 gives infinity. A NaN d gives NaN through f.
EM_SIMD_INLINE VecF exp2_clamped(VecF d) {
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, in the low bits
  const VecF shifted = d + kRoundMagic;
  const VecF n = shifted - kRoundMagic;
  const VecF f = d - n;
  const VecU two_to_n = (as_bits(shifted) - as_bits(splat(kRoundMagic)) + 127u) << 23;
  VecF p = splat(0x1.41fba0p-13f);
  p = p * f + 0x1.5f3e50p-10f;
  p = p * f + 0x1.3b2d4ep-7f;
  p = p * f + 0x1.c6aee8p-5f;
  p = p * f + 0x1.ebfbdcp-3f;
  p = p * f + 0x1.62e430p-1f;
  p = p * f + 1.0f;
  return p * as_float(two_to_n);
}

}  // namespace em::cpu
