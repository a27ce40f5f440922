// EM-INF and adaptive temperature for CUDA tensors (ops em_C::em_inf_adjust and
// em_C::adaptive_temperature; semantics: em_kernels/reference.py, em_inf_adjust_ref and
// adaptive_temperature_ref; optimiser: em/adam.h). The kernels and their launchers
// (em_inf_launch.h); the op entry points, which check the arguments, are in em_inf_ops.cpp.
//
// ---- em_inf_adjust: all steps in one cooperative launch -----------------------------------------
//
// Each row is cut into segments of kSegment = 2048 entries. A segment is the unit of the partial
// softmax statistics {max, sum, weighted} (NatsPartial below): one per segment and step, merged
// per row in a fixed order (lanes stride over the segments, then a fixed shuffle tree), so a row's
// statistics, and therefore its result, never depend on the batch size, the grid or the path (the
// per-entry and merge arithmetic is written in explicitly rounded operations, so that both
// placements below round alike: bit-identical rows). Each block owns a contiguous range of
// segments (row-major, a range may span rows) for the whole call.
//
// Step t (1-based), for every segment of the block, with the row statistics (max, log sum,
// mean shift E_p[z - max], H) of the current z, merged from the segment partials that step t - 1
// wrote:
//     p = exp((z - max) - log sum),  g = -p ((z - max) - mean shift) + k (p - p0)  (0 where z is
//     not finite; (z - max) - mean shift = log p + H without the cancellation, see RowStats),
//     Adam/SGD update of (z, m, v),  and the partial statistics of the new z, from registers,
// then one grid-wide barrier (cooperative_groups::this_grid().sync()). Partials are triple
// buffered: the statistics of z0 (kept) and two ping-pong buffers; step t reads one and writes
// the other, and the barrier between steps orders every read of a buffer before its overwrite. A
// frozen row (row mode: H < threshold before a step) carries its partial forward and never
// changes again. In batch mode every block merges every row and sums the entropies in the same
// fixed order, so all blocks take the same decision and leave the loop at the same step (no block
// ever waits on a barrier that the others skipped). `steps` barriers per call in all.
//
// Two placements of the state (z, m, v, p0), chosen per call by `plan_em_inf_launch`:
// - on chip (few rows, decode): the block's segments live in shared memory as float4 {z, m, v, p0},
//   16 bytes per entry, with the fewest segments per block that lets the whole batch be
//   co-resident (batch 1 at V = 151936: 75 blocks of one segment; up to about 12 such rows on an
//   H100/H200). HBM traffic: z0 read once, z written once; between steps only the partials (12
//   bytes per segment) move, through L2.
// - replay (many rows): nothing per entry is stored between steps. Given the per-row statistics
//   of steps 1 .. t - 1 (a [steps + 1, N] history, written by the block that owns the row's first
//   segment), an entry's z, m and v after t steps are a pure function of its z0, so step t
//   re-reads z0 and replays t updates in registers; a final pass replays all the steps taken and
//   writes z. Bytes per entry (z0 of b bytes, 2 for bf16): (steps + 1) b read + 4 written, 16 at
//   bf16 and 5 steps: 0.16 GB for [64, 151936], which also fits in the 50 MB L2 after the first
//   read; storing z, m, v between steps would move ~112. The price is steps^2 / 2 updates per
//   entry (3 MUFU ops each): ~15 at 5 steps, compute-bound but under the stored design's HBM time
//   up to ~10-15 steps.
//
// ---- adaptive_temperature: one block per row --------------------------------------------------
//
// One pass for the row max, one for H(z), then one pass per bisection iteration for H(z / tau)
// (the max of z / tau is max / tau: tau > 0), each pass re-reading the row from L2 (a V = 151936
// bf16 row is 0.3 MB; a batch of rows fits the 50 MB L2). Typical runs need 5 to 10 iterations at
// tol 0.01. The output z / tau is one more pass, correctly rounded like the reference's division.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <mutex>

#include "em/adam.h"
#include "em/em_inf_checks.h"
#include "em_inf_launch.h"
#include "em/common.h"

