// Per-thread and per-lane work of the CUDA kernels (csrc/cuda/*.cu), written as AAPO_HD functions over raw pointers.
//
// The kernels call these between their warp/block reductions; tests/ops/math_header_check.cpp calls the very same
// functions on the CPU for every simulated thread and replays the reductions in the kernels' order, so the index
// arithmetic (alignment head, 16-byte vectors, tails, thread striding) and the math run here without a GPU.
// The formulas themselves come from csrc/aapo_math.h; this file only adds what the GPU decomposition needs.
// No CUDA headers: plain C++ when not compiled by nvcc.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "aapo_math.h"

namespace aapo {
namespace cuda {

// ------------------------------------------------------------------------------------------------ scalar types

// bfloat16 is handled as its raw 16-bit pattern (the top half of a float32), so no cuda_bf16.h is needed and the CPU
// test can run the same code. Kernels are instantiated for float and Bf16Bits.
using Bf16Bits = uint16_t;

AAPO_HD inline uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

AAPO_HD inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// float32 -> bfloat16 with round-to-nearest-even and NaN kept quiet (the rounding c10::BFloat16 uses).
AAPO_HD inline Bf16Bits bf16_from_float(float f) {
  if (f != f) return static_cast<Bf16Bits>(0x7FC0u);
  const uint32_t u = float_bits(f);
  return static_cast<Bf16Bits>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

AAPO_HD inline float to_float(float x) { return x; }
AAPO_HD inline float to_float(Bf16Bits x) { return bits_float(static_cast<uint32_t>(x) << 16); }

template <typename T>
AAPO_HD inline T from_float(float x);
template <>
AAPO_HD inline float from_float<float>(float x) {
  return x;
}
template <>
AAPO_HD inline Bf16Bits from_float<Bf16Bits>(float x) {
  return bf16_from_float(x);
}

// ------------------------------------------------------------------------------------------------ 16-byte vectors

constexpr int kVecBytes = 16;

// Elements of T in one 16-byte vector: 4 float32 or 8 bfloat16.
template <typename T>
struct VecWidth {
  static constexpr int value = kVecBytes / static_cast<int>(sizeof(T));
};

struct alignas(16) Words4 {
  uint32_t w[4];
};

// Loads the 16 bytes at p (16-byte aligned): one 128-bit load on the GPU. A plain (coherent) load, not __ldg, because
// the in-place backward writes the same buffer within the kernel.
AAPO_HD inline Words4 load16(const void* p) {
  Words4 v;
#ifdef __CUDA_ARCH__
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  v.w[0] = u.x;
  v.w[1] = u.y;
  v.w[2] = u.z;
  v.w[3] = u.w;
#else
  std::memcpy(&v, p, sizeof(v));
#endif
  return v;
}

AAPO_HD inline void store16(void* p, const Words4& v) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

AAPO_HD inline void unpack(const Words4& v, float* out /*[4]*/, const float*) {
  for (int k = 0; k < 4; ++k) out[k] = bits_float(v.w[k]);
}
AAPO_HD inline void unpack(const Words4& v, float* out /*[8]*/, const Bf16Bits*) {
  for (int k = 0; k < 4; ++k) {  // little endian: element 2k is the low half of word k
    out[2 * k] = bits_float(v.w[k] << 16);
    out[2 * k + 1] = bits_float(v.w[k] & 0xFFFF0000u);
  }
}
AAPO_HD inline Words4 pack(const float* in /*[4]*/, float*) {
  Words4 v;
  for (int k = 0; k < 4; ++k) v.w[k] = float_bits(in[k]);
  return v;
}
AAPO_HD inline Words4 pack(const float* in /*[8]*/, Bf16Bits*) {
  Words4 v;
  for (int k = 0; k < 4; ++k) {
    v.w[k] = static_cast<uint32_t>(bf16_from_float(in[2 * k])) |
             (static_cast<uint32_t>(bf16_from_float(in[2 * k + 1])) << 16);
  }
  return v;
}

// How a row of v elements starting at `row` splits into a scalar head (up to the first 16-byte boundary),
// `nvec` aligned 16-byte vectors, and a scalar tail. Element indices: head [0, head), vectors
// [head, head + nvec * K), tail [head + nvec * K, v).
struct RowSplit {
  int64_t head;
  int64_t nvec;
  int64_t tail_begin;
};

template <typename T>
AAPO_HD inline RowSplit split_row(const T* row, int64_t v) {
  constexpr int64_t K = VecWidth<T>::value;
  const uint64_t addr = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(row));
  int64_t head = static_cast<int64_t>(((kVecBytes - addr % kVecBytes) % kVecBytes) / sizeof(T));
  if (addr % sizeof(T) != 0 || head > v) head = v;  // unaligned element type (never for a tensor) or tiny row
  RowSplit s;
  s.head = head;
  s.nvec = (v - head) / K;
  s.tail_begin = head + s.nvec * K;
  return s;
}

// Bytes of a row cache that fits any row of v elements of T, whatever its alignment (at most ceil(v / K) vectors).
template <typename T>
AAPO_HD inline int64_t row_cache_bytes(int64_t v) {
  constexpr int64_t K = VecWidth<T>::value;
  return ((v + K - 1) / K) * kVecBytes;
}

// ------------------------------------------------------------------------------------------------ log-softmax rows

// Loads issued back to back before any is consumed, per thread (memory-level parallelism).
constexpr int kUnroll = 4;

// Adds k logits to the stats with one rebase (on the chunk max) instead of one per new maximum; equal to k calls of
// math::softmax_stats_add up to rounding.
AAPO_HD inline void softmax_stats_add_chunk(math::SoftmaxStats* s, const float* x, int k) {
  float cm = x[0];
  for (int j = 1; j < k; ++j) cm = x[j] > cm ? x[j] : cm;
  if (cm > s->max) *s = math::softmax_stats_rebase(*s, cm);
  if (s->max == -INFINITY) return;  // everything so far is -inf
  for (int j = 0; j < k; ++j) {
    const float d = math::finite_shift(x[j], s->max);
    const float e = expf(d);
    s->sumexp += e;
    s->sum_pd += e * d;
  }
}

// Stats of the elements of one row that thread `tid` of `nthreads` owns: head/tail element tid, and the vectors
// tid, tid + nthreads, ... . Every element is owned by exactly one thread (nthreads >= K).
// With `cache` (room for split_row(row, v).nvec vectors, e.g. shared memory) the thread also keeps its vectors there,
// so a following thread_row_grad with the same cache reads them back instead of re-reading global memory.
template <typename T>
AAPO_HD inline math::SoftmaxStats thread_row_stats(const T* row, int64_t v, int tid, int nthreads,
                                                   Words4* cache = nullptr) {
  constexpr int K = VecWidth<T>::value;
  const RowSplit sp = split_row(row, v);
  math::SoftmaxStats s = math::softmax_stats_empty();
  if (tid < sp.head) math::softmax_stats_add(&s, to_float(row[tid]));
  if (sp.tail_begin + tid < v) math::softmax_stats_add(&s, to_float(row[sp.tail_begin + tid]));
  const T* vec = row + sp.head;
  for (int64_t base = tid; base < sp.nvec; base += static_cast<int64_t>(nthreads) * kUnroll) {
    Words4 raw[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < sp.nvec) raw[u] = load16(vec + idx * K);
    }
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < sp.nvec) {
        if (cache != nullptr) cache[idx] = raw[u];
        float x[K];
        unpack(raw[u], x, static_cast<const T*>(nullptr));
        softmax_stats_add_chunk(&s, x, K);
      }
    }
  }
  return s;
}

