// EM-INF and adaptive temperature for CPU tensors (ops em_C::em_inf_adjust and
// em_C::adaptive_temperature; semantics: em_kernels/reference.py, em_inf_adjust_ref and
// adaptive_temperature_ref).
//
// EM-INF, per row, z0 = logits in fp32, p0 = softmax(z0). Each step t uses the row statistics
// (max, log sum, mean shift, H) of the current z:
//   p_j = exp((z_j - max) - log sum),  g_j = -p_j ((z_j - max) - mean shift) + k (p_j - p0_j)
//   (0 where z_j is not finite; (z_j - max) - mean shift = log p_j + H, see SoftmaxStats),
//   z_j <- z_j - Adam/SGD update (em/adam.h).
// At step 1 z = z0, so p is p0: the pass stores it (and p - p0 is exactly 0).
//
// Work items are (row, chunk) with chunks of kChunk entries, a split that depends on V alone.
// One parallel region per step runs every item of a group of rows: the optimiser pass over the
// chunk (z, m, v, p0: 16 bytes per entry, the row's state lives between steps), then, while the
// chunk's z is still in L1, its partial statistics relative to its own max, in base 2 (d_j =
// (z_j - max_c) log2 e): sum = sum 2^d_j, weighted = sum 2^d_j d_j. Between steps the partials
// are merged per row in chunk order (ChunkPartial, merge_row). Each item is computed the same way
// whichever thread runs it and whatever the other rows are: a row's bits never depend on the
// batch, the grouping or the thread count, and a single row spreads over up to V / (4 kChunk)
// threads (kItemsPerTask chunks each). Two exp2 per entry
// per step (p, and the statistics of the new z), both the polynomial of em/cpu_simd.h, compiled
// for the widest vector ISA of the machine (isa.h).
//
// early_exit "row" (batch_exit=false): rows go in groups (enough rows to keep every thread busy,
// more for small vocabularies), whose p0, m and v ([3, G, V]; p0 alone for SGD) live between
// steps; a row stops before the first step whose entropy is below the threshold, and its chunks
// are no longer handed out. early_exit "batch": the released code, one loss for the whole batch:
// one group of every row, the entropies summed over the rows (in row order, so the decision is
// deterministic) before each step, every row stopping at once; the KL weight is k = kl_weight / N.
//
// Adaptive temperature, per row: the row in fp32 in the output, its max M and entropy once, then
// one pass per bisection iteration: H(z / tau) with max M / tau (tau > 0 keeps the order), one
// exp2 per element; finally z / tau in place.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "em/adam.h"
#include "em/common.h"
#include "em/cpu_simd.h"
#include "em/em_inf_checks.h"
#include "isa.h"

