// CUDA kernels of em_C::softmax_stats_fwd and em_C::softmax_stats_bwd (the row math is
// em/softmax_stats.h, shared with the CPU kernels).
//
// How a row is split: the vocabulary is cut into `splits` chunks of `chunk` entries, both
// functions of V only (split_vocab), and one block of kThreads threads handles one (row, chunk)
// item; the grid is the flat list of items (rows * splits < 2^31). A small batch still fills the
// GPU (V = 151936 gives 10 blocks per row), and since neither the split nor the merge order
// depends on N, a row's bits never depend on the other rows (batch invariance); no atomics
// (determinism).
//
// Loads: each thread reads 16-byte vectors (4 fp32 or 8 bf16/fp16 values), kUnroll of them in
// flight before any math. Offsets into the logits are 64-bit (N * V passes 2^31).
//
// Batch invariance also needs a row's summation order to be independent of its address: with
// V % 8 != 0 (bf16), row r of a contiguous batch starts (r * V) % 8 entries past a 16-byte
// boundary, so the same row moved to another position would otherwise be cut into vectors
// differently. The forward therefore assigns entries to threads by their index in the chunk
// (with W = 16 / sizeof(T) entries a vector, thread t: entries [W v, W v + W) of the chunk for
// v = t, t + 256, ..., then entry W * (len / W) + t of the tail) and, when the chunk start is
// misaligned, builds each such vector from the two aligned 16-byte loads that straddle it
// (`realign`; those loads reach at most 14 bytes before the chunk or past the row, always within
// a 16-byte block that holds one of its entries, so never outside the allocation). The backward
// is elementwise, so its bits never depend on the layout: it keeps aligned vectors and a scalar
// head and tail of at most 2 * (16 / sizeof(T) - 1) entries, one per thread.
//
// Forward, _fwd_kernel: per thread, online (max, sum, weighted) in bits over its vectors; the max
// is checked once per vector and the sums rescaled (one extra exp2) only when it grows. Per entry:
// one subtract and one multiply ((z - max) * log2(e)/T: see em/softmax_stats.h), one exp2
// (exp2_flush: one ex2.approx.ftz instruction), one add, one max, one FMA.
// Threads merge by warp shuffles, warps through shared memory. With one chunk per row the block
// writes the row's results; otherwise it writes its partial (12 bytes) and _merge_kernel, one
// thread per row, merges the row's partials in chunk order.
// Traffic: N * V * sizeof(T) read; 12 bytes per item + 12 (16 with tokens) bytes per row written.
//
// Backward, _bwd_kernel: dz_j = p_j (c0 + c1 d_j) / T + [j == y] gL / T with d_j = log2 p_j, from
// the saved (entropy, lse), lse in double: per row, a center c and an offset r in double (see
// em/softmax_stats.h); per entry: one subtract and one FMA ((z - c) log2(e)/T - r), one exp2, one
// max, one FMA, two multiplies and the conversion. Traffic: one read of the logits, one write
// of the gradient (vectorised when the logits and gradient rows share their 16-byte misalignment,
// as contiguous inputs do; otherwise a coalesced scalar loop).
//
// Launches go on the current stream; nothing syncs with the host.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "em/op_checks.h"
#include "em/realign.h"
#include "em/softmax_stats.h"

