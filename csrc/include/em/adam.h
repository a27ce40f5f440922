// The optimiser step of EM-INF, framework-free, for host and device code.
//
// EM-INF runs a fresh optimiser on an fp32 copy of each row of logits. Per element j
// at step t (1-based), with gradient g:
//   Adam (torch.optim.Adam's defaults, bias-corrected):
//     m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2,
//     z <- z - lr * ((m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps))
//   (the quotient first: it is O(1) whatever the gradient's size, so the step overflows only
//   where lr itself is near float32's maximum, not where lr * |g| is)
//   SGD:
//     z <- z - lr * g
// The bias corrections depend only on t: `OptimizerSchedule` computes them once per step (in
// double, then rounded), and `optimizer_update` is the per-element work: one sqrt, one division.
#pragma once

#include <cmath>

// Always inline on the host too: the CPU kernels call optimizer_update on SIMD vectors from
// functions compiled for AVX2 or AVX-512 (csrc/cpu/isa.h); an out-of-line copy would be compiled
// for baseline x86-64 and receive those vectors under another calling convention.
#if defined(__CUDACC__)
#define EM_ADAM_INLINE __host__ __device__ __forceinline__
#else
#define EM_ADAM_INLINE inline __attribute__((always_inline))
#endif

namespace em {

// In double, as torch.optim.Adam's Python floats; the per-element math uses their fp32 roundings
// (and those of 1 - beta), as torch does with a Python scalar and an fp32 tensor.
constexpr double kAdamBeta1 = 0.9;
constexpr double kAdamBeta2 = 0.999;
constexpr float kAdamEps = 1e-8f;

// The per-step constants of one optimiser step, shared by every element of every row.
struct OptimizerStep {
  float lr;
  float inv_bias_correction1;  // 1 / (1 - beta1^t)
  float inv_bias_correction2;  // 1 / (1 - beta2^t)
  bool adam;                   // false: plain SGD (m and v untouched)
};

// The steps t = 1, 2, ... in order: beta^t advances by one multiplication (in double) per step,
// so that loops replaying many steps per element never call pow.
struct OptimizerSchedule {
  float lr;
  bool adam;
  double beta1_power = 1.0;
  double beta2_power = 1.0;

  EM_ADAM_INLINE OptimizerSchedule(float lr_, bool adam_) : lr(lr_), adam(adam_) {}

  EM_ADAM_INLINE OptimizerStep next() {
    beta1_power *= kAdamBeta1;
    beta2_power *= kAdamBeta2;
    return {lr, static_cast<float>(1.0 / (1.0 - beta1_power)),
            static_cast<float>(1.0 / (1.0 - beta2_power)), adam};
  }
};

// Advances the moments (m, v) with gradient `grad` and returns the amount to subtract from z. A
// zero gradient on fresh moments gives a zero update (masked entries stay put). Generic in the
// value type: one element (float) or a SIMD vector of them (the CPU kernels), with its sqrt.
template <typename T, typename Sqrt>
EM_ADAM_INLINE T optimizer_update(const OptimizerStep& step, T grad, T& m, T& v, Sqrt sqrt_fn) {
  if (!step.adam) return step.lr * grad;
  m = static_cast<float>(kAdamBeta1) * m + static_cast<float>(1.0 - kAdamBeta1) * grad;
  v = static_cast<float>(kAdamBeta2) * v + static_cast<float>(1.0 - kAdamBeta2) * grad * grad;
  const T m_hat = m * step.inv_bias_correction1;
  const T v_hat = v * step.inv_bias_correction2;
  return step.lr * (m_hat / (sqrt_fn(v_hat) + kAdamEps));
}

struct ScalarSqrt {
  EM_ADAM_INLINE float operator()(float x) const { return sqrtf(x); }
};

EM_ADAM_INLINE float optimizer_update(const OptimizerStep& step, float grad, float& m, float& v) {
  return optimizer_update(step, grad, m, v, ScalarSqrt{});
}

#if defined(__CUDACC__)
// optimizer_update with every operation rounded explicitly (__f*_rn: never contracted into an FMA,
// IEEE division and sqrt whatever the nvcc flags). nvcc contracts a * b + c differently in
// different inlining contexts; CUDA kernels that run one step in several code paths (em_inf.cu's
// two placements) call this so that every path gives the same bits.
__device__ __forceinline__ float optimizer_update_rn(const OptimizerStep& step, float grad,
                                                     float& m, float& v) {
  if (!step.adam) return __fmul_rn(step.lr, grad);
  m = __fadd_rn(__fmul_rn(static_cast<float>(kAdamBeta1), m),
                __fmul_rn(static_cast<float>(1.0 - kAdamBeta1), grad));
  v = __fadd_rn(__fmul_rn(static_cast<float>(kAdamBeta2), v),
                __fmul_rn(__fmul_rn(static_cast<float>(1.0 - kAdamBeta2), grad), grad));
  const float m_hat = __fmul_rn(m, step.inv_bias_correction1);
  const float v_hat = __fmul_rn(v, step.inv_bias_correction2);
  return __fmul_rn(step.lr, __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), kAdamEps)));
}
#endif

}  // namespace em