namespace {

using em::cpu::BFloat16Bits;
using em::cpu::HalfBits;
using em::cpu::kLanes;
using em::cpu::VecF;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Entries per work item: the item's z (16 KiB) stays in L1 from its optimiser pass to its
// statistics pass, and the per-row merge (one exp2 per chunk) is noise next to the chunk's work.
constexpr int64_t kChunk = 4096;
static_assert(kChunk % kLanes == 0, "chunks hold whole vectors");
// Fewest items a thread is handed per step: 16K entries, ~20 us of work, above the cost of a
// parallel region, so that a small row stays on one thread.
constexpr int64_t kItemsPerTask = 4;
// Row mode: a group of rows holds at least this much optimiser state, so that rows of a small
// vocabulary go many to a parallel region; with the group's z it stays in L2/L3 across steps.
constexpr int64_t kGroupStateBytes = int64_t{4} << 20;
// Vectors summed in fp32 lanes before the sums take them in double: a plain fp32 sum over
// V = 151936 terms loses about log2(V) bits, and Adam's update lr * g / (|g| + eps) turns a small
// error in H into a sign flip of the step wherever g = -p (log p + H) nearly cancels.
constexpr int kVectorsPerBlock = 64;

// The storage type of a logits dtype (em/cpu_simd.h converts it exactly).
template <typename scalar_t>
using Storage = std::conditional_t<std::is_same_v<scalar_t, float>, float,
                                   std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>,
                                                      BFloat16Bits, HalfBits>>;

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

// Sums over entries relative to a reference r, in bits: sum = sum_j 2^d_j, weighted =
// sum_j 2^d_j d_j with d_j = (z_j - r) * scale. NaN entries poison both; a -inf entry adds 0.
struct ShiftedSums {
  double sum, weighted;
};

// A chunk's statistics: its max (NaN ignored; -inf when it has no finite entry) and its shifted
// sums relative to that max (to 0 when the max is -inf, so that -inf entries add exactly 0).
struct ChunkPartial {
  float max;
  ShiftedSums sums;
};

// kLanes floats from z[j, len): the missing tail lanes are `fill`.
EM_SIMD_INLINE VecF load_lanes(const float* z, int64_t j, int64_t len, float fill) {
  return j + kLanes <= len ? em::cpu::load<float>(z + j)
                           : em::cpu::load_partial<float>(z + j, static_cast<int>(len - j), fill);
}

EM_SIMD_INLINE void store_lanes(float* z, int64_t j, int64_t len, VecF x) {
  if (j + kLanes <= len) {
    em::cpu::store<float>(z + j, x);
  } else {
    em::cpu::store_partial<float>(z + j, x, static_cast<int>(len - j));
  }
}

// 2^d per lane, d <= 0 or NaN; a masked entry (d = -inf) gives exactly 0.
EM_SIMD_INLINE VecF exp2_lanes(VecF d) {
  return em::cpu::exp2_clamped(em::cpu::clamp_exponent(d, em::kExp2Floor));
}

// Per-lane sqrt: one vector instruction (the build passes -fno-math-errno).
struct VecSqrt {
  EM_SIMD_INLINE VecF operator()(VecF x) const {
    for (int i = 0; i < kLanes; ++i) x[i] = std::sqrt(x[i]);
    return x;
  }
};

EM_SIMD_INLINE ShiftedSums shifted_sums(const float* z, int64_t len, float reference,
                                        float scale) {
  double sum = 0.0, weighted = 0.0;
  for (int64_t block = 0; block < len; block += kVectorsPerBlock * kLanes) {
    const int64_t block_end = std::min<int64_t>(len, block + kVectorsPerBlock * kLanes);
    VecF block_sum = em::cpu::splat(0.0f), block_weighted = em::cpu::splat(0.0f);
    for (int64_t j = block; j < block_end; j += kLanes) {
      const VecF d = em::cpu::clamp_exponent((load_lanes(z, j, len, kNegInf) - reference) * scale,
                                             em::kExp2Floor);
      const VecF e = em::cpu::exp2_clamped(d);
      block_sum += e;
      block_weighted += e * d;
    }
    sum += em::cpu::reduce_sum(block_sum);
    weighted += em::cpu::reduce_sum(block_weighted);
  }
  return {sum, weighted};
}

// Statistics in nats from sums in bits relative to the row max. A row that is all -inf (sum 0)
// gives an entropy NaN, as the reference.
EM_SIMD_INLINE SoftmaxStats stats_from_sums(float max, ShiftedSums sums) {
  const double mean_shift_bits = sums.weighted / sums.sum;
  return {max, static_cast<float>(std::log2(sums.sum) * em::kLn2),
          static_cast<float>(mean_shift_bits * em::kLn2),
          static_cast<float>((std::log2(sums.sum) - mean_shift_bits) * em::kLn2)};
}

EM_SIMD_INLINE ChunkPartial chunk_partial(const float* z, int64_t len, float max) {
  return {max, shifted_sums(z, len, max == kNegInf ? 0.0f : max, em::kLog2e)};
}

// The row's statistics from its chunks' partials, merged in chunk order in double: each chunk's
// sums move from its max m_c to the row max M by s = (m_c - M) log2 e: sum += 2^s sum_c,
// weighted += 2^s (weighted_c + s sum_c). Chunks with nothing finite (sum exactly 0) add nothing.
SoftmaxStats merge_row(const ChunkPartial* partials, int64_t chunks) {
  float max = kNegInf;
  for (int64_t c = 0; c < chunks; ++c) max = std::max(max, partials[c].max);
  ShiftedSums row{0.0, 0.0};
  for (int64_t c = 0; c < chunks; ++c) {
    const ShiftedSums& part = partials[c].sums;
    if (part.sum == 0.0) continue;
    const double shift = (static_cast<double>(partials[c].max) - max) * em::kLog2e;
    const double factor = std::exp2(shift);
    row.sum += factor * part.sum;
    row.weighted += factor * (part.weighted + shift * part.sum);
  }
  return stats_from_sums(max, row);
}

// z[0, len) <- the logits in fp32; returns their max (ignoring NaN).
template <typename T>
EM_SIMD_INLINE float load_chunk(const T* logits, float* z, int64_t len) {
  VecF max = em::cpu::splat(kNegInf);
  for (int64_t j = 0; j < len; j += kLanes) {
    const VecF x = j + kLanes <= len
        ? em::cpu::load<T>(logits + j)
        : em::cpu::load_partial<T>(logits + j, static_cast<int>(len - j), kNegInf);
    store_lanes(z, j, len, x);
    max = em::cpu::max_ignoring_nan(max, x);
  }
  return em::cpu::reduce_max(max);
}

// p = exp((z - max) - log_sum) per lane: one formula for p at every step, p0 included.
EM_SIMD_INLINE VecF probs_lanes(VecF z, const SoftmaxStats& stats) {
  return exp2_lanes(((z - stats.max) - stats.log_sum) * em::kLog2e);
}

// One optimiser step on the chunk (z, m, v, p0) with the row statistics of z; returns the max of
// the new z (ignoring NaN). Step 1 stores p as p0 and starts m and v at 0 without reading them.
EM_SIMD_INLINE float optimizer_chunk(float* z, float* m, float* v, float* p0, int64_t len,
                                     const SoftmaxStats& stats, float kl_scale,
                                     const em::OptimizerStep& step, bool first_step) {
  VecF max = em::cpu::splat(kNegInf);
  for (int64_t j = 0; j < len; j += kLanes) {
    const VecF zj = load_lanes(z, j, len, kNegInf);
    const VecF p = probs_lanes(zj, stats);
    VecF p_initial = p, mj = em::cpu::splat(0.0f), vj = em::cpu::splat(0.0f);
    if (first_step) {
      store_lanes(p0, j, len, p);
    } else {
      p_initial = load_lanes(p0, j, len, 0.0f);
      if (step.adam) {
        mj = load_lanes(m, j, len, 0.0f);
        vj = load_lanes(v, j, len, 0.0f);
      }
    }
    // z - max is -inf for a finite z ~3.4e38 below the max: floored at -FLT_MAX, such an entry
    // (p = 0) adds 0 to its gradient instead of 0 * -inf = NaN. NaN stays NaN.
    const VecF shift = zj - stats.max;
    const VecF log_p_plus_entropy =
        ((shift < -FLT_MAX) ? em::cpu::splat(-FLT_MAX) : shift) - stats.mean_shift;
    VecF grad = -p * log_p_plus_entropy + kl_scale * (p - p_initial);
    grad = (zj - zj == 0.0f) ? grad : em::cpu::splat(0.0f);  // 0 where z is +-inf or NaN
    const VecF updated = zj - em::optimizer_update(step, grad, mj, vj, VecSqrt{});
    store_lanes(z, j, len, updated);
    if (step.adam) {
      store_lanes(m, j, len, mj);
      store_lanes(v, j, len, vj);
    }
    max = em::cpu::max_ignoring_nan(max, updated);
  }
  return em::cpu::reduce_max(max);
}

// A group of rows under optimisation: z is the output itself; p0 (and for Adam m and v) are
// [G, V] buffers; one partial per (row, chunk) holds the statistics of the current z.
struct EmInfGroup {
  float* z;
  float* p0;
  float* m;  // nullptr for SGD, as v
  float* v;
  int64_t rows;
  int64_t vocab;
  int64_t chunks;
  std::vector<ChunkPartial> partials;  // [rows, chunks]
  std::vector<SoftmaxStats> stats;     // [rows]
  std::vector<int64_t> active;         // the rows not yet stopped by the early exit, in order