namespace em::cuda {
namespace {

// 8 warps per block: enough threads to keep kUnroll * 4 KiB of loads in flight per block, few
// enough that the end-of-block merge (5 shuffle rounds + 3 across warps) stays cheap.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte loads issued per thread before any math: 16 KiB in flight per block.
constexpr int kUnroll = 4;
// Vocabulary entries per block: ~30 KiB of bf16, ~2 unrolled rounds of loads per thread; V =
// 151936 gives 10 blocks per row, so 64 rows already make 640 blocks (~5 per SM on an H200).
constexpr int64_t kChunkTarget = 16384;
// Chunk lengths are multiples of 16 entries, so every chunk of a row has the row's own 16-byte
// misalignment for every dtype.
constexpr int64_t kChunkAlign = 16;
// Rows per block of the merge kernel (one thread per row).
constexpr int kMergeThreads = 128;

constexpr unsigned kFullMask = 0xffffffffu;

struct VocabSplit {
  int chunk;   // entries per item (the last item of a row may have fewer)
  int splits;  // items per row
};

VocabSplit split_vocab(int64_t vocab) {
  const int64_t target_splits = (vocab + kChunkTarget - 1) / kChunkTarget;
  int64_t chunk = (vocab + target_splits - 1) / target_splits;
  chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  return {static_cast<int>(chunk), static_cast<int>((vocab + chunk - 1) / chunk)};
}

// ---- arithmetic -------------------------------------------------------------------------------

// 2^d by the hardware approximation (a few ulp), the one exp2 per entry of the backward. Not the
// .ftz form: the build keeps subnormals (-ftz=false), and so does this, so p_j in [2^-149, 2^-126)
// is not flushed (bf16 gradients have those subnormals). 2^-inf = +0, NaN stays NaN. The price:
// ptxas wraps the MUFU.EX2 in a range test, a pre-scale and a squaring (5 instructions, sm_90a).
__device__ __forceinline__ float exp2_approx(float d) {
  float e;
  asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(d));
  return e;
}

// 2^d as one MUFU.EX2, flushing results below 2^-126 (and subnormal d) to 0: the forward's exp2.
// There every term is relative to a max whose own term is 2^0 = 1, so a thread's sum is >= 1 and
// anything flushed (< 2^-126 each, < 2^-108 in all) is far below half an ulp of it: the sum is
// bitwise the same. The weighted sum loses terms below 149 * 2^-126 each, so the entropy moves by
// at most ~V * 1e-36 nats. That is the exp2 our Triton forward has always used (tl.exp2 lowers to
// ex2.approx.ftz.f32), and the run-A build with --use_fast_math reached 0.697 ms against 0.843 ms
// without it (bench/RESULTS.md) on this exp2 and global flushing together.
__device__ __forceinline__ float exp2_flush(float d) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(d));
  return e;
}

// ---- element conversions ----------------------------------------------------------------------

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
constexpr int kVecSize = 16 / sizeof(T);  // entries per 16-byte vector

// 16 bytes -> kVecSize<T> floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kVecSize<T>]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = __uint_as_float(words[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      out[2 * i] = __uint_as_float(words[i] << 16);  // bf16 is the top half of a float
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    } else {
      const float2 pair = __half22float2(bit_cast<__half2>(words[i]));
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
}

// kVecSize<T> floats -> 16 bytes, rounding to nearest even.
template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[kVecSize<T>]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      words[i] = __float_as_uint(in[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      words[i] = bit_cast<uint32_t>(__floats2bfloat162_rn(in[2 * i], in[2 * i + 1]));
    } else {
      words[i] = bit_cast<uint32_t>(__floats2half2_rn(in[2 * i], in[2 * i + 1]));
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Where a chunk's aligned 16-byte vectors start (the backward's split): `head` scalar entries,
// then `body` whole vectors, then `tail` scalar entries.
struct ChunkLayout {
  int head;
  int body;
  int tail;
};

template <typename T>
__device__ __forceinline__ int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kVecSize<T>);
}

template <typename T>
__device__ __forceinline__ ChunkLayout chunk_layout(const T* start, int len) {
  const int head = min(len, (kVecSize<T> - misalignment(start)) % kVecSize<T>);
  const int body = (len - head) / kVecSize<T>;
  return {head, body, len - head - body * kVecSize<T>};
}

// ---- forward ----------------------------------------------------------------------------------

// One thread's online statistics: sum and weighted are in bits relative to max_logit, a raw logit
// (the per-entry test is a plain comparison; d = (z - max_logit) * scale rounds relative to |d|).
struct ThreadStats {
  float max_logit = -INFINITY;
  float sum = 0.0f;
  float weighted = 0.0f;

