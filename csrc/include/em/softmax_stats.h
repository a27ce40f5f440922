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
//     lse = m / T + ln2 log2 s          H = ln2 (log2 s - w / s)
//     log p(y) = ln2 ((z_y - m) k - log2 s)
//
// The backward sees only the saved float32 lse (half an ulp of |lse| ~ |m| / T is lost there and
// cannot be recovered). It forms log2 p_j = (z_j / T - lse) log2(e) with z_j / T - lse as one FMA
// of the exact product z_j (1/T) and the saved lse (one rounding relative to |log p_j|, then the
// log2(e) multiply), instead of z_j k - (lse log2(e)), whose rounded lse log2(e) added another
// ulp of |lse|. The gradient of sum_rows(gH * H + gL * log p(y)) w.r.t. z_j, with d_j = log2 p_j
// and p_j = 2^d_j, is
//
//     dz_j = (1/T) [-gH p_j (d_j ln2 + H) + gL (onehot(y)_j - p_j)]
//          = p_j (c0 + c1 d_j) + [j == y] gL / T,
//     c0 = -(gH H + gL) / T,   c1 = -gH ln2 / T.
//
// Special values: a masked entry (z = -inf) has p = 0 and contributes exactly 0 (the exponent is
// clamped at kExp2Floor before it multiplies anything). A part that is all -inf is empty:
// {-inf, 0, 0}; a row that is all -inf ends with s = 0, so lse = -inf and H = NaN (0 / 0), and its
// gradient is 0. A NaN entry makes s NaN, which poisons that row only.
#pragma once

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
  float lse;      // logsumexp(z / T), nats
  float entropy;  // H, nats
};

// inv_temperature = 1 / T; lse = m / T + ln s is one FMA (one rounding of a number of size |lse|).
EM_HOST_DEVICE RowStatistics finalize(const SoftmaxPartial& p, float inv_temperature) {
  const float log2_sum = log2f(p.sum);
  return {fmaf(p.max, inv_temperature, log2_sum * kLn2), (log2_sum - p.weighted / p.sum) * kLn2};
}

// log p(y) from the row's statistics and the chosen logit z_y: z_y - m first (exact near the max),
// then scaled by k = log2(e) / T. A row with no distribution (max -inf: all -inf, or finite
// logits such as finfo.min whose scaled values overflow to -inf) gives NaN, as its entropy does;
// the formula would give -inf - -inf = NaN for the first kind but +inf for the second.
EM_HOST_DEVICE float token_logprob(const SoftmaxPartial& p, float logit, float scale) {
  if (p.max == -INFINITY) return NAN;
  return ((logit - p.max) * scale - log2f(p.sum)) * kLn2;
}

// Per-row constants of the backward: dz_j = p_j (c0 + c1 d_j) + [j == y] onehot with
// d_j = fma(z_j, inv_temperature, -lse) * log2(e) and p_j = 2^d_j.
struct GradientCoefficients {
  float inv_temperature;  // 1 / T
  float lse;              // the saved lse, nats (0 for an all -inf row)
  float c0;      // -(gH H + gL) / T
  float c1;      // -gH ln2 / T
  float onehot;  // gL / T, added at the chosen token
};

// The factors of the temperature, computed once on the host in double (one rounding each, on every
// backend): scale = log2(e) / T multiplies every logit, inv_temperature = 1 / T.
struct TemperatureFactors {
  float scale;
  float inv_temperature;
};

inline TemperatureFactors temperature_factors(double temperature) {
  return {static_cast<float>(static_cast<double>(kLog2e) / temperature),
          static_cast<float>(1.0 / temperature)};
}

// grad_logprob must already be 0 for a row without a token; a token outside [0, V) keeps it (its
// -p_j term) and gets no one-hot, which the caller adds only at a token inside the row.
// A row that is all -inf (lse = -inf) has no distribution; every entry is masked, so its gradient
// is exactly 0 like every masked entry's (lse 0 makes each d_j = -inf, hence p_j = 0).
// A row whose lse overflowed float32 (|z| / T past ~3e38: the forward's values are still right,
// being formed relative to the max) has lost log p_j, so its gradient is NaN, visibly, at every
// entry (-inf ones too) and whatever the upstream gradients: p_j (c0 + c1 d_j) = 0 * NaN, where
// the one-hot term alone would have looked plausible.
EM_HOST_DEVICE GradientCoefficients gradient_coefficients(float entropy, float lse, float grad_entropy,
                                                          float grad_logprob,
                                                          const TemperatureFactors& t) {
  if (lse == -INFINITY) return {t.inv_temperature, 0.0f, 0.0f, 0.0f, 0.0f};
  if (lse == INFINITY) return {t.inv_temperature, lse, NAN, NAN, NAN};
  return {t.inv_temperature, lse, -(grad_entropy * entropy + grad_logprob) * t.inv_temperature,
          -grad_entropy * kLn2 * t.inv_temperature, grad_logprob * t.inv_temperature};
}

}  // namespace em
