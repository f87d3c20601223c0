// Per-element and per-row math shared by the CPU kernels (csrc/*.cpp) and the CUDA kernels (csrc/cuda/*.cu).
//
// Plain C++ plus the AAPO_HD macro, no torch includes, so nvcc can compile it. The CPU tests therefore exercise
// exactly the formulas the GPU runs. See docs/algorithms.md.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define AAPO_HD __host__ __device__
#else
#define AAPO_HD
#endif

namespace aapo {
namespace math {

// ------------------------------------------------------------------------------------------------ rewards

// How a margin's reference reward is chosen (AlgorithmConfig.reference_pairing).
enum Pairing : int64_t { kPaired = 0, kGroupMean = 1 };

// Weighted, NaN-ignoring reward sum of one sample: sum_f w[f] * R[f] over the f with R[f] not NaN.
// `count` receives how many functions applied; a row with count == 0 sums to 0 (an empty sum).
AAPO_HD inline double nan_weighted_sum(const float* row, const float* w, int64_t num_functions, int64_t* count) {
  double acc = 0.0;
  int64_t n = 0;
  for (int64_t f = 0; f < num_functions; ++f) {
    const float v = row[f];
    if (!(v != v)) {  // not NaN (isnan without <cmath> overload issues on device)
      acc += static_cast<double>(w[f]) * static_cast<double>(v);
      ++n;
    }
  }
  *count = n;
  return acc;
}

// Mean and unbiased (Bessel) std of one group of `g` rewards, in double. std is NaN when g == 1 (like torch.std).
struct GroupStats {
  double mean;
  double std;
  bool zero_variance;  // every reward in the group is identical
};

AAPO_HD inline GroupStats group_stats(const double* r, int64_t g) {
  double sum = 0.0, lo = r[0], hi = r[0];
  for (int64_t i = 0; i < g; ++i) {
    sum += r[i];
    lo = r[i] < lo ? r[i] : lo;
    hi = r[i] > hi ? r[i] : hi;
  }
  const double mean = sum / static_cast<double>(g);
  double ss = 0.0;
  for (int64_t i = 0; i < g; ++i) ss += (r[i] - mean) * (r[i] - mean);
  GroupStats s;
  s.mean = mean;
  s.std = g > 1 ? sqrt(ss / static_cast<double>(g - 1)) : NAN;
  s.zero_variance = (lo == hi);
  return s;
}

// Group-relative advantage without the margin: (r - mean) / (std + eps), or r - mean when scale is off.
AAPO_HD inline double base_advantage(double r, GroupStats s, bool scale, double eps) {
  const double centred = r - s.mean;
  return scale ? centred / (s.std + eps) : centred;
}

// AAPO advantage margin: clamp(r - r_ref, -delta_low, +delta_high).
AAPO_HD inline double advantage_margin(double r, double r_ref, double delta_low, double delta_high) {
  const double m = r - r_ref;
  return m < -delta_low ? -delta_low : (m > delta_high ? delta_high : m);
}

// ------------------------------------------------------------------------------------------------ log-softmax

// Running statistics of one row (or shard of a row) of logits x, relative to a reference max `m`:
//   sumexp = sum_j exp(x_j - m),   sum_pd = sum_j exp(x_j - m) * (x_j - m).
// Keeping sum_pd relative to the max (not sum p*x) avoids cancellation when all logits share a large offset.
// An empty or all -inf row has m = -inf and both sums 0.
struct SoftmaxStats {
  float max;
  float sumexp;
  float sum_pd;
};

AAPO_HD inline SoftmaxStats softmax_stats_empty() {
  SoftmaxStats s;
  s.max = -INFINITY;
  s.sumexp = 0.f;
  s.sum_pd = 0.f;
  return s;
}

// Lower bound for a shift x - m: exp(-104) is below the smallest fp32 denormal, so exp of anything lower is exactly 0
// in fp32 and clamping changes no result; it keeps 0 * shift (and g * shift) finite for -inf logits.
constexpr float kMinShift = -104.f;

// x - m clamped below at kMinShift, so exp(x - m) == 0 terms contribute 0 (not 0 * -inf = NaN).
AAPO_HD inline float finite_shift(float x, float m) {
  const float d = x - m;
  return d < kMinShift ? kMinShift : d;
}

// Re-express stats relative to a new reference max `m_new` >= s.max:
//   sumexp' = a * sumexp,  sum_pd' = a * (sum_pd + (m_old - m_new) * sumexp),  a = exp(m_old - m_new).
AAPO_HD inline SoftmaxStats softmax_stats_rebase(SoftmaxStats s, float m_new) {
  if (s.sumexp == 0.f) {  // nothing accumulated (all -inf): stays empty
    s.max = m_new;
    return s;
  }
  const float delta = s.max - m_new;  // <= 0
  const float a = expf(delta);
  s.sum_pd = a * (s.sum_pd + delta * s.sumexp);
  s.sumexp = a * s.sumexp;
  s.max = m_new;
  return s;
}

// Merge two partial stats (e.g. two vocab blocks, or two TP shards).
AAPO_HD inline SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
  const float m = a.max > b.max ? a.max : b.max;
  if (m == -INFINITY) return softmax_stats_empty();
  a = softmax_stats_rebase(a, m);
  b = softmax_stats_rebase(b, m);
  SoftmaxStats s;
  s.max = m;
  s.sumexp = a.sumexp + b.sumexp;
  s.sum_pd = a.sum_pd + b.sum_pd;
  return s;
}

// Online step: add one logit x to the stats (rebasing first when x is a new max).
AAPO_HD inline void softmax_stats_add(SoftmaxStats* s, float x) {
  if (x > s->max) *s = softmax_stats_rebase(*s, x);
  if (s->max == -INFINITY) return;  // x == -inf and nothing else yet
  const float d = finite_shift(x, s->max);
  const float e = expf(d);
  s->sumexp += e;
  s->sum_pd += e * d;
}

// log p_j = (x_j - max) - log(sumexp), clamped below at kMinShift. Subtracting the max first keeps it exact when all
// logits share a large offset (|x| ~ 1e4), where max + log(sumexp) would round to ulp(1e4).
AAPO_HD inline float log_softmax_value(float x, float row_max, float log_sumexp) {
  const float d = (x - row_max) - log_sumexp;
  return d < kMinShift ? kMinShift : d;
}

// Token log-prob log p(target), unclamped (-inf for a -inf target logit).
AAPO_HD inline float token_logprob(float target_logit, float row_max, float log_sumexp) {
  return (target_logit - row_max) - log_sumexp;
}

// Entropy H = -sum p log p = log(sumexp) - sum_pd / sumexp (stats relative to the row max).
AAPO_HD inline float softmax_entropy(SoftmaxStats s) { return logf(s.sumexp) - s.sum_pd / s.sumexp; }

// d/dx_j of (g_logp * log p(target) + g_ent * H) for one logit, given log p_j (log_softmax_value) and p_j = exp of it:
//   g_logp * [j == target] - p_j * (g_logp + g_ent * (log p_j + H)).
AAPO_HD inline float logprob_entropy_grad(float logp_j, float p, bool is_target, float entropy, float g_logp,
                                          float g_ent) {
  const float g = -p * (g_logp + g_ent * (logp_j + entropy));
  return is_target ? g + g_logp : g;
}

}  // namespace math
}  // namespace aapo
