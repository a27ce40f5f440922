// Argument checks of em_C::em_inf_adjust and em_C::adaptive_temperature, shared by the CPU and
// CUDA entry points (the logits checks are those of every em_C op, em/op_checks.h). The public
// Python functions check first and raise TypeError/ValueError; these guard direct torch.ops calls
// and raise RuntimeError, as every em_C check does.
//
// On the H200 machine (bench/RESULTS.md, runs C, E and F) these checks crashed the process instead
// of raising. The checks were not the cause: that machine's g++ linked a second, static libstdc++
// into the extension, and every check message with a number in it crashed while being formatted
// (cuda-gdb, 2026-11-28: in std::ostream::_M_insert<long>, inside _C.so). setup.py now links
// torch's own libstdc++ (_torchs_libstdcxx).
// Both entry points are host-compiled (csrc/cpu/em_inf.cpp, csrc/cuda/em_inf_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "em/op_checks.h"

namespace em {

inline void check_em_inf_args(const at::Tensor& logits, c10::DeviceType device, int64_t steps,
                              double lr, double kl_weight, double threshold) {
  check_logits("em_inf_adjust", logits, device);
  TORCH_CHECK(steps >= 0, "em_inf_adjust: steps must be >= 0, got ", steps);
  TORCH_CHECK(steps <= (1 << 30), "em_inf_adjust: steps must be <= 2^30, got ", steps);
  // The kernels take them as float: finite means finite in float32.
  TORCH_CHECK(std::isfinite(static_cast<float>(lr)),
              "em_inf_adjust: lr must be finite in float32, got ", lr);
  TORCH_CHECK(std::isfinite(static_cast<float>(kl_weight)),
              "em_inf_adjust: kl_weight must be finite in float32, got ", kl_weight);
  TORCH_CHECK(!std::isnan(threshold), "em_inf_adjust: threshold must not be NaN");
}

inline void check_adaptive_temperature_args(const at::Tensor& logits, c10::DeviceType device,
                                            double alpha, double delta, int64_t max_iters,
                                            double tol) {
  check_logits("adaptive_temperature", logits, device);
  TORCH_CHECK(std::isfinite(alpha), "adaptive_temperature: alpha must be finite, got ", alpha);
  TORCH_CHECK(std::isfinite(delta), "adaptive_temperature: delta must be finite, got ", delta);
  TORCH_CHECK(max_iters >= 0, "adaptive_temperature: max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK(max_iters <= (1 << 30), "adaptive_temperature: max_iters must be <= 2^30, got ",
              max_iters);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0,
              "adaptive_temperature: tol must be finite and >= 0, got ", tol);
}

// Calls fn(scalar_t{}) for the logits dtypes the ops accept (em::check_logits).
template <typename Fn>
void dispatch_logits_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "unsupported logits dtype ", dtype);  // excluded by the checks
  }
}

}  // namespace em
