// The CUDA entry points of em_C::em_inf_adjust and em_C::adaptive_temperature: argument checks,
// device guard, output, then the launchers of em_inf.cu (em_inf_launch.h).
//
// They live in a host-compiled translation unit, apart from the kernels in em_inf.cu, like the CPU
// entry points.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "em/em_inf_checks.h"
#include "em_inf_launch.h"

namespace {

at::Tensor em_inf_adjust_cuda(const at::Tensor& logits, int64_t steps, double lr,
                              double kl_weight, double threshold, bool adam, bool batch_exit) {
  em::check_em_inf_args(logits, c10::DeviceType::CUDA, steps, lr, kl_weight, threshold);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (steps == 0) return out.copy_(logits);
  // The released code's "batchmean" KL: the batch's loss weighs each row's KL by 1 / N.
  const double kl_scale =
      batch_exit ? kl_weight / static_cast<double>(logits.size(0)) : kl_weight;
  em::cuda::launch_em_inf_adjust(logits, out, steps, static_cast<float>(lr),
                                 static_cast<float>(kl_scale), static_cast<float>(threshold), adam,
                                 batch_exit);
  return out;
}

at::Tensor adaptive_temperature_cuda(const at::Tensor& logits, double alpha, double delta,
                                     int64_t max_iters, double tol) {
  em::check_adaptive_temperature_args(logits, c10::DeviceType::CUDA, alpha, delta, max_iters, tol);
  TORCH_CHECK(logits.size(0) <= 0x7fffffff, "adaptive_temperature: at most 2^31 - 1 rows");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  em::cuda::launch_adaptive_temperature(logits, out, static_cast<float>(alpha),
                                        static_cast<float>(delta), max_iters,
                                        static_cast<float>(tol));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(em_C, CUDA, m) {
  m.impl("em_inf_adjust", &em_inf_adjust_cuda);
  m.impl("adaptive_temperature", &adaptive_temperature_cuda);
}
