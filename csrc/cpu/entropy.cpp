// C++ kernels of em_C::softmax_stats_fwd and em_C::softmax_stats_bwd for CPU tensors.
//
// Work is cut into items of (row, chunk): a chunk is kChunk consecutive entries of a row (the last
// one shorter), a choice that depends on V only. at::parallel_for spreads the items over the
// threads, so a few long rows use every core as well as many short ones do, and every item is
// computed the same way whichever thread runs it: a row's bits never depend on the batch size, the
// other rows or the thread count (deterministic, batch-invariant).
//
// Forward, per chunk, one read of the logits from memory (the row math is em/softmax_stats.h):
//   pass 1: load (bf16/fp16 converted in registers, kept as float in an L1-resident buffer), max;
//   pass 2: d = (z - max) * log2(e)/T (exact difference, one rounding), e = 2^d (one vectorised
//   exp2), s += e, w += e * d.
// The per-chunk partials (12 bytes per 4096 entries) are then merged in chunk order per row.
// Traffic: N * V * sizeof(logits) read, 12 bytes per row written (16 with tokens).
//
// Backward, per chunk: d = (z - c) * log2(e)/T - r with the row's c and r from the saved double
// lse, p = 2^d, dz = p (c0 + c1 d) / T (+ gL/T at the chosen token), in the logits' dtype.
// Traffic: one read of the logits, one write of the gradient.
//
// The inner loops are GCC/Clang vector code compiled three times (baseline x86-64, AVX2+FMA,
// AVX-512) and chosen at run time by torch's own CPU capability (isa.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "em/cpu_simd.h"
#include "em/op_checks.h"
#include "em/softmax_stats.h"
#include "isa.h"

