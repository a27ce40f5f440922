// The launchers of csrc/cuda/em_inf.cu. Their only caller is csrc/cuda/em_inf_ops.cpp, which
// checks the arguments, selects the device and allocates the output first: these assume
// logits [N, V] on the current CUDA device with N, V >= 1 (a float32, bfloat16 or float16 dtype,
// contiguous last dim) and out a contiguous float32 [N, V] on the same device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace em::cuda {

// `steps` >= 1 optimiser steps; kl_scale is the KL weight that each row's loss carries.
void launch_em_inf_adjust(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                          float kl_scale, float threshold, bool adam, bool batch_exit);

// N <= 2^31 - 1 (one block per row).
void launch_adaptive_temperature(const at::Tensor& logits, at::Tensor& out, float alpha,
                                 float delta, int64_t max_iters, float tol);

}  // namespace em::cuda