  void merge_partials() {
    for (const int64_t r : active) stats[r] = merge_row(partials.data() + r * chunks, chunks);
  }

  // Runs item(row, chunk, first entry, length) over every chunk of every active row, in parallel
  // (only active rows' chunks are handed out, so frozen rows leave no thread idle).
  template <typename Item>
  void for_each_chunk(const Item& item) {
    const int64_t items = static_cast<int64_t>(active.size()) * chunks;
    at::parallel_for(0, items, kItemsPerTask, [&](int64_t begin, int64_t end) {
      em::cpu::run_with_widest_isa([&]() EM_ISA_BODY {
        for (int64_t index = begin; index < end; ++index) {
          const int64_t r = active[index / chunks], c = index % chunks;
          const int64_t first = c * kChunk;
          item(r, c, first, std::min(kChunk, vocab - first));
        }
      });
    });
  }
};

// Rows [row0, row0 + G) of logits, optimised together: `steps` steps with the early exit of the
// mode, results in out. state: p0, then m and v for Adam, [G, V] each (unused when steps = 0).
template <typename scalar_t>
void em_inf_group(const at::Tensor& logits, at::Tensor& out, int64_t row0, int64_t group_rows,
                  float* state, int64_t steps, float lr, float kl_scale, float threshold,
                  bool adam, bool batch_exit) {
  using T = Storage<scalar_t>;
  const int64_t V = logits.size(1), row_stride = logits.stride(0);
  const T* in = static_cast<const T*>(logits.const_data_ptr()) + row0 * row_stride;
  EmInfGroup group{out.data_ptr<float>() + row0 * V, nullptr, nullptr, nullptr, group_rows, V,
                   (V + kChunk - 1) / kChunk, {}, {}, {}};
  group.active.resize(group_rows);
  for (int64_t r = 0; r < group_rows; ++r) group.active[r] = r;
  if (steps == 0) {
    group.for_each_chunk([&](int64_t r, int64_t, int64_t first, int64_t len) EM_ISA_BODY {
      load_chunk<T>(in + r * row_stride + first, group.z + r * V + first, len);
    });
    return;
  }
  group.p0 = state;
  if (adam) {
    group.m = state + group_rows * V;
    group.v = state + 2 * group_rows * V;
  }
  group.partials.resize(group_rows * group.chunks);
  group.stats.resize(group_rows);
  group.for_each_chunk([&](int64_t r, int64_t c, int64_t first, int64_t len) EM_ISA_BODY {
    float* z = group.z + r * V + first;
    const float max = load_chunk<T>(in + r * row_stride + first, z, len);
    group.partials[r * group.chunks + c] = chunk_partial(z, len, max);
  });
  group.merge_partials();
  em::OptimizerSchedule schedule(lr, adam);
  for (int64_t t = 1; t <= steps; ++t) {
    if (batch_exit) {
      float entropy_sum = 0.0f;
      for (int64_t r = 0; r < group_rows; ++r) entropy_sum += group.stats[r].entropy;
      if (entropy_sum < threshold) return;
    } else {
      // erase-remove, not std::erase_if: torch before 2.13 builds extensions as C++17.
      group.active.erase(
          std::remove_if(group.active.begin(), group.active.end(),
                         [&](int64_t r) { return group.stats[r].entropy < threshold; }),
          group.active.end());
      if (group.active.empty()) return;
    }
    const em::OptimizerStep step = schedule.next();
    const bool last = t == steps;
    group.for_each_chunk([&](int64_t r, int64_t c, int64_t first, int64_t len) EM_ISA_BODY {
      const int64_t offset = r * V + first;
      float* z = group.z + offset;
      const float max = optimizer_chunk(z, adam ? group.m + offset : nullptr,
                                        adam ? group.v + offset : nullptr, group.p0 + offset,
                                        len, group.stats[r], kl_scale, step, t == 1);
      if (!last) group.partials[r * group.chunks + c] = chunk_partial(z, len, max);
    });
    if (!last) group.merge_partials();
  }
}

template <typename scalar_t>
void em_inf_rows(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                 float kl_scale, float threshold, bool adam, bool batch_exit) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t state_floats_per_entry = adam ? 3 : 1;  // p0, and m and v for Adam
  int64_t group_rows = N;  // batch mode decides for every row at once
  if (!batch_exit) {  // row mode: enough rows to hand every thread kItemsPerTask chunks, and
                      // rows of a small vocabulary many to a group
    const int64_t chunks = (V + kChunk - 1) / kChunk;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t rows_for_threads = (threads * kItemsPerTask + chunks - 1) / chunks;
    const int64_t rows_in_budget = kGroupStateBytes / (4 * state_floats_per_entry * V);
    group_rows = std::min<int64_t>(N, std::max({threads, rows_for_threads, rows_in_budget}));
  }
  const at::Tensor state = at::empty(
      {steps > 0 ? state_floats_per_entry * group_rows * V : 0}, out.options());
  for (int64_t row0 = 0; row0 < N; row0 += group_rows) {
    em_inf_group<scalar_t>(logits, out, row0, std::min(group_rows, N - row0),
                           state.data_ptr<float>(), steps, lr, kl_scale, threshold, adam,
                           batch_exit);
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
    em_inf_rows<decltype(tag)>(logits, out, steps, static_cast<float>(lr), kl_scale,
                               static_cast<float>(threshold), adam, batch_exit);
  });
  return out;
}

