// Argument checks of the em_C softmax-statistics ops, shared by the CPU and CUDA entry points.
// The one torch-facing header here (the math headers stay framework-free): misuse through
// torch.ops.em_C raises RuntimeError with a message that says what to fix, never a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cmath>
#include <limits>

namespace em {

inline void check_logits(const char* op, const at::Tensor& logits, c10::DeviceType device) {
  TORCH_CHECK(logits.device().type() == device, op, ": logits are on ", logits.device(),
              " but this is the ", c10::DeviceTypeName(device), " kernel");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.dim(), "-D");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.size(1) > 0, op, ": logits have V = 0 columns: there is no distribution");
  // Only a tensor with entries has a meaningful stride (torch calls every empty tensor contiguous).
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.numel() == 0, op,
              ": the last dim of logits must be contiguous (stride 1), got stride ",
              logits.stride(1), "; call .contiguous() first");
}

// As em_kernels._checks.check_temperature: the kernels scale by log2(e) / T and 1 / T in float32,
// which must be finite and normal.
inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be a finite positive number, got ", temperature);
  const double lowest = 1.4426950408889634 / std::numeric_limits<float>::max();
  const double highest = 1.0 / std::numeric_limits<float>::min();
  TORCH_CHECK(temperature >= lowest && temperature <= highest, op, ": temperature must be in [",
              lowest, ", ", highest, "] (float32 must hold log2(e) / T and 1 / T), got ",
              temperature);
}

// A per-row vector: 1-D of N entries of `dtype`, on the logits' device.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& logits, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
              " must have shape [N] = [", logits.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

inline void check_fwd_args(const char* op, const at::Tensor& logits,
                           const std::optional<at::Tensor>& tokens, double temperature,
                           c10::DeviceType device) {
  check_logits(op, logits, device);
  check_temperature(op, temperature);
  if (tokens.has_value()) check_row_vector(op, "tokens", *tokens, logits, at::kLong);
}

inline void check_bwd_args(const char* op, const at::Tensor& logits,
                           const std::optional<at::Tensor>& tokens, const at::Tensor& entropy,
                           const at::Tensor& lse, const at::Tensor& grad_entropy,
                           const std::optional<at::Tensor>& grad_logprobs, double temperature,
                           c10::DeviceType device) {
  check_fwd_args(op, logits, tokens, temperature, device);
  check_row_vector(op, "entropy", entropy, logits, at::kFloat);
  check_row_vector(op, "lse", lse, logits, at::kDouble);
  check_row_vector(op, "grad_entropy", grad_entropy, logits, at::kFloat);
  if (grad_logprobs.has_value()) {
    TORCH_CHECK(tokens.has_value(), op, ": grad_logprobs needs tokens");
    check_row_vector(op, "grad_logprobs", *grad_logprobs, logits, at::kFloat);
  }
}

}  // namespace em
