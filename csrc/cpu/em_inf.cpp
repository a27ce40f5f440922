// EM-INF and adaptive temperature for CPU tensors (ops em_C::em_inf_adjust and
// em_C::adaptive_temperature; semantics: em_kernels/reference.py, em_inf_adjust_ref and
// adaptive_temperature_ref).
//
// EM-INF, per row, z0 = logits in fp32, p0 = softmax(z0). Each step t reads the row statistics
// (max, log sum, mean shift, H) of the current z and makes one pass over the row:
//   p_j = exp((z_j - max) - log sum),  g_j = -p_j ((z_j - max) - mean shift) + k (p_j - p0_j)
//   (0 where z_j is not finite; (z_j - max) - mean shift = log p_j + H, see SoftmaxStats),
//   z_j <- z_j - Adam/SGD update (em/adam.h),  and the running max of the new z;
// then a second pass computes the statistics of the new z with that max, in base 2 (d_j =
// (z_j - max) log2 e): sum = sum 2^d_j, weighted = sum 2^d_j d_j, mean shift = ln2 weighted /
// sum, H = ln2 (log2 sum - weighted / sum). Two passes and two exp2 per element per step, in SIMD vectors of em/cpu_simd.h (the exp2
// is its polynomial), over z (the output row itself), m, v and p0: 16 bytes per element, a
// V = 151936 row is 2.4 MB, resident in L2/L3 across the steps.
//
// early_exit "row" (batch_exit=false): rows are independent; each thread owns a row at a time,
// with m, v and p0 in a per-thread buffer of 3 V floats, and stops the row before the first step
// whose entropy is below the threshold. early_exit "batch": the released code, one loss for the
// whole batch: before each step the entropies are summed over the rows (in row order, so the
// decision is deterministic) and every row stops at once; the KL weight is k = kl_weight / N. The
// rows' m, v and p0 must then survive across steps: [N, V] buffers, steps outside, rows inside.
//
// Adaptive temperature, per row: the row in fp32 in a per-thread buffer, its max M and entropy
// once, then one pass per bisection iteration: H(z / tau) with max M / tau (tau > 0 keeps the
// order), one division and one exp per element.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "em/adam.h"
#include "em/common.h"
#include "em/cpu_simd.h"
#include "em/em_inf_checks.h"
#include "em/op_checks.h"