namespace {

namespace cg = cooperative_groups;

// 16 warps per block; at the step kernels' 59-64 registers a thread (sm_90a), 2 blocks fit an
// SM's register file (the launch plan asks the occupancy API, so this is not assumed anywhere).
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kEntriesPerThread = 4;  // per segment, held in registers from the update to the stats
// The unit of partial statistics. Fixed (not derived from N or the grid) so that every row is
// reduced in the same order whatever the batch: batch invariance, bit for bit.
constexpr int kSegment = kThreads * kEntriesPerThread;
// At most 8 segments (256 KB of {z, m, v, p0}) per block: more than any GPU's shared memory.
constexpr int kMaxSegmentsOnChip = 8;
constexpr int kMaxDevices = 64;

constexpr int kAdaptiveThreads = 1024;  // one block per row: as many loads in flight as possible
constexpr int kAdaptiveWarps = kAdaptiveThreads / 32;

// Softmax statistics of a part of a row, as em/softmax_stats.h's SoftmaxPartial but with the max
// kept in nats: d_j = (z_j - max) * log2(e) subtracts before it scales, so that the top entries
// of a row with large logits keep their exact shift. (Scaling first, u_j = z_j * log2(e), rounds
// u_j to 4e-6 at |z| = 40: enough to swamp log p + H ~ 1e-9 at the top entry of a peaked row,
// where Adam's normalised step lr * g / (|g| + eps) turns it into an error of lr.)
//   max = max_j z_j,  sum = sum_j 2^d_j,  weighted = sum_j 2^d_j d_j   (bits)
struct NatsPartial {
  float max;
  float sum;
  float weighted;
};

// What one optimiser step needs of a row: p_j = exp((z_j - max) - log_sum), and the entropy
// gradient's factor log p_j + H = (z_j - max) - mean_shift, mean_shift = E_p[z - max] (no log:
// formed as log p and H separately, each ~log V, their sum has ~1e-7 absolute error where it
// should be ~0, and Adam's normalised step lr * g / (|g| + eps) turns that into an error of lr on
// near-uniform rows; this form errs relative to |z_j - max| and |mean_shift| instead).
struct RowStats {
  float max;
  float log_sum;     // nats
  float mean_shift;  // sum_j p_j (z_j - max), nats (<= 0)
  float entropy;     // log_sum - mean_shift, nats: the early-exit test only
};

// Bit-identical results on both placements: every per-entry and merge formula below is written
// with explicitly rounded operations (__fadd_rn, __fmul_rn, __fmaf_rn: nvcc never contracts or
// reorders them) and one exp2, the same instruction whatever the nvcc flags. Otherwise nvcc
// contracts a * b + c differently where the same function is inlined into different loops.

// 2^d by the ex2.approx instruction (about 2 ulp), without flush-to-zero; 2^-inf = 0.
__device__ __forceinline__ float exp2_approx(float d) {
  float e;
  asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(d));
  return e;
}

__device__ __forceinline__ NatsPartial empty_partial() { return {-INFINITY, 0.0f, 0.0f}; }

// Empty: no unmasked entry. A part that saw only NaN has max -inf but sum NaN, and is not empty.
__device__ __forceinline__ bool is_empty(const NatsPartial& a) {
  return a.max == -INFINITY && a.sum == 0.0f;
}

// The union of two disjoint parts; commutative bitwise, so a fixed merge tree is deterministic.
__device__ __forceinline__ NatsPartial merge(const NatsPartial& a, const NatsPartial& b) {
  if (is_empty(a)) return b;
  if (is_empty(b)) return a;
  const float max = fmaxf(a.max, b.max);  // a NaN max loses here but its NaN sum carries on
  const float da = __fmul_rn(__fsub_rn(a.max, max), em::kLog2e);
  const float db = __fmul_rn(__fsub_rn(b.max, max), em::kLog2e);
  // The part that holds the max keeps its sums exactly (no 2^0 through the approximation), so an
  // all-masked part merges alike whether masked with -inf (empty) or with finfo(float32).min.
  const float sa = a.max == max ? 1.0f : exp2_approx(da);
  const float sb = b.max == max ? 1.0f : exp2_approx(db);
  // The shifts are floored where they multiply a sum: a part masked with finfo(float32).min sits
  // ~3e38 below the other, sum * shift overflows to -inf and its weight 0 would make NaN of it.
  return {max, __fmaf_rn(a.sum, sa, __fmul_rn(b.sum, sb)),
          __fmaf_rn(sa, __fmaf_rn(a.sum, fmaxf(da, em::kExp2Floor), a.weighted),
                    __fmul_rn(sb, __fmaf_rn(b.sum, fmaxf(db, em::kExp2Floor), b.weighted)))};
}

