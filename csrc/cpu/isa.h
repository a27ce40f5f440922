// Run-time choice of the instruction set for the CPU kernels' vector code (em/cpu_simd.h).
//
// The kernels are written once, as always-inline helpers over em::cpu::VecF. `run_with_widest_isa`
// compiles a body (a lambda marked EM_ISA_BODY, calling only always-inline helpers) three times,
// inside functions whose target is baseline x86-64, AVX2+FMA or AVX-512, and runs the variant
// that torch itself uses on this machine (at::get_cpu_capability, so ATEN_CPU_CAPABILITY=avx2 or
// =default selects the narrower code as it does for torch's own kernels). One build thus runs on
// any x86-64 and uses 512-bit vectors where they exist.
#pragma once

#include <ATen/Version.h>

#include <string>

// Marks a lambda as always inline, so that its body is compiled for the target of the caller.
#define EM_ISA_BODY __attribute__((always_inline))

namespace em::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest variant torch itself uses here, decided once per process.
inline Isa runtime_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

template <typename Body>
void run_baseline(const Body& body) {
  body();
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Body>
__attribute__((target("avx2,fma,f16c"))) void run_avx2(const Body& body) {
  body();
}

template <typename Body>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))) void run_avx512(
    const Body& body) {
  body();
}
#endif

template <typename Body>
void run_with_widest_isa(const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (runtime_isa()) {
    case Isa::kAvx512: return run_avx512(body);
    case Isa::kAvx2: return run_avx2(body);
    case Isa::kBaseline: break;
  }
#endif
  run_baseline(body);
}

}  // namespace em::cpu