// Entropy of softmax(z / tau) for a row z with max `max` (tau > 0): d = (z - max) log2(e) / tau.
EM_SIMD_INLINE float scaled_entropy(const float* z, int64_t V, float max, float tau) {
  const auto [sum, weighted] = shifted_sums(z, V, max, em::kLog2e / tau);
  return static_cast<float>((std::log2(sum) - weighted / sum) * em::kLn2);
}

template <typename scalar_t>
void adaptive_temperature_rows(const at::Tensor& logits, at::Tensor& out, float alpha,
                               float delta, int64_t max_iters, float tol) {
  using T = Storage<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const T* in = static_cast<const T*>(logits.const_data_ptr());
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    em::cpu::run_with_widest_isa([&]() EM_ISA_BODY {
      for (int64_t row = begin; row < end; ++row) {
        float* z = out_ptr + row * V;  // the row in fp32, divided by tau in place at the end
        const float max = load_chunk<T>(in + row * row_stride, z, V);
        const float entropy = scaled_entropy(z, V, max, 1.0f);
        if (!(entropy > delta)) continue;  // already sharp enough (or NaN): tau = 1
        const float target = std::fmax(alpha * entropy, delta);
        float lo = 0.01f, hi = 1.0f, tau = 1.0f;
        for (int64_t it = 0; it < max_iters; ++it) {
          const float mid = (lo + hi) / 2.0f;
          if (mid == tau) break;  // lo and hi have met: every further halving repeats this one
          tau = mid;
          const float h = scaled_entropy(z, V, max, tau);
          if (std::fabs(h - target) < tol) break;
          if (h > target) {
            hi = tau;
          } else {
            lo = tau;
          }
        }
        for (int64_t j = 0; j < V; j += kLanes) store_lanes(z, j, V, load_lanes(z, j, V, 0.0f) / tau);
      }
    });
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