// A whole row: all -inf gives sum 0, so log_sum -inf and mean_shift, entropy NaN (0 / 0), like
// the reference. In double, each result rounded once to fp32 (as the CPU kernel): an fp32
// finalize (log2f, W / s and * ln 2 each rounded, approximately under fast math) is what the
// gradient's cancellation magnifies (RowStats).
__device__ __forceinline__ RowStats finalize(const NatsPartial& a) {
  const double sum = a.sum;
  const double log2_sum = log2(sum);
  const double mean_shift_bits = static_cast<double>(a.weighted) / sum;
  constexpr double kLn2Double = 0.6931471805599453;
  return {a.max, static_cast<float>(log2_sum * kLn2Double),
          static_cast<float>(mean_shift_bits * kLn2Double),
          static_cast<float>((log2_sum - mean_shift_bits) * kLn2Double)};
}

struct EmInfParams {
  const void* logits;       // [N, V] of scalar_t, row stride row_stride
  int64_t row_stride;
  float* out;               // [N, V] fp32, contiguous
  NatsPartial* partials;    // [3, N * segments_per_row]: z0, then two ping-pong buffers
  RowStats* history;        // replay path: [steps + 1, N], the statistics each step used
  int64_t rows;
  int64_t vocab;
  int64_t segments_per_row;
  int64_t segments_per_block;
  int steps;
  float lr;
  float kl_scale;           // kl_weight, or kl_weight / N in batch mode
  float threshold;
  bool adam;
  bool batch_exit;
};

// Data written by other blocks earlier in this launch: read through L2 (ld.global.cg), never
// from a possibly stale L1 line.
__device__ __forceinline__ NatsPartial load_partial(const NatsPartial* p) {
  return {__ldcg(&p->max), __ldcg(&p->sum), __ldcg(&p->weighted)};
}

__device__ __forceinline__ void store_partial(NatsPartial* p, const NatsPartial& v) {
  __stcg(&p->max, v.max);
  __stcg(&p->sum, v.sum);
  __stcg(&p->weighted, v.weighted);
}

__device__ __forceinline__ RowStats load_history(const RowStats* h) {
  return {__ldcg(&h->max), __ldcg(&h->log_sum), __ldcg(&h->mean_shift), __ldcg(&h->entropy)};
}

// Fixed shuffle tree over the 32 lanes; the result is in lane 0.
__device__ __forceinline__ NatsPartial warp_merge(NatsPartial p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const NatsPartial other{__shfl_down_sync(0xffffffffu, p.max, offset),
                            __shfl_down_sync(0xffffffffu, p.sum, offset),
                            __shfl_down_sync(0xffffffffu, p.weighted, offset)};
    p = merge(p, other);
  }
  return p;
}