  template <int K>
  __device__ __forceinline__ void add(const float (&x)[K], float scale) {
    float group_max = x[0];
#pragma unroll
    for (int k = 1; k < K; ++k) group_max = fmaxf(group_max, x[k]);  // NaN is ignored here ...
    if (group_max > max_logit) {
      if (max_logit * scale > -INFINITY) {  // rescale what was summed to the new max
        const float diff = (max_logit - group_max) * scale;
        const float factor = exp2_flush(diff);
        // diff overflows to -inf when the maxima are ~1e38 apart: the floor keeps 0 * -inf (NaN)
        // out, and factor is 0 there anyway.
        weighted = factor * fmaf(sum, fmaxf(diff, kExp2Floor), weighted);
        sum *= factor;
      }
      max_logit = group_max;
    }
    // While the scaled max is -inf (everything so far -inf or NaN, or finite logits such as
    // finfo.min whose scaled value overflows to -inf), the reference is 0: those entries give
    // 2^(z * scale) = 2^-inf = 0 and the partial stays empty (relative to max_logit itself the max
    // entry would give 2^0, and relative to -inf, 2^(-inf + inf) = NaN).
    const float reference = max_logit * scale > -INFINITY ? max_logit : 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float d = (x[k] - reference) * scale;
      const float e = exp2_flush(d);  // ... and poisons the sums here
      sum += e;
      weighted = fmaf(e, fmaxf(d, kExp2Floor), weighted);
    }
  }

  __device__ __forceinline__ SoftmaxPartial partial(float scale) const {
    return {max_logit * scale > -INFINITY ? max_logit : -INFINITY, sum, weighted};
  }
};

__device__ __forceinline__ SoftmaxPartial shuffle_down(const SoftmaxPartial& p, int offset) {
  return {__shfl_down_sync(kFullMask, p.max, offset), __shfl_down_sync(kFullMask, p.sum, offset),
          __shfl_down_sync(kFullMask, p.weighted, offset)};
}

// The block's merged statistics, valid in thread 0. Fixed tree: deterministic.
__device__ __forceinline__ SoftmaxPartial block_merge(SoftmaxPartial p, float scale) {
  __shared__ SoftmaxPartial warp_partials[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) p = merge(p, shuffle_down(p, offset), scale);
  if (lane == 0) warp_partials[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kWarps ? warp_partials[lane] : empty_partial();
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
      p = merge(p, shuffle_down(p, offset), scale);
    }
  }
  return p;
}

