// CPU driver for the math the CUDA kernels run (csrc/aapo_math.h and csrc/cuda/kernel_math.h), built with g++ by
// tests/ops/test_math_header.py. It replays each kernel's decomposition on the CPU: every simulated thread/lane calls
// the same AAPO_HD function the kernel calls, and the warp/block reductions are replayed in the kernels' order
// (xor butterflies over 32 lanes, then over the warp totals). Inputs and outputs are raw little-endian files.
//
//   math_header_check advantages N F M G SCALE PAIRING EPS DLOW DHIGH rewards.bin weights.bin ref.bin out.bin
//       out.bin: r[N], ref[M], adv[N], adv_base[N], mean[B], std[B], zero_var[B] (all float32)
//   math_header_check reward_sum N F rewards.bin weights.bin out.bin
//   math_header_check logprob DTYPE N V STRIDE OFFSET VOCAB_START HAS_ENT logits.bin target.bin row_max.bin
//       log_sumexp.bin entropy.bin grad_logp.bin grad_ent.bin outdir
//       DTYPE f32|bf16; logits.bin holds OFFSET + (N-1)*STRIDE + V elements, row i starting at OFFSET + i*STRIDE.
//       outdir/: stats.bin [N,4] (block kernel), seq_stats.bin [N,3] (header's scalar softmax_stats_add),
//       grad.bin [N,V] (out of place), grad_inplace.bin [N,V], fused_stats.bin [N,4], fused_grad.bin [N,V]
//       (in place, TP=1, row cached between the passes), fused_{stats,grad}_nocache.bin (no cache), all float32.
//   math_header_check bf16_round N in.bin out.bin      out: bf16 bits (uint16) of each float32 input
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "aapo_math.h"
#include "cuda/kernel_math.h"

using aapo::math::SoftmaxStats;
namespace ac = aapo::cuda;
namespace am = aapo::math;

namespace {

constexpr int kThreads = 256;       // csrc/cuda/logprob.cu: stats and backward kernels
constexpr int kFusedThreads = 512;  // csrc/cuda/logprob.cu: fused kernel
constexpr int kWarp = ac::kWarp;

template <typename T>
std::vector<T> read_file(const std::string& path, size_t count) {
  std::vector<T> v(count);
  if (count == 0) return v;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open " + path);
  const size_t got = std::fread(v.data(), sizeof(T), count, f);
  std::fclose(f);
  if (got != count) throw std::runtime_error("short read from " + path);
  return v;
}

template <typename T>
void write_file(const std::string& path, const T* data, size_t count) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write " + path);
  if (count > 0 && std::fwrite(data, sizeof(T), count, f) != count) throw std::runtime_error("short write " + path);
  std::fclose(f);
}

// ------------------------------------------------------------------------------------------------ reductions

// In-place xor butterfly over one warp's 32 values, as __shfl_xor_sync with offsets 16, 8, 4, 2, 1.
template <typename V, typename Op>
void butterfly(V* lanes, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    V next[kWarp];
    for (int l = 0; l < kWarp; ++l) next[l] = op(lanes[l], lanes[l ^ offset]);
    for (int l = 0; l < kWarp; ++l) lanes[l] = next[l];
  }
}

// logprob.cu's block_merge: butterflies per warp, then one butterfly over the warp totals (padded with empties).
SoftmaxStats block_merge(std::vector<SoftmaxStats> s) {
  auto merge = [](SoftmaxStats a, SoftmaxStats b) { return am::softmax_stats_merge(a, b); };
  SoftmaxStats totals[kWarp];
  for (int l = 0; l < kWarp; ++l) totals[l] = am::softmax_stats_empty();
  const int nwarps = static_cast<int>(s.size()) / kWarp;
  for (int w = 0; w < nwarps; ++w) {
    butterfly(s.data() + w * kWarp, merge);
    totals[w] = s[w * kWarp];
  }
  butterfly(totals, merge);
  return totals[0];
}

// ------------------------------------------------------------------------------------------------ advantages