// Merge over the block (fixed tree); the result is in thread 0. Every thread must call it.
__device__ __forceinline__ NatsPartial block_merge(NatsPartial p, NatsPartial* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_merge(p);
  if (lane == 0) scratch[warp] = p;
  __syncthreads();
  NatsPartial total = empty_partial();
  if (warp == 0) total = warp_merge(lane < kWarps ? scratch[lane] : empty_partial());
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// The row statistics from its segment partials, computed by one warp (result in lane 0). Never
// inlined: every block runs this very code on the same data, so every block of a row gets the
// same bits, and the per-row freeze decisions agree across the grid.
__device__ __noinline__ RowStats warp_row_statistics(const NatsPartial* row_partials,
                                                     int64_t segments) {
  NatsPartial acc = empty_partial();
  for (int64_t i = threadIdx.x & 31; i < segments; i += 32)
    acc = merge(acc, load_partial(row_partials + i));
  return finalize(warp_merge(acc));
}

// warp_row_statistics broadcast to the whole block. Every thread must call it.
__device__ __forceinline__ RowStats block_row_statistics(const NatsPartial* row_partials,
                                                         int64_t segments, RowStats* broadcast) {
  if (threadIdx.x < 32) {
    const RowStats stats = warp_row_statistics(row_partials, segments);
    if (threadIdx.x == 0) *broadcast = stats;
  }
  __syncthreads();
  const RowStats stats = *broadcast;
  __syncthreads();
  return stats;
}

// Sum of the entropies of all rows, in a fixed order (warp w takes rows w, w + kWarps, ...; the
// warps' sums are added in warp order), the same in every block. Every thread must call it.
__device__ float batch_entropy_sum(const NatsPartial* partials, int64_t rows, int64_t segments,
                                   float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float sum = 0.0f;
  for (int64_t row = warp; row < rows; row += kWarps)
    sum += warp_row_statistics(partials + row * segments, segments).entropy;
  if (lane == 0) scratch[warp] = sum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Partial statistics of this thread's entries of a segment (fp32 logits; -inf for padding).
__device__ __forceinline__ NatsPartial thread_partial(const float (&z)[kEntriesPerThread]) {
  float max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kEntriesPerThread; ++i)
    max = (z[i] > max || isnan(z[i])) ? z[i] : max;  // a NaN entry poisons the partial
  if (max == -INFINITY) return empty_partial();
  float sum = 0.0f, weighted = 0.0f;
#pragma unroll
  for (int i = 0; i < kEntriesPerThread; ++i) {
    const float d = __fmul_rn(__fsub_rn(z[i], max), em::kLog2e);
    const float e = exp2_approx(d);  // masked: 2^-inf = 0 ...
    sum = __fadd_rn(sum, e);
    weighted = __fmaf_rn(e, fmaxf(d, em::kExp2Floor), weighted);  // ... and 0 * floor = 0
  }
  return {max, sum, weighted};
}

// log p = (z - max) - log_sum: the roundings of torch.log_softmax.
__device__ __forceinline__ float log_probability(float z, const RowStats& stats) {
  return __fsub_rn(__fsub_rn(z, stats.max), stats.log_sum);
}

__device__ __forceinline__ float probability(float z, const RowStats& stats) {
  return exp2_approx(__fmul_rn(log_probability(z, stats), em::kLog2e));
}

// One optimiser step of one entry: returns the new z, advances (m, v). The gradient
// g = -p (log p + H) + k (p - p0) with log p + H = (z - max) - mean_shift (RowStats); p is
// `probability`, the very code that made p0, so p - p0 is exactly 0 at step 1.
__device__ __forceinline__ float em_inf_update(float z, float p0, const RowStats& stats,
                                               const em::OptimizerStep& step, float kl_scale,
                                               float& m, float& v) {
  const float prob = probability(z, stats);
  // z - max is -inf for a finite z ~3.4e38 below the max: floored at -FLT_MAX, such an entry
  // (p = 0) adds 0 to its gradient instead of 0 * -inf = NaN. NaN stays NaN.
  const float shift = __fsub_rn(z, stats.max);
  const float log_p_plus_entropy =
      __fsub_rn(shift < -FLT_MAX ? -FLT_MAX : shift, stats.mean_shift);
  const float grad =
      isfinite(z) ? __fmaf_rn(kl_scale, __fsub_rn(prob, p0),
                              __fmul_rn(-prob, log_p_plus_entropy))
                  : 0.0f;
  return __fsub_rn(z, em::optimizer_update_rn(step, grad, m, v));
}

template <typename scalar_t>
__device__ __forceinline__ float load_logit(const scalar_t* logits, int64_t index) {
  return static_cast<float>(logits[index]);
}

// Which partial buffer holds the statistics that step t (1-based) reads; step t writes t + 1's.
__device__ __forceinline__ int partial_buffer(int t) { return t == 1 ? 0 : 1 + (t & 1); }

// Replay path: this thread's entries of segment `col0` of `row` after `upto` steps, recomputed
// from z0 with the statistics of steps 1 .. upto - 1 from the history and `last` for step upto.
// With stop_when_frozen (the final pass), a row stops at its first step below the threshold.
template <typename scalar_t>
__device__ __forceinline__ void replay_entries(const EmInfParams& p, int64_t row, int64_t col0,
                                               int upto, const RowStats& first,
                                               const RowStats& last, bool stop_when_frozen,
                                               float (&z)[kEntriesPerThread]) {
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  float p0[kEntriesPerThread], m[kEntriesPerThread], v[kEntriesPerThread];
#pragma unroll
  for (int i = 0; i < kEntriesPerThread; ++i) {
    const int64_t col = col0 + i * kThreads + threadIdx.x;
    z[i] = col < p.vocab ? load_logit(logits, row * p.row_stride + col) : -INFINITY;
    p0[i] = probability(z[i], first);
    m[i] = 0.0f;
    v[i] = 0.0f;
  }
  em::OptimizerSchedule schedule(p.lr, p.adam);
  for (int s = 1; s <= upto; ++s) {
    const RowStats stats = s == upto ? last : load_history(p.history + s * p.rows + row);
    if (stop_when_frozen && !p.batch_exit && stats.entropy < p.threshold) break;
    const em::OptimizerStep step = schedule.next();
#pragma unroll
    for (int i = 0; i < kEntriesPerThread; ++i)
      z[i] = em_inf_update(z[i], p0[i], stats, step, p.kl_scale, m[i], v[i]);
  }
}

// The whole EM-INF call; see the top of the file. ON_CHIP selects where (z, m, v, p0) live.
template <typename scalar_t, bool ON_CHIP>
__global__ void __launch_bounds__(kThreads) em_inf_adjust_kernel(EmInfParams p) {
  extern __shared__ float4 on_chip_state[];  // ON_CHIP: {z, m, v, p0} per entry of the block
  __shared__ NatsPartial merge_scratch[kWarps];
  __shared__ RowStats row_broadcast;
  __shared__ float entropy_scratch[kWarps];
  cg::grid_group grid = cg::this_grid();

  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t V = p.vocab, S = p.segments_per_row;
  const int64_t total_segments = p.rows * S;
  const int64_t seg_begin =
      min(total_segments, static_cast<int64_t>(blockIdx.x) * p.segments_per_block);
  const int64_t seg_end = min(total_segments, seg_begin + p.segments_per_block);
  const int64_t owned = seg_end - seg_begin;
  const int tid = threadIdx.x;

  // Statistics of z0, per segment; on chip, z0 also goes to shared memory.
  for (int64_t k = 0; k < owned; ++k) {
    const int64_t g = seg_begin + k, row = g / S, col0 = (g - row * S) * kSegment;
    float z[kEntriesPerThread];
#pragma unroll
    for (int i = 0; i < kEntriesPerThread; ++i) {
      const int64_t col = col0 + i * kThreads + tid;
      z[i] = col < V ? load_logit(logits, row * p.row_stride + col) : -INFINITY;
      if constexpr (ON_CHIP)
        on_chip_state[k * kSegment + i * kThreads + tid] = make_float4(z[i], 0.0f, 0.0f, 0.0f);
    }
    const NatsPartial part = block_merge(thread_partial(z), merge_scratch);
    if (tid == 0) store_partial(p.partials + g, part);
  }
  grid.sync();

  em::OptimizerSchedule schedule(p.lr, p.adam);  // the on-chip path's steps
  int applied = 0;  // steps taken (by the rows that did not freeze earlier)
  for (int t = 1; t <= p.steps; ++t) {
    const NatsPartial* current = p.partials + partial_buffer(t) * total_segments;
    NatsPartial* next = p.partials + partial_buffer(t + 1) * total_segments;
    if (p.batch_exit && batch_entropy_sum(current, p.rows, S, entropy_scratch) < p.threshold)
      break;  // the same decision in every block
    const bool last = t == p.steps;
    applied = t;
    if (!ON_CHIP && last) break;  // the replay path's final pass below takes the last step
    const em::OptimizerStep step = schedule.next();
    int64_t cached_row = -1;
    RowStats stats{}, first{};
    for (int64_t k = 0; k < owned; ++k) {
      const int64_t g = seg_begin + k, row = g / S, col0 = (g - row * S) * kSegment;
      if (row != cached_row) {  // uniform over the block
        stats = block_row_statistics(current + row * S, S, &row_broadcast);
        if constexpr (!ON_CHIP) {
          if (tid == 0 && g == row * S) p.history[t * p.rows + row] = stats;
          first = t == 1 ? stats : load_history(p.history + p.rows + row);
        }
        cached_row = row;
      }
      if (!p.batch_exit && stats.entropy < p.threshold) {  // frozen for good: carry the partial
        if (!last && tid == 0) store_partial(next + g, load_partial(current + g));
        continue;
      }
      float z_new[kEntriesPerThread];
      if constexpr (ON_CHIP) {
#pragma unroll
        for (int i = 0; i < kEntriesPerThread; ++i) {
          const int slot = static_cast<int>(k) * kSegment + i * kThreads + tid;
          const float4 state = on_chip_state[slot];
          float m = state.y, v = state.z;
          const float p0 = t == 1 ? probability(state.x, stats) : state.w;
          const float updated = em_inf_update(state.x, p0, stats, step, p.kl_scale, m, v);
          on_chip_state[slot] = make_float4(updated, m, v, p0);
          z_new[i] = col0 + i * kThreads + tid < V ? updated : -INFINITY;
        }
      } else {
        replay_entries<scalar_t>(p, row, col0, t, first, stats, false, z_new);
      }
      if (!last) {
        const NatsPartial part = block_merge(thread_partial(z_new), merge_scratch);
        if (tid == 0) store_partial(next + g, part);
      }
    }
    if (!last) grid.sync();
  }

  // The output: from shared memory, or replayed from z0 through the `applied` steps.
  int64_t cached_row = -1;
  RowStats final_stats{}, first{};
  for (int64_t k = 0; k < owned; ++k) {
    const int64_t g = seg_begin + k, row = g / S, col0 = (g - row * S) * kSegment;
    float z[kEntriesPerThread];
    if constexpr (ON_CHIP) {
#pragma unroll
      for (int i = 0; i < kEntriesPerThread; ++i)
        z[i] = on_chip_state[k * kSegment + i * kThreads + tid].x;
    } else {
      if (row != cached_row && applied > 0) {  // uniform over the block
        final_stats = block_row_statistics(
            p.partials + partial_buffer(applied) * total_segments + row * S, S, &row_broadcast);
        first = applied == 1 ? final_stats : load_history(p.history + p.rows + row);
        cached_row = row;
      }
      replay_entries<scalar_t>(p, row, col0, applied, first, final_stats, true, z);
    }
#pragma unroll
    for (int i = 0; i < kEntriesPerThread; ++i) {
      const int64_t col = col0 + i * kThreads + tid;
      if (col < V) p.out[row * V + col] = z[i];
    }
  }
}

// What the launch plan needs to know about a device, queried once per device and dtype (host
// queries on every call would add microseconds to every decode step).
struct EmInfDeviceInfo {
  int sms;
  int on_chip_blocks_per_sm[kMaxSegmentsOnChip + 1];  // by segments per block; 0: does not fit
  int replay_blocks_per_sm;
};

template <typename scalar_t>
const EmInfDeviceInfo& em_inf_device_info(int device) {
  static std::once_flag once[kMaxDevices];
  static EmInfDeviceInfo info[kMaxDevices];
  std::call_once(once[device], [device] {
    EmInfDeviceInfo& d = info[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    int max_smem = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const auto on_chip = em_inf_adjust_kernel<scalar_t, true>;
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, on_chip));
    const int max_dynamic = max_smem - static_cast<int>(attributes.sharedSizeBytes);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(on_chip, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic));
    d.on_chip_blocks_per_sm[0] = 0;
    for (int per_block = 1; per_block <= kMaxSegmentsOnChip; ++per_block) {
      const size_t smem = static_cast<size_t>(per_block) * kSegment * sizeof(float4);
      int blocks = 0;
      if (smem <= static_cast<size_t>(max_dynamic))
        C10_CUDA_CHECK(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, on_chip, kThreads, smem));
      d.on_chip_blocks_per_sm[per_block] = blocks;
    }
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &d.replay_blocks_per_sm, em_inf_adjust_kernel<scalar_t, false>, kThreads, 0));
  });
  return info[device];
}