// The 16 bytes that start shift_bytes into `lo` and run on into `hi` (em/realign.h). The branches
// inside are uniform: shift_bytes is the block's.
__device__ __forceinline__ uint4 realign(const uint4& lo, const uint4& hi, int shift_bytes) {
  const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  uint32_t out[4];
  realign_words(words, shift_bytes, out);
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Chunk vector i (entries [kVecSize i, kVecSize (i + 1)) of the chunk). kShifted: the chunk
// starts shift_bytes past the aligned `vectors`, and the vector is cut from two aligned loads
// (the second is the next thread's first: the same DRAM bytes, an L1 hit).
template <bool kShifted>
__device__ __forceinline__ uint4 load_chunk_vector(const uint4* vectors, int i, int shift_bytes) {
  if constexpr (kShifted) {
    return realign(__ldg(vectors + i), __ldg(vectors + i + 1), shift_bytes);
  } else {
    return __ldg(vectors + i);
  }
}

// Thread t folds chunk vectors t, t + kThreads, ... into its statistics, in that order whatever
// the unroll (so the order depends only on t and the chunk length), with `unroll` vectors' loads
// in flight before any math. Shifted chunks take two loads a vector, so half the unroll keeps
// the loads in flight and the registers the same (the full unroll spilled 4 bytes for fp32,
// sm_90a).
template <typename T, bool kShifted>
__device__ __forceinline__ void sum_vectors(const uint4* vectors, int shift_bytes, int count,
                                            float scale, ThreadStats& stats) {
  constexpr int unroll = kShifted ? kUnroll / 2 : kUnroll;
  for (int v = threadIdx.x; v < count; v += kThreads * unroll) {
    uint4 raw[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      if (v + u * kThreads < count) {
        raw[u] = load_chunk_vector<kShifted>(vectors, v + u * kThreads, shift_bytes);
      }
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      if (v + u * kThreads < count) {
        float x[kVecSize<T>];
        unpack<T>(raw[u], x);
        stats.add(x, scale);
      }
    }
  }
}

struct ForwardOutputs {
  float* entropy;
  double* lse;
  float* logprobs;  // nullptr without tokens
};

template <typename T>
__device__ __forceinline__ void store_row_results(int64_t row, const SoftmaxPartial& stats,
                                                  const T* row_logits, int64_t vocab,
                                                  const TemperatureFactors& factors,
                                                  const int64_t* tokens,
                                                  const ForwardOutputs& out) {
  const RowStatistics result = finalize(stats, factors);
  out.entropy[row] = result.entropy;
  out.lse[row] = result.lse;
  if (tokens != nullptr) {
    const int64_t token = tokens[row];
    out.logprobs[row] = (token >= 0 && token < vocab)
                            ? token_logprob(stats, to_float(row_logits[token]), factors.scale)
                            : NAN;  // an id outside [0, V): visible, without a host sync
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_fwd_kernel(const T* __restrict__ logits_ptr, int64_t row_stride, int64_t vocab,
                             VocabSplit split, TemperatureFactors factors,
                             const int64_t* __restrict__ tokens_ptr,
                             SoftmaxPartial* __restrict__ partials_ptr, ForwardOutputs out) {
  const float scale = factors.scale;
  const int64_t item = blockIdx.x;
  const int64_t row = item / split.splits;
  const int64_t start = (item - row * split.splits) * split.chunk;
  const int len = static_cast<int>(min(static_cast<int64_t>(split.chunk), vocab - start));
  const T* row_logits = logits_ptr + row * row_stride;
  const T* src = row_logits + start;
  // Entries by their index in the chunk, never by address (see the top of the file): `vectors`
  // whole vectors from the chunk start, then `tail` scalar entries (the last chunk of a row only).
  const int vectors = len / kVecSize<T>;
  const int tail = len - vectors * kVecSize<T>;
  const int shift = misalignment(src);  // the same for the whole block: a uniform branch

  ThreadStats stats;
  if (shift == 0) {
    sum_vectors<T, false>(reinterpret_cast<const uint4*>(src), 0, vectors, scale, stats);
  } else {
    sum_vectors<T, true>(reinterpret_cast<const uint4*>(src - shift),
                         shift * static_cast<int>(sizeof(T)), vectors, scale, stats);
  }
  if (threadIdx.x < tail) {
    const float x[1] = {to_float(src[vectors * kVecSize<T> + threadIdx.x])};
    stats.add(x, scale);
  }

  const SoftmaxPartial merged = block_merge(stats.partial(scale), scale);
  if (threadIdx.x == 0) {
    if (split.splits == 1) {
      store_row_results(row, merged, row_logits, vocab, factors, tokens_ptr, out);
    } else {
      partials_ptr[item] = merged;
    }
  }
}

// One thread per row: merge the row's partials in chunk order, then write its results.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    softmax_stats_merge_kernel(const SoftmaxPartial* __restrict__ partials_ptr, int64_t rows,
                               int splits, const T* __restrict__ logits_ptr, int64_t row_stride,
                               int64_t vocab, TemperatureFactors factors,
                               const int64_t* __restrict__ tokens_ptr, ForwardOutputs out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (row >= rows) return;
  const SoftmaxPartial* row_partials = partials_ptr + row * splits;
  SoftmaxPartial stats = row_partials[0];
  for (int k = 1; k < splits; ++k) stats = merge(stats, row_partials[k], factors.scale);
  store_row_results(row, stats, logits_ptr + row * row_stride, vocab, factors, tokens_ptr, out);
}

// ---- backward ---------------------------------------------------------------------------------

__device__ __forceinline__ float gradient(float x, const GradientCoefficients& k) {
  const float d = fmaf(x - k.center, k.scale, -k.offset);  // log2 p
  // -inf: 0 * finite; 1 / T last, so that it is 0 * finite at any T
  return exp2_approx(d) * fmaf(k.c1, fmaxf(d, kExp2Floor), k.c0) * k.inv_temperature;
}

struct BackwardRowInputs {
  const int64_t* tokens;         // nullptr without tokens
  const float* entropy;
  const double* lse;
  const float* grad_entropy;
  const float* grad_logprobs;    // nullptr without a log-prob gradient
  TemperatureFactors temperature;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_bwd_kernel(const T* __restrict__ logits_ptr, int64_t row_stride, int64_t vocab,
                             VocabSplit split, BackwardRowInputs in, T* __restrict__ grad_ptr) {
  const int64_t item = blockIdx.x;
  const int64_t row = item / split.splits;
  const int64_t start = (item - row * split.splits) * split.chunk;
  const int len = static_cast<int>(min(static_cast<int64_t>(split.chunk), vocab - start));

  const int64_t token = in.tokens != nullptr ? in.tokens[row] : -1;
  const bool in_vocab = token >= 0 && token < vocab;
  // An id outside [0, V) (a NaN log-prob) has its logit elsewhere, as on a vocabulary shard: its
  // log-prob gradient here is lse's alone, -p_j, with no one-hot.
  const float grad_logprob = in.grad_logprobs != nullptr ? in.grad_logprobs[row] : 0.0f;
  const GradientCoefficients k = gradient_coefficients(in.entropy[row], in.lse[row],
                                                       in.grad_entropy[row], grad_logprob,
                                                       in.temperature);
  const T* src = logits_ptr + row * row_stride + start;
  T* dst = grad_ptr + row * vocab + start;
  int token_in_chunk =
      (in_vocab && token >= start && token < start + len) ? static_cast<int>(token - start) : -1;
  // A -inf chosen logit gets no one-hot term: like every -inf entry, a zero gradient.
  if (token_in_chunk >= 0 && to_float(src[token_in_chunk]) == -INFINITY) token_in_chunk = -1;

  if (misalignment(src) != misalignment(dst)) {  // no common vector grid: scalar, still coalesced
    for (int j = threadIdx.x; j < len; j += kThreads) {
      const float g = gradient(to_float(src[j]), k);
      dst[j] = from_float<T>(j == token_in_chunk ? g + k.onehot : g);
    }
    return;
  }

  const ChunkLayout layout = chunk_layout(src, len);
  const uint4* in_vectors = reinterpret_cast<const uint4*>(src + layout.head);
  uint4* out_vectors = reinterpret_cast<uint4*>(dst + layout.head);
  for (int v = threadIdx.x; v < layout.body; v += kThreads * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads < layout.body) raw[u] = __ldg(in_vectors + v + u * kThreads);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = v + u * kThreads;
      if (index < layout.body) {
        float x[kVecSize<T>];
        unpack<T>(raw[u], x);
#pragma unroll
        for (int i = 0; i < kVecSize<T>; ++i) x[i] = gradient(x[i], k);
        const int first = layout.head + index * kVecSize<T>;
        if (static_cast<unsigned>(token_in_chunk - first) < static_cast<unsigned>(kVecSize<T>)) {
#pragma unroll
          for (int i = 0; i < kVecSize<T>; ++i) {
            if (first + i == token_in_chunk) x[i] += k.onehot;
          }
        }
        out_vectors[index] = pack<T>(x);
      }
    }
  }
  if (threadIdx.x < layout.head + layout.tail) {
    const int j = threadIdx.x < layout.head ? threadIdx.x : threadIdx.x + layout.body * kVecSize<T>;
    const float g = gradient(to_float(src[j]), k);
    dst[j] = from_float<T>(j == token_in_chunk ? g + k.onehot : g);
  }
}

// ---- launchers --------------------------------------------------------------------------------

// Calls fn(T{}) with T the device storage type of `dtype`.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    case at::kHalf: return fn(__half{});
    default: TORCH_CHECK(false, "em_C: unsupported logits dtype ", dtype);
  }
}

