// Row statistics of softmax(z / T) in base 2, shared by the CPU and CUDA kernels.
//
// A row (or any part of one) is summarised by three floats: the max in logit units and two sums in
// bits, with k = log2(e) / T and d_j = (z_j - m) k:
//
//     max      = m = max_j z_j
//     sum      = s = sum_j 2^d_j
//     weighted = w = sum_j 2^d_j d_j
//
// The exponent is formed from the shifted logit, (z_j - m) k, not as one FMA z_j k - m k: z_j - m
// is exact for z_j near m (Sterbenz) and the product then rounds relative to |d_j|, so the argmax
// term is exactly 2^0. The FMA form rounds m k, a number of size |m| / T, so at T = 1e-4 it moved
// log p of the argmax by ~0.01 nats and at T <= 1e-10 made it +-inf.
//
// w is kept relative to the running max so that it never grows like |z / T| * s (entropy is a small
// difference of two large numbers otherwise). Two parts merge exactly (up to rounding):
//
//     m = max(m1, m2),  delta_i = (m_i - m) k,  a_i = 2^delta_i
//     s = a1 s1 + a2 s2,  w = a1 (w1 + s1 delta_1) + a2 (w2 + s2 delta_2)
//
// and a whole row gives, in nats,
//
//     lse = m / T + ln2 log2 s         H = ln2 (log2 s - w / s)
//     log p(y) = ln2 ((z_y - m) k - log2 s)
//
// lse is saved in double, m / T formed exactly from 1 / T as a float pair (hi + lo, both products
// exact), so it still holds ln s to ~2^-52 |lse| (ln s itself is a float: it only has to be right
// relative to its own size, which is small on a confident row, and rounds once). A float32 lse
// would round it to half an ulp of |lse| ~ |m| / T, which on a confident row is the size of log s
// itself: at |lse| ~ 100 the gradient of a row with H ~ 1e-4 was off by 5-10% (and plain float32
// PyTorch, z / T - logsumexp(z / T), is off the same way).
//
// The backward recovers the exponents relative to a center c near m, both per-row numbers
// formed from the saved lse in double:
//
//     c = float(lse T),   r = float(lse - c / T) log2(e),
//     d_j = (z_j - c) k - r  ~=  (z_j - m) k - log2 s = log2 p_j
//
// with T in double (in Triton a float pair) and c / T formed as the forward formed m / T. Then
// lse T = m (1 + delta) + T ln s with |delta| ~ 2^-47, so on a confident row (T ln s below half an
// ulp of m) c is m itself, c / T is bitwise the forward's m / T, and r is the forward's ln s up to
// the rounding of m / T + ln s (tiny in practice: ln s is within ~(s - 1)^2 of a multiple of
// 2^-23, which m / T's ulp holds for |lse| < 2^30): d_j of the argmax is -log2 s to a float
// rounding, every other d_j (z_j - m) k, exact difference and one rounding, as in the forward.
// On a flat row c lies within T ln s of m and both terms round relative to log s. With 1 / T or
// T as a float, c missed m by an ulp whenever m (1 + delta) rounded away from m (a third of all m
// for some T), and then (m - c) k, a number of ~2^-23 |lse|, left its own rounding, ~2^-47 |lse|,
// in log p: 1-2% of a confident row's gradient at |lse| ~ 7e7 and T = 1.0000522e-4; with 1 / T
// in double, m / T rounded differently in the forward and the backward (FMA contraction), 1e-4
// there. Past T = FLT_MAX / 1024 the center is 0 instead (lse T could reach FLT_MAX there and
// z_j - c overflow; |lse| <= FLT_MAX / T + ln V is small then). Below it, z_j - c overflows only
// for entries whose p_j < e^-1000 = 0.
// The gradient of sum_rows(gH * H + gL * log p(y)) w.r.t. z_j, with d_j = log2 p_j and
// p_j = 2^d_j, is
//
//     dz_j = (1/T) [-gH p_j (d_j ln2 + H) + gL (onehot(y)_j - p_j)]
//          = p_j (c0 + c1 d_j) / T + [j == y] gL / T,
//     c0 = -(gH H + gL),   c1 = -gH ln2.
//
// 1 / T multiplies last: folded into c0 and c1, c1 d_j with d_j at the floor overflowed for
// T <= ~1e-37 and made every p_j = 0 entry 0 * inf = NaN.
//
// Special values: a masked entry (z = -inf) has p = 0 and contributes exactly 0 (the exponent is
// clamped at kExp2Floor before it multiplies anything). A part that is all -inf is empty:
// {-inf, 0, 0}; a row that is all -inf ends with s = 0, so lse = -inf and H = NaN (0 / 0), and its
// gradient is 0. A NaN entry makes s NaN, which poisons that row only. A row with |lse| beyond
// kExactLseLimit (|max z| / T past ~1e12, or +inf logits) has lost log2 s in the double too: its
// gradient is NaN, visibly; unless its entropy is exactly 0 (a one-hot row, s = 1, such as a
// token forced by a huge logit), whose ln s = 0 nothing can lose: its gradient stays exact.
#pragma once