int run_advantages(char** argv) {
  const int64_t n = std::atoll(argv[2]), f = std::atoll(argv[3]), m = std::atoll(argv[4]), g = std::atoll(argv[5]);
  const bool scale = std::atoi(argv[6]) != 0;
  const int64_t pairing = std::atoll(argv[7]);
  const double eps = std::atof(argv[8]), dlow = std::atof(argv[9]), dhigh = std::atof(argv[10]);
  const auto R = read_file<float>(argv[11], n * f);
  const auto w = read_file<float>(argv[12], f);
  const auto Rr = read_file<float>(argv[13], m * f);
  const int64_t b = n / g;
  std::vector<float> r(n), ref(m), adv(n), base(n), mean(b), sd(b), zv(b);
  bool* zvp = new bool[b];

  ac::AdvantageArgs a;
  a.rewards = R.data();
  a.weights = w.data();
  a.ref_rewards = m > 0 ? Rr.data() : nullptr;
  a.num_groups = b;
  a.group_size = g;
  a.ref_group_size = m / b;
  a.num_functions = f;
  a.eps = eps;
  a.scale = scale;
  a.delta_low = dlow;
  a.delta_high = dhigh;
  a.pairing = pairing;
  a.rewards_sum = r.data();
  a.ref_rewards_sum = ref.data();
  a.advantages = adv.data();
  a.advantages_base = base.data();
  a.group_mean = mean.data();
  a.group_std = sd.data();
  a.zero_variance = zvp;

  // advantages.cu's kernel body, one warp per group, lanes in lockstep between the reductions.
  auto sum = [](double x, double y) { return x + y; };
  auto mn = [](double x, double y) { return x < y ? x : y; };
  auto mx = [](double x, double y) { return x > y ? x : y; };
  for (int64_t grp = 0; grp < b; ++grp) {
    double s1[kWarp], lo[kWarp], hi[kWarp], ss[kWarp], rs[kWarp];
    for (int l = 0; l < kWarp; ++l) {
      const ac::LaneMoments lm = ac::advantage_lane_moments(a, grp, l);
      s1[l] = lm.sum;
      lo[l] = lm.lo;
      hi[l] = lm.hi;
    }
    butterfly(s1, sum);
    butterfly(lo, mn);
    butterfly(hi, mx);
    const double mu = s1[0] / static_cast<double>(g);
    for (int l = 0; l < kWarp; ++l) ss[l] = ac::advantage_lane_sq_dev(a, grp, l, mu);
    butterfly(ss, sum);
    const am::GroupStats st = ac::group_stats_finish(mu, ss[0], lo[0], hi[0], g);
    double ref_mean = 0.0;
    if (a.ref_rewards != nullptr) {
      for (int l = 0; l < kWarp; ++l) rs[l] = ac::advantage_lane_ref_sum(a, grp, l);
      butterfly(rs, sum);
      ref_mean = rs[0] / static_cast<double>(a.ref_group_size);
    }
    for (int l = 0; l < kWarp; ++l) ac::advantage_lane_write(a, grp, l, st, ref_mean);
  }
  for (int64_t i = 0; i < b; ++i) zv[i] = zvp[i] ? 1.f : 0.f;
  delete[] zvp;

  std::vector<float> out;
  for (const auto* part : {&r, &ref, &adv, &base, &mean, &sd, &zv}) out.insert(out.end(), part->begin(), part->end());
  write_file(argv[14], out.data(), out.size());
  return 0;
}

int run_reward_sum(char** argv) {
  const int64_t n = std::atoll(argv[2]), f = std::atoll(argv[3]);
  const auto R = read_file<float>(argv[4], n * f);
  const auto w = read_file<float>(argv[5], f);
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = ac::reward_row_sum(R.data(), w.data(), f, i);
  write_file(argv[6], out.data(), out.size());
  return 0;
}

// ------------------------------------------------------------------------------------------------ log-prob