int64_t grid_size(const char* op, int64_t rows, const VocabSplit& split) {
  const int64_t blocks = rows * split.splits;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", rows, " rows of ",
              split.splits, " chunks exceed the CUDA grid; split the batch");
  return blocks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_fwd_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& tokens, double temperature) {
  constexpr const char* kOp = "em_C::softmax_stats_fwd";
  check_fwd_args(kOp, logits, tokens, temperature, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor entropy = at::empty({rows}, options);
  at::Tensor lse = at::empty({rows}, options.dtype(at::kDouble));
  at::Tensor logprobs = at::empty({tokens.has_value() ? rows : 0}, options);
  if (rows == 0) return {entropy, lse, logprobs};

  const VocabSplit split = split_vocab(vocab);
  const int64_t blocks = grid_size(kOp, rows, split);
  const at::Tensor token_ids = tokens.has_value() ? tokens->contiguous() : at::Tensor();
  const int64_t* token_ptr = tokens.has_value() ? token_ids.const_data_ptr<int64_t>() : nullptr;
  const at::Tensor partials =
      split.splits > 1 ? at::empty({blocks * 3}, options) : at::Tensor();
  SoftmaxPartial* partials_ptr =
      split.splits > 1 ? reinterpret_cast<SoftmaxPartial*>(partials.data_ptr<float>()) : nullptr;
  const ForwardOutputs out{entropy.data_ptr<float>(), lse.data_ptr<double>(),
                           tokens.has_value() ? logprobs.data_ptr<float>() : nullptr};
  const TemperatureFactors factors = temperature_factors(temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_storage(logits.scalar_type(), [&](auto storage) {
    using T = decltype(storage);
    const T* logits_ptr = static_cast<const T*>(logits.const_data_ptr());
    softmax_stats_fwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        logits_ptr, logits.stride(0), vocab, split, factors, token_ptr, partials_ptr, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (split.splits > 1) {
      const auto merge_blocks = static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads);
      softmax_stats_merge_kernel<T><<<merge_blocks, kMergeThreads, 0, stream>>>(
          partials_ptr, rows, split.splits, logits_ptr, logits.stride(0), vocab, factors, token_ptr,
          out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {entropy, lse, logprobs};
}

at::Tensor softmax_stats_bwd_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& tokens,
                                  const at::Tensor& entropy, const at::Tensor& lse,
                                  const at::Tensor& grad_entropy,
                                  const std::optional<at::Tensor>& grad_logprobs,
                                  double temperature) {
  constexpr const char* kOp = "em_C::softmax_stats_bwd";
  check_bwd_args(kOp, logits, tokens, entropy, lse, grad_entropy, grad_logprobs, temperature,
                 c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  at::Tensor grad = at::empty({rows, vocab}, logits.options());
  if (rows == 0) return grad;

  const VocabSplit split = split_vocab(vocab);
  const int64_t blocks = grid_size(kOp, rows, split);
  const at::Tensor token_ids = tokens.has_value() ? tokens->contiguous() : at::Tensor();
  const at::Tensor grad_lp = grad_logprobs.has_value() ? grad_logprobs->contiguous() : at::Tensor();
  const at::Tensor entropy_c = entropy.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_entropy_c = grad_entropy.contiguous();
  const BackwardRowInputs in{tokens.has_value() ? token_ids.const_data_ptr<int64_t>() : nullptr,
                             entropy_c.const_data_ptr<float>(),
                             lse_c.const_data_ptr<double>(),
                             grad_entropy_c.const_data_ptr<float>(),
                             grad_logprobs.has_value() ? grad_lp.const_data_ptr<float>() : nullptr,
                             temperature_factors(temperature)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_storage(logits.scalar_type(), [&](auto storage) {
    using T = decltype(storage);
    softmax_stats_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(logits.const_data_ptr()), logits.stride(0), vocab, split, in,
        static_cast<T*>(grad.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(em_C, CUDA, m) {
  m.impl("softmax_stats_fwd", &softmax_stats_fwd_cuda);
  m.impl("softmax_stats_bwd", &softmax_stats_bwd_cuda);
}

}  // namespace em::cuda