struct EmInfLaunch {
  bool on_chip;
  int64_t grid;
  int64_t segments_per_block;
  size_t smem;
};

// On chip with the fewest segments per block that lets every segment of the batch be
// co-resident (the most blocks, the most SMs); otherwise a replay grid of every co-resident
// block, each owning a contiguous range of segments.
template <typename scalar_t>
EmInfLaunch plan_em_inf_launch(int device, int64_t total_segments) {
  const EmInfDeviceInfo& d = em_inf_device_info<scalar_t>(device);
  for (int per_block = 1; per_block <= kMaxSegmentsOnChip; ++per_block) {
    const int64_t grid = (total_segments + per_block - 1) / per_block;
    if (grid <= static_cast<int64_t>(d.on_chip_blocks_per_sm[per_block]) * d.sms)
      return {true, grid, per_block, static_cast<size_t>(per_block) * kSegment * sizeof(float4)};
  }
  TORCH_CHECK(d.replay_blocks_per_sm > 0, "em_inf_adjust: the kernel cannot run on this device");
  const int64_t capacity = static_cast<int64_t>(d.replay_blocks_per_sm) * d.sms;
  const int64_t per_block = (total_segments + capacity - 1) / capacity;
  return {false, (total_segments + per_block - 1) / per_block, per_block, 0};
}