namespace {

using em::cpu::kLanes;
using em::cpu::VecF;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Vectors summed in fp32 lanes before the running sums take them in double: a plain fp32 sum over
// V = 151936 terms loses about log2(V) bits, and Adam's update lr * g / (|g| + eps) turns a small
// error in H into a sign flip of the step wherever g = -p (log p + H) nearly cancels.
constexpr int kVectorsPerBlock = 64;

// The softmax statistics that one optimiser step needs from the current z:
// p_j = exp((z_j - max) - log_sum), and the entropy gradient's factor
// log p_j + H = (z_j - max) - mean_shift, mean_shift = E_p[z - max]. Formed as log p_j and H
// separately (each ~log V, rounded to fp32) their sum errs by ~1e-7 where it should be ~0 on a
// near-uniform row, and Adam's normalised step lr * g / (|g| + eps) turns that into an error of
// lr; this form errs relative to |z_j - max| and |mean_shift| instead, with no log at all.
struct SoftmaxStats {
  float max;
  float log_sum;     // log sum_j exp(z_j - max), nats
  float mean_shift;  // sum_j p_j (z_j - max), nats (<= 0)
  float entropy;     // log_sum - mean_shift, nats: the early-exit test only
};

// kLanes floats from z[j, V): the missing tail lanes are `fill`.
EM_SIMD_INLINE VecF load_lanes(const float* z, int64_t j, int64_t V, float fill) {
  return j + kLanes <= V ? em::cpu::load<float>(z + j)
                         : em::cpu::load_partial<float>(z + j, static_cast<int>(V - j), fill);
}

EM_SIMD_INLINE void store_lanes(float* z, int64_t j, int64_t V, VecF x) {
  if (j + kLanes <= V) {
    em::cpu::store<float>(z + j, x);
  } else {
    em::cpu::store_partial<float>(z + j, x, static_cast<int>(V - j));
  }
}

// 2^d per lane, d <= 0 or NaN; a masked entry (d = -inf) gives exactly 0.
EM_SIMD_INLINE VecF exp2_lanes(VecF d) {
  return em::cpu::exp2_clamped(em::cpu::clamp_exponent(d, em::kExp2Floor));
}

struct VecSqrt {
  EM_SIMD_INLINE VecF operator()(VecF x) const {
    for (int i = 0; i < kLanes; ++i) x[i] = std::sqrt(x[i]);
    return x;
  }
};

// sum_j 2^d_j and sum_j 2^d_j d_j with d_j = (z_j - max) * scale (bits), in double across
// blocks. NaN entries poison the sums; a masked entry contributes 0.
struct ShiftedSums {
  double sum, weighted;
};

ShiftedSums shifted_sums(const float* z, int64_t V, float max, float scale) {
  double sum = 0.0, weighted = 0.0;
  for (int64_t block = 0; block < V; block += kVectorsPerBlock * kLanes) {
    const int64_t block_end = std::min<int64_t>(V, block + kVectorsPerBlock * kLanes);
    VecF block_sum = em::cpu::splat(0.0f), block_weighted = em::cpu::splat(0.0f);
    for (int64_t j = block; j < block_end; j += kLanes) {
      VecF d = (load_lanes(z, j, V, kNegInf) - max) * scale;
      d = em::cpu::clamp_exponent(d, em::kExp2Floor);
      const VecF e = em::cpu::exp2_clamped(d);
      block_sum += e;
      block_weighted += e * d;
    }
    sum += em::cpu::reduce_sum(block_sum);
    weighted += em::cpu::reduce_sum(block_weighted);
  }
  return {sum, weighted};
}

// Statistics of z[0, V) given its max (NaN entries ignored by the max: they poison the sums). A
// row that is all -inf gives an entropy NaN, as the reference.
SoftmaxStats softmax_stats(const float* z, int64_t V, float max) {
  const auto [sum, weighted] = shifted_sums(z, V, max, em::kLog2e);
  const double log2_sum = std::log2(sum);
  const double mean_shift_bits = weighted / sum;
  return {max, static_cast<float>(std::log(sum)), static_cast<float>(mean_shift_bits * em::kLn2),
          static_cast<float>((log2_sum - mean_shift_bits) * em::kLn2)};
}

// z <- logits row in fp32; returns its max (ignoring NaN).
template <typename scalar_t>
float load_row(const scalar_t* logits, float* z, int64_t V) {
  float max = kNegInf;
  for (int64_t j = 0; j < V; ++j) {
    z[j] = static_cast<float>(logits[j]);
    max = z[j] > max ? z[j] : max;
  }
  return max;
}

// p = exp((z - max) - log_sum) per lane: the one formula for p and p0, so that p - p0 is exactly
// 0 at step 1 (z = z0), where the KL term would otherwise add rounding noise to gradients ~0.
EM_SIMD_INLINE VecF probs_lanes(VecF z, const SoftmaxStats& stats) {
  return exp2_lanes(((z - stats.max) - stats.log_sum) * em::kLog2e);
}

// p0 <- softmax(z) with the statistics of z.
void store_probs(const float* z, int64_t V, SoftmaxStats stats, float* p0) {
  for (int64_t j = 0; j < V; j += kLanes)
    store_lanes(p0, j, V, probs_lanes(load_lanes(z, j, V, kNegInf), stats));
}

// One optimiser step on the row (z, m, v) with the statistics of z; returns the max of the new z
// (ignoring NaN).
float optimizer_pass(float* z, float* m, float* v, const float* p0, int64_t V, SoftmaxStats stats,
                     float kl_scale, const em::OptimizerStep& step) {
  VecF max = em::cpu::splat(kNegInf);
  for (int64_t j = 0; j < V; j += kLanes) {
    const VecF zj = load_lanes(z, j, V, kNegInf);
    VecF mj = load_lanes(m, j, V, 0.0f), vj = load_lanes(v, j, V, 0.0f);
    const VecF p = probs_lanes(zj, stats);
    const VecF log_p_plus_entropy = (zj - stats.max) - stats.mean_shift;
    VecF grad = -p * log_p_plus_entropy + kl_scale * (p - load_lanes(p0, j, V, 0.0f));
    grad = (zj - zj == 0.0f) ? grad : em::cpu::splat(0.0f);  // 0 where z is +-inf or NaN
    const VecF updated = zj - em::optimizer_update(step, grad, mj, vj, VecSqrt{});
    store_lanes(z, j, V, updated);
    store_lanes(m, j, V, mj);
    store_lanes(v, j, V, vj);
    max = em::cpu::max_ignoring_nan(max, updated);
  }
  return em::cpu::reduce_max(max);
}

template <typename scalar_t>
void em_inf_rows_independent(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                             float kl_scale, float threshold, bool adam) {
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> state(3 * static_cast<size_t>(V));  // m, v, p0 of the current row
    float* m = state.data();
    float* v = m + V;
    float* p0 = v + V;
    for (int64_t row = begin; row < end; ++row) {
      float* z = out_ptr + row * V;
      float max = load_row(in + row * row_stride, z, V);
      if (steps == 0) continue;
      SoftmaxStats stats = softmax_stats(z, V, max);
      store_probs(z, V, stats, p0);
      std::fill(m, m + 2 * V, 0.0f);  // m and v
      em::OptimizerSchedule schedule(lr, adam);
      for (int64_t t = 1; t <= steps; ++t) {
        if (stats.entropy < threshold) break;
        max = optimizer_pass(z, m, v, p0, V, stats, kl_scale, schedule.next());
        if (t < steps) stats = softmax_stats(z, V, max);
      }
    }
  });
}