namespace em::cpu {
namespace {

// Entries per work item: the float copy of a chunk (16 KiB) stays in L1 between the two passes,
// and the per-chunk merge (two scalar exp2) is under 1% of the chunk's work.
constexpr int64_t kChunk = 4096;
static_assert(kChunk % kLanes == 0, "chunks hold whole vectors");
// Fewest entries a thread is handed: ~20 us of work, well above the cost of waking the pool, so
// tiny inputs stay on the calling thread.
constexpr int64_t kParallelGrain = 32768;

template <typename T>
struct ForwardTask {
  const T* logits;
  int64_t row_stride;
  int64_t vocab;
  int64_t chunks_per_row;
  float scale;  // log2(e) / T
  SoftmaxPartial* partials;  // [N * chunks_per_row]
};

template <typename T>
struct BackwardTask {
  const T* logits;
  int64_t row_stride;
  int64_t vocab;
  int64_t chunks_per_row;
  TemperatureFactors temperature;
  const int64_t* tokens;         // nullptr without tokens
  const float* entropy;
  const double* lse;
  const float* grad_entropy;
  const float* grad_logprobs;    // nullptr without a log-prob gradient
  T* grad;                       // [N, V], contiguous
};

// Statistics of the `len` entries at `src` (len <= kChunk).
template <typename T>
EM_SIMD_INLINE SoftmaxPartial chunk_partial(const T* src, int64_t len, float scale) {
  constexpr bool kIsFloat = std::is_same_v<T, float>;
  alignas(64) float converted[kChunk];
  const int64_t full = len - len % kLanes;
  const int rest = static_cast<int>(len % kLanes);

  VecF lane_max = splat(-INFINITY);
  for (int64_t j = 0; j < full; j += kLanes) {
    const VecF x = load<T>(src + j);
    if constexpr (!kIsFloat) store<float>(converted + j, x);
    lane_max = max_ignoring_nan(lane_max, x);
  }
  if (rest != 0) {  // padded with -inf, which contributes exactly nothing
    const VecF x = load_partial<T>(src + full, rest, -INFINITY);
    store<float>(converted + full, x);
    lane_max = max_ignoring_nan(lane_max, x);
  }
  const float* values = kIsFloat ? reinterpret_cast<const float*>(src) : converted;
  const int64_t padded = full + (rest != 0 ? kLanes : 0);
  const float max_logit = reduce_max(lane_max);
  if (max_logit * scale == -INFINITY) {
    // Nothing finite once scaled (all -inf, or finite logits such as finfo.min that overflow when
    // scaled; (z - max) * scale would still give the max entry 2^0): the chunk is empty unless it
    // holds a NaN, which must poison the row.
    for (int64_t j = 0; j < padded; ++j) {
      const float x = j < full ? values[j] : converted[j];
      if (std::isnan(x)) return {-INFINITY, NAN, NAN};
    }
    return empty_partial();
  }

  VecF sum = splat(0.0f);
  VecF weighted = splat(0.0f);
  for (int64_t j = 0; j < padded; j += kLanes) {
    const VecF x = load<float>(j < full ? values + j : converted + j);
    const VecF d = clamp_exponent((x - max_logit) * scale, kExp2Floor);
    const VecF e = exp2_clamped(d);
    sum += e;
    weighted += e * d;
  }
  return {max_logit, reduce_sum(sum), reduce_sum(weighted)};
}

template <typename T>
EM_SIMD_INLINE void forward_items(const ForwardTask<T>& task, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = item / task.chunks_per_row;
    const int64_t start = (item % task.chunks_per_row) * kChunk;
    const int64_t len = std::min(kChunk, task.vocab - start);
    task.partials[item] =
        chunk_partial<T>(task.logits + row * task.row_stride + start, len, task.scale);
  }
}

// One logit as float (a one-entry partial load: any dtype).
template <typename T>
EM_SIMD_INLINE float logit_at(const T* src) {
  return load_partial<T>(src, 1, 0.0f)[0];
}

// dz for kLanes entries whose chunk-relative indices are first + lane.
EM_SIMD_INLINE VecF gradient(VecF x, const GradientCoefficients& k, int32_t first,
                             int32_t token_in_chunk) {
  const VecF d = clamp_exponent((x - k.center) * k.scale - k.offset, kExp2Floor);
  const VecF g = exp2_clamped(d) * (k.c0 + k.c1 * d) * k.inv_temperature;
  return (iota() + first == token_in_chunk) ? g + k.onehot : g;
}

template <typename T>
EM_SIMD_INLINE void backward_items(const BackwardTask<T>& task, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = item / task.chunks_per_row;
    const int64_t start = (item % task.chunks_per_row) * kChunk;
    const int64_t len = std::min(kChunk, task.vocab - start);
    const int64_t token = task.tokens != nullptr ? task.tokens[row] : -1;
    const bool in_vocab = token >= 0 && token < task.vocab;
    // An id outside [0, V) (a NaN log-prob) has its logit elsewhere, as on a vocabulary shard:
    // its log-prob gradient here is lse's alone, -p_j, with no one-hot.
    const float grad_logprob = task.grad_logprobs != nullptr ? task.grad_logprobs[row] : 0.0f;
    const GradientCoefficients k = gradient_coefficients(
        task.entropy[row], task.lse[row], task.grad_entropy[row], grad_logprob, task.temperature);
    const T* src = task.logits + row * task.row_stride + start;
    int32_t token_in_chunk =
        (in_vocab && token >= start && token < start + len) ? static_cast<int32_t>(token - start) : -1;
    // A -inf chosen logit gets no one-hot term: like every -inf entry, a zero gradient.
    if (token_in_chunk >= 0 && logit_at(src + token_in_chunk) == -INFINITY) token_in_chunk = -1;
    T* dst = task.grad + row * task.vocab + start;
    const int64_t full = len - len % kLanes;
    for (int64_t j = 0; j < full; j += kLanes) {
      store<T>(dst + j, gradient(load<T>(src + j), k, static_cast<int32_t>(j), token_in_chunk));
    }
    const int rest = static_cast<int>(len - full);
    if (rest != 0) {
      const VecF x = load_partial<T>(src + full, rest, 0.0f);
      store_partial<T>(dst + full, gradient(x, k, static_cast<int32_t>(full), token_in_chunk), rest);
    }
  }
}

// ---- drivers ---------------------------------------------------------------------------------

// Smallest output worth backing with transparent huge pages.
constexpr size_t kHugePageMinBytes = size_t{16} << 20;

// The gradient is a fresh [N, V] buffer that the kernel writes once: with 4 KiB pages its first
// touch costs more than the kernel (a page fault per 4 KiB, ~3x the kernel's time here). Asking
// for transparent huge pages on the whole 2 MiB pages inside it (what torch does for every
// allocation under THP_MEM_ALLOC_ENABLE=1) cuts that 512-fold. A hint only: ignored where THP is
// off, and it changes no value.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < kHugePageMinBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int64_t chunks_per_row(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }

int64_t item_grain(int64_t vocab) {
  return std::max<int64_t>(1, kParallelGrain / std::min(vocab, kChunk));
}