template <typename scalar_t>
void launch_em_inf(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                   float kl_scale, float threshold, bool adam, bool batch_exit) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t S = (V + kSegment - 1) / kSegment;
  const int device = logits.get_device();
  TORCH_CHECK(device < kMaxDevices, "em_inf_adjust: device index ", device, " >= ", kMaxDevices);
  const EmInfLaunch plan = plan_em_inf_launch<scalar_t>(device, N * S);
  // 3 buffers of N * S partials (3 floats each), then (replay path) the [steps + 1, N] history.
  constexpr int64_t kPartialFloats = sizeof(NatsPartial) / sizeof(float);
  constexpr int64_t kRowStatsFloats = sizeof(RowStats) / sizeof(float);
  const int64_t partial_floats = 3 * N * S * kPartialFloats;
  const int64_t history_floats = plan.on_chip ? 0 : (steps + 1) * N * kRowStatsFloats;
  at::Tensor workspace = at::empty({partial_floats + history_floats}, out.options());
  float* base = workspace.data_ptr<float>();
  EmInfParams params;
  params.logits = logits.const_data_ptr();
  params.row_stride = logits.stride(0);
  params.out = out.data_ptr<float>();
  params.partials = reinterpret_cast<NatsPartial*>(base);
  params.history = plan.on_chip ? nullptr : reinterpret_cast<RowStats*>(base + partial_floats);
  params.rows = N;
  params.vocab = V;
  params.segments_per_row = S;
  params.segments_per_block = plan.segments_per_block;
  params.steps = static_cast<int>(steps);
  params.lr = lr;
  params.kl_scale = kl_scale;
  params.threshold = threshold;
  params.adam = adam;
  params.batch_exit = batch_exit;
  void* args[] = {&params};
  const auto kernel = plan.on_chip ? em_inf_adjust_kernel<scalar_t, true>
                                   : em_inf_adjust_kernel<scalar_t, false>;
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                             dim3(static_cast<unsigned>(plan.grid)), dim3(kThreads),
                                             args, plan.smem, c10::cuda::getCurrentCUDAStream()));
}

