// Argument checks of em_C::em_inf_adjust and em_C::adaptive_temperature, shared by the CPU and
// CUDA entry points (the logits checks are those of every em_C op, em/op_checks.h). The public
// Python functions check first and raise TypeError/ValueError; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace em {

// Defined out of line in csrc/cpu/em_inf.cpp (host compiler, part of every build) and called by
// the CUDA entry points too: a ValueError thrown inline from the nvcc-compiled entry point
// crashed the process on the H200 machine (2026-11-27), where the same throw from the CPU
// translation unit raised as it should.
void check_em_inf_args(const at::Tensor& logits, c10::DeviceType device, int64_t steps, double lr,
                       double kl_weight, double threshold);
void check_adaptive_temperature_args(const at::Tensor& logits, c10::DeviceType device,
                                     double alpha, double delta, int64_t max_iters, double tol);

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