template <typename scalar_t>
void em_inf_batch_exit(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                       float kl_scale, float threshold, bool adam) {
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  float* z_all = out.data_ptr<float>();
  std::vector<float> maxes(N);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      maxes[row] = load_row(in + row * row_stride, z_all + row * V, V);
  });
  if (steps == 0) return;
  // m, v and p0 of every row, [3, N, V]: the batch-wide decision needs every row between steps.
  at::Tensor state = at::zeros({3, N, V}, out.options());
  float* m_all = state.data_ptr<float>();
  float* v_all = m_all + N * V;
  float* p0_all = v_all + N * V;
  std::vector<SoftmaxStats> stats(N);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      stats[row] = softmax_stats(z_all + row * V, V, maxes[row]);
      store_probs(z_all + row * V, V, stats[row], p0_all + row * V);
    }
  });
  em::OptimizerSchedule schedule(lr, adam);
  for (int64_t t = 1; t <= steps; ++t) {
    float entropy_sum = 0.0f;
    for (int64_t row = 0; row < N; ++row) entropy_sum += stats[row].entropy;
    if (entropy_sum < threshold) break;
    const em::OptimizerStep step = schedule.next();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        float* z = z_all + row * V;
        const float max = optimizer_pass(z, m_all + row * V, v_all + row * V, p0_all + row * V,
                                         V, stats[row], kl_scale, step);
        if (t < steps) stats[row] = softmax_stats(z, V, max);
      }
    });
  }
}

at::Tensor em_inf_adjust_cpu(const at::Tensor& logits, int64_t steps, double lr,
                             double kl_weight, double threshold, bool adam, bool batch_exit) {
  em::check_em_inf_args(logits, c10::DeviceType::CPU, steps, lr, kl_weight, threshold);
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // The released code's "batchmean" KL: the batch's loss weighs each row's KL by 1 / N.
  const float kl_scale =
      static_cast<float>(batch_exit ? kl_weight / static_cast<double>(logits.size(0)) : kl_weight);
  em::dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (batch_exit) {
      em_inf_batch_exit<scalar_t>(logits, out, steps, static_cast<float>(lr), kl_scale,
                                  static_cast<float>(threshold), adam);
    } else {
      em_inf_rows_independent<scalar_t>(logits, out, steps, static_cast<float>(lr), kl_scale,
                                        static_cast<float>(threshold), adam);
    }
  });
  return out;
}

// Entropy of softmax(z / tau) for a row z with max `max` (tau > 0): d = (z - max) log2(e) / tau.
float scaled_entropy(const float* z, int64_t V, float max, float tau) {
  const auto [sum, weighted] = shifted_sums(z, V, max, em::kLog2e / tau);
  return static_cast<float>((std::log2(sum) - weighted / sum) * em::kLn2);
}

template <typename scalar_t>
void adaptive_temperature_rows(const at::Tensor& logits, at::Tensor& out, float alpha,
                               float delta, int64_t max_iters, float tol) {
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* z = out_ptr + row * V;  // the row in fp32, divided by tau in place at the end
      const float max = load_row(in + row * row_stride, z, V);
      const float entropy = softmax_stats(z, V, max).entropy;
      if (!(entropy > delta)) continue;  // already sharp enough (or NaN): tau = 1
      const float target = std::fmax(alpha * entropy, delta);
      float lo = 0.01f, hi = 1.0f, tau = 1.0f;
      for (int64_t it = 0; it < max_iters; ++it) {
        tau = (lo + hi) / 2.0f;
        const float h = scaled_entropy(z, V, max, tau);
        if (std::fabs(h - target) < tol) break;
        if (h > target) {
          hi = tau;
        } else {
          lo = tau;
        }
      }
      for (int64_t j = 0; j < V; ++j) z[j] = z[j] / tau;
    }
  });
}

at::Tensor adaptive_temperature_cpu(const at::Tensor& logits, double alpha, double delta,
                                    int64_t max_iters, double tol) {
  em::check_adaptive_temperature_args(logits, c10::DeviceType::CPU, alpha, delta, max_iters,
                                      tol);
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  em::dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    adaptive_temperature_rows<scalar_t>(logits, out, static_cast<float>(alpha),
                                        static_cast<float>(delta), max_iters,
                                        static_cast<float>(tol));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(em_C, CPU, m) {
  m.impl("em_inf_adjust", &em_inf_adjust_cpu);
  m.impl("adaptive_temperature", &adaptive_temperature_cpu);
}