#include <float.h>
#include <math.h>

#include "em/common.h"

namespace em {

struct SoftmaxPartial {
  float max;       // m = max z, in logit units (-inf when m k is -inf)
  float sum;       // s = sum 2^((z - m) k)
  float weighted;  // w = sum 2^((z - m) k) (z - m) k
};

EM_HOST_DEVICE SoftmaxPartial empty_partial() { return {-INFINITY, 0.0f, 0.0f}; }

// True for a part with no unmasked entry. A part whose max is -inf but whose sum is NaN (it saw a
// NaN and nothing finite) is not empty: its NaN must reach the row.
EM_HOST_DEVICE bool is_empty(const SoftmaxPartial& p) { return p.max == -INFINITY && p.sum == 0.0f; }

// The statistics of the union of two disjoint parts. Commutative (bitwise), so any fixed merge
// tree is deterministic; the kernels always merge in a fixed order.
// scale = k = log2(e) / T.
EM_HOST_DEVICE SoftmaxPartial merge(const SoftmaxPartial& a, const SoftmaxPartial& b, float scale) {
  if (is_empty(a)) return b;
  if (is_empty(b)) return a;
  const float m = fmaxf(a.max, b.max);  // a NaN max loses here but reappears through exp2(NaN)
  const float da = (a.max - m) * scale;
  const float db = (b.max - m) * scale;
  const float sa = exp2f(da);
  const float sb = exp2f(db);
  // A shift that overflows to -inf (maxima ~1e38 apart, or a tiny T) has scale 0; the floor keeps
  // its 0 * (sum * -inf) = NaN out. Elsewhere it only touches parts whose scale is below
  // 2^-127 (subnormal, kept without flush-to-zero): their term moves by ~1e-36 absolute at most.
  return {m, a.sum * sa + b.sum * sb,
          sa * (a.weighted + a.sum * fmaxf(da, kExp2Floor)) +
              sb * (b.weighted + b.sum * fmaxf(db, kExp2Floor))};
}

struct RowStatistics {
  double lse;     // logsumexp(z / T), nats, in double (see the top of this file)
  float entropy;  // H, nats
};

// Largest |lse| (nats) the backward trusts: there a double's ulp is 2^-12, so ln s and every
// log p_j are still held to about bf16's rounding; past it the gradient is NaN.
constexpr double kExactLseLimit = 1099511627776.0;  // 2^40

// log p(y) from the row's statistics and the chosen logit z_y: z_y - m first (exact near the max),
// then scaled by k = log2(e) / T. A row with no distribution (max -inf: all -inf, or finite
// logits such as finfo.min whose scaled values overflow to -inf) gives NaN, as its entropy does;
// the formula would give -inf - -inf = NaN for the first kind but +inf for the second.
EM_HOST_DEVICE float token_logprob(const SoftmaxPartial& p, float logit, float scale) {
  if (p.max == -INFINITY) return NAN;
  return ((logit - p.max) * scale - log2f(p.sum)) * kLn2;
}

// Per-row constants of the backward: dz_j = p_j (c0 + c1 d_j) inv_temperature + [j == y] onehot
// with d_j = (z_j - center) scale - offset and p_j = 2^d_j (see the top of this file).
struct GradientCoefficients {
  float center;           // c = float(lse T), near the row max (logit units)
  float scale;            // k = log2(e) / T, the forward's
  float offset;           // r = float(lse - c / T) log2(e), bits
  float c0;               // -(gH H + gL)
  float c1;               // -gH ln2
  float inv_temperature;  // 1 / T, applied after p_j (so that p_j = 0 gives 0 at any T)
  float onehot;           // gL / T, added at the chosen token
};

// Temperatures above which the backward's center is 0 (see the top of this file).
constexpr double kCenterlessTemperature = FLT_MAX / 1024.0;

// The factors of the temperature, computed once on the host in double (one rounding each, on every
// backend): scale = log2(e) / T multiplies every logit; inv_temperature = 1 / T scales gradients
// and, with inv_temperature_lo (1 / T - inv_temperature, rounded), is 1 / T as a float pair, as
// Triton gets it; center_temperature (T, or 0 past kCenterlessTemperature) gives the backward's
// center.
struct TemperatureFactors {
  float scale;
  float inv_temperature;
  float inv_temperature_lo;
  double center_temperature;
};

inline TemperatureFactors temperature_factors(double temperature) {
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  return {static_cast<float>(static_cast<double>(kLog2e) / temperature), inv_temperature,
          static_cast<float>(1.0 / temperature - inv_temperature),
          temperature < kCenterlessTemperature ? temperature : 0.0};
}

// x / T in double for a float x, from the pair: both products are exact, so the forward's m / T
// and the backward's c / T (c = m) come out bitwise equal on every backend. An infinite x (an
// empty row's max) keeps its sign: lo may be 0 or negative, and inf * lo would add a NaN.
EM_HOST_DEVICE double over_temperature(float x, const TemperatureFactors& t) {
  const double rest =
      isfinite(x) ? static_cast<double>(x) * static_cast<double>(t.inv_temperature_lo) : 0.0;
  return static_cast<double>(x) * static_cast<double>(t.inv_temperature) + rest;
}

// A whole row's statistics: lse = m / T + ln s in double.
EM_HOST_DEVICE RowStatistics finalize(const SoftmaxPartial& p, const TemperatureFactors& t) {
  const float log2_sum = log2f(p.sum);
  return {over_temperature(p.max, t) + static_cast<double>(log2_sum * kLn2),
          (log2_sum - p.weighted / p.sum) * kLn2};
}

// grad_logprob must already be 0 for a row without a token; a token outside [0, V) keeps it (its
// -p_j term) and gets no one-hot, which the caller adds only at a token inside the row.
// A row that is all -inf (lse = -inf) has no distribution; every entry is masked, so its gradient
// is exactly 0 like every masked entry's (center 0 and offset 0 make each d_j = -inf, p_j = 0).
// A row with |lse| past kExactLseLimit (or NaN) has lost log p_j, so its gradient is NaN,
// visibly, at every entry (-inf ones too) and whatever the upstream gradients: p_j (c0 + c1 d_j)
// = 0 * NaN, where the one-hot term alone would have looked plausible. A finite lse with H = 0 is
// exempt: s = 1 there, lse = m / T exactly, and c / T gives it back bitwise.
EM_HOST_DEVICE GradientCoefficients gradient_coefficients(float entropy, double lse,
                                                          float grad_entropy, float grad_logprob,
                                                          const TemperatureFactors& t) {
  if (lse == -INFINITY) return {0.0f, t.scale, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const bool one_hot = entropy == 0.0f && fabs(lse) < INFINITY;
  if (!(fabs(lse) <= kExactLseLimit) && !one_hot) return {0.0f, t.scale, 0.0f, NAN, NAN, NAN, NAN};
  // lse T = m (1 + delta) + T ln s may pass FLT_MAX by T ln s <= FLT_MAX 22 / 1024: clamped.
  const float center =
      static_cast<float>(fmin(fmax(lse * t.center_temperature, -FLT_MAX), FLT_MAX));
  return {center, t.scale,
          static_cast<float>(lse - over_temperature(center, t)) * kLog2e,
          -(grad_entropy * entropy + grad_logprob), -grad_entropy * kLn2, t.inv_temperature,
          grad_logprob * t.inv_temperature};
}

}  // namespace em