// Gradient of one logit (aapo_math.h's formula), given the row's full-vocabulary max and log sumexp.
// p == 0 (x = -inf, a masked entry, or underflow) drops the entropy term, whose limit is p * log p -> 0, so no
// 0 * (g_ent * huge shift) product can overflow to 0 * inf = NaN however the header clamps log p.
AAPO_HD inline float logit_grad(float x, bool is_target, float row_max, float log_sumexp, float entropy, float g_logp,
                                float g_ent) {
  const float logp = math::log_softmax_value(x, row_max, log_sumexp);
  const float p = expf(logp);
  return math::logprob_entropy_grad(logp, p, is_target, entropy, g_logp, p == 0.f ? 0.f : g_ent);
}

// Writes the gradient of the elements thread `tid` owns (the same ownership as thread_row_stats) into out_row, which
// may be row itself: each element is read and then written by the same thread. `target_local` < 0: not in the shard.
// `cache`: the vectors thread_row_stats stored for this row (read instead of global memory), or nullptr.
template <typename T>
AAPO_HD inline void thread_row_grad(const T* row, T* out_row, int64_t v, int64_t target_local, float row_max,
                                    float log_sumexp, float entropy, float g_logp, float g_ent, int tid, int nthreads,
                                    const Words4* cache = nullptr) {
  constexpr int K = VecWidth<T>::value;
  const RowSplit sp = split_row(row, v);
  const RowSplit so = split_row(static_cast<const T*>(out_row), v);
  auto grad_at = [&](float x, int64_t j) {
    return logit_grad(x, j == target_local, row_max, log_sumexp, entropy, g_logp, g_ent);
  };
  if (sp.head != so.head) {  // input and output rows misaligned relative to each other: scalar path
    for (int64_t j = tid; j < v; j += nthreads) {
      out_row[j] = from_float<T>(grad_at(to_float(row[j]), j));
    }
    return;
  }
  if (tid < sp.head) {
    const int64_t j = tid;
    out_row[j] = from_float<T>(grad_at(to_float(row[j]), j));
  }
  if (sp.tail_begin + tid < v) {
    const int64_t j = sp.tail_begin + tid;
    out_row[j] = from_float<T>(grad_at(to_float(row[j]), j));
  }
  const T* vec = row + sp.head;
  T* ovec = out_row + sp.head;
  for (int64_t base = tid; base < sp.nvec; base += static_cast<int64_t>(nthreads) * kUnroll) {
    Words4 raw[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < sp.nvec) raw[u] = cache != nullptr ? cache[idx] : load16(vec + idx * K);
    }
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * nthreads;
      if (idx < sp.nvec) {
        float x[K];
        unpack(raw[u], x, static_cast<const T*>(nullptr));
        const int64_t j0 = sp.head + idx * K;
        for (int k = 0; k < K; ++k) x[k] = grad_at(x[k], j0 + k);
        store16(ovec + idx * K, pack(x, static_cast<T*>(nullptr)));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ grouped advantages

// Inputs and outputs of the grouped-advantage op (the layout of torch.ops.aapo.grouped_advantages), raw pointers.
struct AdvantageArgs {
  const float* rewards;      // [B*G, F]
  const float* weights;      // [F]
  const float* ref_rewards;  // [B*G_ref, F] or nullptr
  int64_t num_groups;        // B
  int64_t group_size;        // G
  int64_t ref_group_size;    // G_ref (0 without reference)
  int64_t num_functions;     // F
  double eps;
  bool scale;
  double delta_low;
  double delta_high;
  int64_t pairing;  // math::Pairing
  float* rewards_sum;      // [B*G]
  float* ref_rewards_sum;  // [B*G_ref]
  float* advantages;       // [B*G]
  float* advantages_base;  // [B*G]
  float* group_mean;       // [B]
  float* group_std;        // [B]
  bool* zero_variance;     // [B]
};

// Partial first moments of one lane's samples (j = lane, lane + 32, ...) of a group.
struct LaneMoments {
  double sum;
  double lo;
  double hi;
};

constexpr int kWarp = 32;

AAPO_HD inline double sample_reward(const float* rewards, const float* w, int64_t f, int64_t i) {
  int64_t count = 0;
  return math::nan_weighted_sum(rewards + i * f, w, f, &count);
}

// Pass 1 of a group: the lane's weighted rewards (written to rewards_sum), their sum, min and max.
AAPO_HD inline LaneMoments advantage_lane_moments(const AdvantageArgs& a, int64_t grp, int lane) {
  LaneMoments m;
  m.sum = 0.0;
  m.lo = INFINITY;
  m.hi = -INFINITY;
  for (int64_t j = lane; j < a.group_size; j += kWarp) {
    const int64_t i = grp * a.group_size + j;
    const double r = sample_reward(a.rewards, a.weights, a.num_functions, i);
    a.rewards_sum[i] = static_cast<float>(r);
    m.sum += r;
    m.lo = r < m.lo ? r : m.lo;
    m.hi = r > m.hi ? r : m.hi;
  }
  return m;
}

// Pass 2: the lane's sum of squared deviations from the group mean (two-pass variance, as math::group_stats).
AAPO_HD inline double advantage_lane_sq_dev(const AdvantageArgs& a, int64_t grp, int lane, double mean) {
  double ss = 0.0;
  for (int64_t j = lane; j < a.group_size; j += kWarp) {
    const double r = sample_reward(a.rewards, a.weights, a.num_functions, grp * a.group_size + j);
    ss += (r - mean) * (r - mean);
  }
  return ss;
}

// Reference pass: the lane's reference rewards (written to ref_rewards_sum) and their sum.
AAPO_HD inline double advantage_lane_ref_sum(const AdvantageArgs& a, int64_t grp, int lane) {
  double sum = 0.0;
  for (int64_t j = lane; j < a.ref_group_size; j += kWarp) {
    const int64_t i = grp * a.ref_group_size + j;
    const double r = sample_reward(a.ref_rewards, a.weights, a.num_functions, i);
    a.ref_rewards_sum[i] = static_cast<float>(r);
    sum += r;
  }
  return sum;
}

// math::GroupStats from the reduced moments: mean, sum of squared deviations, min and max of a group of g rewards.
// (A candidate for aapo_math.h: math::group_stats could finish through it.)
AAPO_HD inline math::GroupStats group_stats_finish(double mean, double ss, double lo, double hi, int64_t g) {
  math::GroupStats s;
  s.mean = mean;
  s.std = g > 1 ? sqrt(ss / static_cast<double>(g - 1)) : NAN;
  s.zero_variance = (lo == hi);
  return s;
}

// Last pass: the lane's advantages with and without the margin; lane 0 also writes the group statistics.
AAPO_HD inline void advantage_lane_write(const AdvantageArgs& a, int64_t grp, int lane, math::GroupStats s,
                                         double ref_mean) {
  const bool has_ref = a.ref_rewards != nullptr;
  for (int64_t j = lane; j < a.group_size; j += kWarp) {
    const int64_t i = grp * a.group_size + j;
    const double r = sample_reward(a.rewards, a.weights, a.num_functions, i);
    const double base = math::base_advantage(r, s, a.scale, a.eps);
    double adv = base;
    if (has_ref) {
      const double ref = a.pairing == math::kPaired ? sample_reward(a.ref_rewards, a.weights, a.num_functions, i)
                                                    : ref_mean;
      adv += math::advantage_margin(r, ref, a.delta_low, a.delta_high);
    }
    a.advantages_base[i] = static_cast<float>(base);
    a.advantages[i] = static_cast<float>(adv);
  }
  if (lane == 0) {
    a.group_mean[grp] = static_cast<float>(s.mean);
    a.group_std[grp] = static_cast<float>(s.std);
    a.zero_variance[grp] = s.zero_variance;
  }
}

// nan_weighted_reward_sum of one row: the weighted sum, or NaN when no function applies.
AAPO_HD inline float reward_row_sum(const float* rewards, const float* w, int64_t f, int64_t i) {
  int64_t count = 0;
  const double acc = math::nan_weighted_sum(rewards + i * f, w, f, &count);
  return count > 0 ? static_cast<float>(acc) : NAN;
}

}  // namespace cuda
}  // namespace aapo