// ---- adaptive temperature ----------------------------------------------------------------------

// Block-wide reductions in a fixed tree; every thread gets the result. Every thread must call.
__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xffffffffu, x, offset);
    x = (other > x || isnan(other)) ? other : x;
  }
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kAdaptiveWarps; ++w)
    total = (scratch[w] > total || isnan(scratch[w])) ? scratch[w] : total;
  __syncthreads();
  return total;
}

__device__ __forceinline__ float2 block_sum2(float2 x, float2* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x.x += __shfl_down_sync(0xffffffffu, x.x, offset);
    x.y += __shfl_down_sync(0xffffffffu, x.y, offset);
  }
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float2 total = scratch[0];
  for (int w = 1; w < kAdaptiveWarps; ++w) {
    total.x += scratch[w].x;
    total.y += scratch[w].y;
  }
  __syncthreads();
  return total;
}

// H(softmax(z * inv_tau)) of a row whose max is max_logit, in nats. d = (z - max) log2(e) / tau:
// subtract first (exact near the max), then scale.
template <typename scalar_t>
__device__ float scaled_row_entropy(const scalar_t* row, int64_t V, float max_logit,
                                    float inv_tau, float2* scratch) {
  const float scale = em::kLog2e * inv_tau;
  float2 acc = make_float2(0.0f, 0.0f);  // {sum 2^d, sum 2^d d}
  for (int64_t j = threadIdx.x; j < V; j += kAdaptiveThreads) {
    const float d = (load_logit(row, j) - max_logit) * scale;
    const float e = exp2_approx(d);  // masked: 2^-inf = 0 ...
    acc.x += e;
    acc.y += e * fmaxf(d, em::kExp2Floor);  // ... and 0 * floor = 0
  }
  const float2 total = block_sum2(acc, scratch);
  return (log2f(total.x) - total.y / total.x) * em::kLn2;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kAdaptiveThreads) adaptive_temperature_kernel(
    const scalar_t* logits, int64_t row_stride, float* out, int64_t V, float alpha, float delta,
    int64_t max_iters, float tol) {
  __shared__ float max_scratch[kAdaptiveWarps];
  __shared__ float2 sum_scratch[kAdaptiveWarps];
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + row_index * row_stride;
  float thread_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kAdaptiveThreads) {
    const float z = load_logit(row, j);
    thread_max = (z > thread_max || isnan(z)) ? z : thread_max;
  }
  const float max_logit = block_max(thread_max, max_scratch);
  float tau = 1.0f;
  // A row that is all -inf (or has a NaN / +inf) has a NaN entropy and keeps tau = 1.
  const float entropy = max_logit == -INFINITY
      ? NAN : scaled_row_entropy(row, V, max_logit, 1.0f, sum_scratch);
  if (entropy > delta) {  // uniform over the block
    const float target = fmaxf(alpha * entropy, delta);
    float lo = 0.01f, hi = 1.0f;
    for (int64_t it = 0; it < max_iters; ++it) {
      const float mid = (lo + hi) / 2.0f;
      if (mid == tau) break;  // lo and hi have met: every further halving repeats this one
      tau = mid;
      const float h = scaled_row_entropy(row, V, max_logit, 1.0f / tau, sum_scratch);
      if (fabsf(h - target) < tol) break;
      if (h > target) {
        hi = tau;
      } else {
        lo = tau;
      }
    }
  }
  float* out_row = out + row_index * V;
  for (int64_t j = threadIdx.x; j < V; j += kAdaptiveThreads)
    out_row[j] = __fdiv_rn(load_logit(row, j), tau);
}

template <typename scalar_t>
void launch_adaptive_temperature_typed(const at::Tensor& logits, at::Tensor& out, float alpha,
                                       float delta, int64_t max_iters, float tol) {
  adaptive_temperature_kernel<scalar_t>
      <<<static_cast<unsigned>(logits.size(0)), kAdaptiveThreads, 0,
         c10::cuda::getCurrentCUDAStream()>>>(
          static_cast<const scalar_t*>(logits.const_data_ptr()), logits.stride(0),
          out.data_ptr<float>(), logits.size(1), alpha, delta, max_iters, tol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace em::cuda {

void launch_em_inf_adjust(const at::Tensor& logits, at::Tensor& out, int64_t steps, float lr,
                          float kl_scale, float threshold, bool adam, bool batch_exit) {
  em::dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    launch_em_inf<decltype(tag)>(logits, out, steps, lr, kl_scale, threshold, adam, batch_exit);
  });
}

void launch_adaptive_temperature(const at::Tensor& logits, at::Tensor& out, float alpha,
                                 float delta, int64_t max_iters, float tol) {
  em::dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    launch_adaptive_temperature_typed<decltype(tag)>(logits, out, alpha, delta, max_iters, tol);
  });
}

}  // namespace em::cuda