// A 64-byte aligned copy of the logits file, so OFFSET controls each row's alignment exactly as on the device.
template <typename T>
struct AlignedRows {
  T* data = nullptr;
  size_t count = 0;
  explicit AlignedRows(const std::vector<T>& src) : count(src.size()) {
    data = static_cast<T*>(std::aligned_alloc(64, ((count * sizeof(T) + 63) / 64) * 64 + 64));
    std::memcpy(data, src.data(), count * sizeof(T));
  }
  ~AlignedRows() { std::free(data); }
  AlignedRows(const AlignedRows&) = delete;
  AlignedRows& operator=(const AlignedRows&) = delete;
};

template <typename T>
SoftmaxStats block_row_stats(const T* row, int64_t v, int nthreads = kThreads, ac::Words4* cache = nullptr) {
  std::vector<SoftmaxStats> s(nthreads);
  for (int t = 0; t < nthreads; ++t) s[t] = ac::thread_row_stats(row, v, t, nthreads, cache);
  return block_merge(s);
}

template <typename T>
int run_logprob(char** argv) {
  const int64_t n = std::atoll(argv[3]), v = std::atoll(argv[4]), stride = std::atoll(argv[5]);
  const int64_t offset = std::atoll(argv[6]), vocab_start = std::atoll(argv[7]);
  const bool has_ent = std::atoi(argv[8]) != 0;
  const size_t total = static_cast<size_t>(offset + (n - 1) * stride + v);
  const auto logits_in = read_file<T>(argv[9], total);
  const auto target = read_file<int64_t>(argv[10], n);
  const auto row_max = read_file<float>(argv[11], n);
  const auto log_sumexp = read_file<float>(argv[12], n);
  const auto entropy = read_file<float>(argv[13], n);
  const auto grad_logp = read_file<float>(argv[14], n);
  const auto grad_ent = read_file<float>(argv[15], n);
  const std::string dir = argv[16];

  AlignedRows<T> x(logits_in);
  std::vector<float> stats(n * 4), seq(n * 3), grad(n * v), grad_inplace(n * v), fstats(n * 4), fgrad(n * v);
  std::vector<T> out(v);
  for (int64_t i = 0; i < n; ++i) {
    const T* row = x.data + offset + i * stride;
    // logprob.cu shard_stats_kernel
    const SoftmaxStats s = block_row_stats(row, v);
    const int64_t tl = target[i] - vocab_start;
    stats[4 * i + 0] = s.max;
    stats[4 * i + 1] = s.sumexp;
    stats[4 * i + 2] = s.sum_pd;
    stats[4 * i + 3] = (tl >= 0 && tl < v) ? ac::to_float(row[tl]) : 0.f;
    // The header's scalar online path, element by element.
    SoftmaxStats q = am::softmax_stats_empty();
    for (int64_t j = 0; j < v; ++j) am::softmax_stats_add(&q, ac::to_float(row[j]));
    seq[3 * i + 0] = q.max;
    seq[3 * i + 1] = q.sumexp;
    seq[3 * i + 2] = q.sum_pd;
    // logprob.cu shard_backward_kernel, out of place into a NaN-filled row (a missed element stays NaN).
    const int64_t tlb = (tl >= 0 && tl < v) ? tl : -1;
    const float h = has_ent ? entropy[i] : 0.f, ge = has_ent ? grad_ent[i] : 0.f;
    for (int64_t j = 0; j < v; ++j) out[j] = ac::from_float<T>(NAN);
    for (int t = 0; t < kThreads; ++t) {
      ac::thread_row_grad(row, out.data(), v, tlb, row_max[i], log_sumexp[i], h, grad_logp[i], ge, t, kThreads);
    }
    for (int64_t j = 0; j < v; ++j) grad[i * v + j] = ac::to_float(out[j]);
  }
  // In place over a copy of the logits (same alignment).
  {
    AlignedRows<T> y(logits_in);
    for (int64_t i = 0; i < n; ++i) {
      T* row = y.data + offset + i * stride;
      const int64_t tl = target[i] - vocab_start;
      const int64_t tlb = (tl >= 0 && tl < v) ? tl : -1;
      const float h = has_ent ? entropy[i] : 0.f, ge = has_ent ? grad_ent[i] : 0.f;
      for (int t = 0; t < kThreads; ++t) {
        ac::thread_row_grad(row, row, v, tlb, row_max[i], log_sumexp[i], h, grad_logp[i], ge, t, kThreads);
      }
      for (int64_t j = 0; j < v; ++j) grad_inplace[i * v + j] = ac::to_float(row[j]);
    }
  }
  // logprob.cu fused_fwd_bwd_kernel (TP=1: target is a full-vocabulary index), in place, with the row cache
  // (shared memory on the GPU) and without it (second read from global memory).
  std::vector<float> fstats_nc(n * 4), fgrad_nc(n * v);
  for (const bool use_cache : {true, false}) {
    AlignedRows<T> y(logits_in);
    std::vector<ac::Words4> cache(ac::row_cache_bytes<T>(v) / ac::kVecBytes);
    float* fs = use_cache ? fstats.data() : fstats_nc.data();
    float* fg = use_cache ? fgrad.data() : fgrad_nc.data();
    for (int64_t i = 0; i < n; ++i) {
      T* row = y.data + offset + i * stride;
      const int64_t t = target[i];
      const float target_logit = (t >= 0 && t < v) ? ac::to_float(row[t]) : 0.f;
      ac::Words4* c = use_cache ? cache.data() : nullptr;
      const SoftmaxStats s = block_row_stats(static_cast<const T*>(row), v, kFusedThreads, c);
      fs[4 * i + 0] = s.max;
      fs[4 * i + 1] = s.sumexp;
      fs[4 * i + 2] = s.sum_pd;
      fs[4 * i + 3] = target_logit;
      if (use_cache) {  // poison the row's vectors in memory: the gradient pass must take them from the cache
        const ac::RowSplit sp = ac::split_row(static_cast<const T*>(row), v);
        for (int64_t j = sp.head; j < sp.tail_begin; ++j) row[j] = ac::from_float<T>(NAN);
      }
      for (int th = 0; th < kFusedThreads; ++th) {
        ac::thread_row_grad(row, row, v, (t >= 0 && t < v) ? t : int64_t{-1}, s.max, logf(s.sumexp), 0.f,
                            grad_logp[i], 0.f, th, kFusedThreads, c);
      }
      for (int64_t j = 0; j < v; ++j) fg[i * v + j] = ac::to_float(row[j]);
    }
  }
  write_file(dir + "/stats.bin", stats.data(), stats.size());
  write_file(dir + "/seq_stats.bin", seq.data(), seq.size());
  write_file(dir + "/grad.bin", grad.data(), grad.size());
  write_file(dir + "/grad_inplace.bin", grad_inplace.data(), grad_inplace.size());
  write_file(dir + "/fused_stats.bin", fstats.data(), fstats.size());
  write_file(dir + "/fused_grad.bin", fgrad.data(), fgrad.size());
  write_file(dir + "/fused_stats_nocache.bin", fstats_nc.data(), fstats_nc.size());
  write_file(dir + "/fused_grad_nocache.bin", fgrad_nc.data(), fgrad_nc.size());
  return 0;
}

int run_bf16_round(char** argv) {
  const int64_t n = std::atoll(argv[2]);
  const auto in = read_file<float>(argv[3], n);
  std::vector<uint16_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = ac::bf16_from_float(in[i]);
  write_file(argv[4], out.data(), out.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "advantages" && argc == 15) return run_advantages(argv);
    if (mode == "reward_sum" && argc == 7) return run_reward_sum(argv);
    if (mode == "logprob" && argc == 17) {
      const std::string dtype = argv[2];
      if (dtype == "f32") return run_logprob<float>(argv);
      if (dtype == "bf16") return run_logprob<ac::Bf16Bits>(argv);
    }
    if (mode == "bf16_round" && argc == 5) return run_bf16_round(argv);
    std::fprintf(stderr, "usage: see the header of tests/ops/math_header_check.cpp (got mode '%s', %d args)\n",
                 mode.c_str(), argc);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "math_header_check: %s\n", e.what());
    return 1;
  }
}