template <typename T>
void forward(const at::Tensor& logits, const int64_t* tokens, double temperature,
             at::Tensor& entropy, at::Tensor& lse, at::Tensor& logprobs) {
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t chunks = chunks_per_row(vocab);
  std::vector<SoftmaxPartial> partials(static_cast<size_t>(rows * chunks));
  const TemperatureFactors factors = temperature_factors(temperature);
  const ForwardTask<T> task{static_cast<const T*>(logits.const_data_ptr()), logits.stride(0), vocab,
                            chunks, factors.scale, partials.data()};
  at::parallel_for(0, rows * chunks, item_grain(vocab), [&](int64_t begin, int64_t end) {
    run_with_widest_isa([&]() EM_ISA_BODY { forward_items<T>(task, begin, end); });
  });

  float* entropy_out = entropy.data_ptr<float>();
  double* lse_out = lse.data_ptr<double>();
  float* logprobs_out = tokens != nullptr ? logprobs.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, kParallelGrain / chunks), [&](int64_t begin,
                                                                               int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const SoftmaxPartial* row_partials = partials.data() + row * chunks;
      SoftmaxPartial stats = row_partials[0];
      for (int64_t c = 1; c < chunks; ++c) stats = merge(stats, row_partials[c], task.scale);
      const RowStatistics result = finalize(stats, factors);
      entropy_out[row] = result.entropy;
      lse_out[row] = result.lse;
      if (logprobs_out != nullptr) {
        const int64_t token = tokens[row];
        logprobs_out[row] =
            (token >= 0 && token < vocab)
                ? token_logprob(stats, logit_at(task.logits + row * task.row_stride + token),
                                task.scale)
                : NAN;
      }
    }
  });
}

template <typename T>
void backward(const BackwardTask<T>& task, int64_t rows) {
  at::parallel_for(0, rows * task.chunks_per_row, item_grain(task.vocab), [&](int64_t begin,
                                                                             int64_t end) {
    run_with_widest_isa([&]() EM_ISA_BODY { backward_items<T>(task, begin, end); });
  });
}

// Calls fn.template operator()<T>() with T the storage type of `dtype`.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(BFloat16Bits{});
    case at::kHalf: return fn(HalfBits{});
    default: TORCH_CHECK(false, "em_C: unsupported logits dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& tokens, double temperature) {
  check_fwd_args("em_C::softmax_stats_fwd", logits, tokens, temperature, c10::DeviceType::CPU);
  const int64_t rows = logits.size(0);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor entropy = at::empty({rows}, options);
  at::Tensor lse = at::empty({rows}, options.dtype(at::kDouble));
  at::Tensor logprobs = at::empty({tokens.has_value() ? rows : 0}, options);
  if (rows == 0) return {entropy, lse, logprobs};
  const at::Tensor token_ids = tokens.has_value() ? tokens->contiguous() : at::Tensor();
  const int64_t* token_ptr = tokens.has_value() ? token_ids.const_data_ptr<int64_t>() : nullptr;
  dispatch_storage(logits.scalar_type(), [&](auto storage) {
    forward<decltype(storage)>(logits, token_ptr, temperature, entropy, lse, logprobs);
  });
  return {entropy, lse, logprobs};
}

at::Tensor softmax_stats_bwd_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& tokens,
                                 const at::Tensor& entropy, const at::Tensor& lse,
                                 const at::Tensor& grad_entropy,
                                 const std::optional<at::Tensor>& grad_logprobs,
                                 double temperature) {
  check_bwd_args("em_C::softmax_stats_bwd", logits, tokens, entropy, lse, grad_entropy,
                 grad_logprobs, temperature, c10::DeviceType::CPU);
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  at::Tensor grad = at::empty({rows, vocab}, logits.options());
  if (rows == 0) return grad;
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const at::Tensor token_ids = tokens.has_value() ? tokens->contiguous() : at::Tensor();
  const at::Tensor grad_lp = grad_logprobs.has_value() ? grad_logprobs->contiguous() : at::Tensor();
  const at::Tensor entropy_c = entropy.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_entropy_c = grad_entropy.contiguous();
  dispatch_storage(logits.scalar_type(), [&](auto storage) {
    using T = decltype(storage);
    const BackwardTask<T> task{
        static_cast<const T*>(logits.const_data_ptr()),
        logits.stride(0),
        vocab,
        chunks_per_row(vocab),
        temperature_factors(temperature),
        tokens.has_value() ? token_ids.const_data_ptr<int64_t>() : nullptr,
        entropy_c.const_data_ptr<float>(),
        lse_c.const_data_ptr<double>(),
        grad_entropy_c.const_data_ptr<float>(),
        grad_logprobs.has_value() ? grad_lp.const_data_ptr<float>() : nullptr,
        static_cast<T*>(grad.data_ptr())};
    backward<T>(task, rows);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(em_C, CPU, m) {
  m.impl("softmax_stats_fwd", &softmax_stats_fwd_cpu);
  m.impl("softmax_stats_bwd", &softmax_stats_bwd_cpu);
}

}  // namespace em::cpu
