// Vocab-parallel token log-prob and entropy over logits [N, V/tp] (fp32 or bf16), forward and backward
// (docs/train-step.md). Never makes an fp32 copy of the logits; accumulates in fp32.
//
//   logprob_shard_stats     one read: per row of this rank's shard, (max, sumexp, sum_pd, target logit)
//                           (sumexp/sum_pd relative to the shard max, see aapo_math.h). The TP all-reduces and
//                           the finalisation (log Z, log p, H) run in Python on an explicitly passed group.
//   logprob_shard_backward  one read + one write: grad = g_logp * onehot - p * (g_logp + g_ent * (log p_j + H)),
//                           log p_j = (x_j - max) - log sumexp (exact for large common offsets),
//                           written to `grad_out`, which may be the logits buffer itself (in-place backward).
//   logprob_fused_fwd_bwd   TP=1 with dL/dlogp known before the forward: stats then gradient per row while the
//                           row is still in cache (one DRAM read + one write in total), reusing the forward's
//                           exponentials from a per-thread fp32 row scratch (one exp per logit in total).
//
// exp is ATen's vectorised exp_u20 (documented ULP bound 20; the measured error is asserted in
// tests/ops/test_logprob.py::test_vectorised_exp_error).

// Select at::vec's ISA specialisation from the compiler's target (setup.py builds with -march=native);
// without these macros at::vec falls back to its scalar generic code.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#include <torch/extension.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "aapo_math.h"

namespace aapo {

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kChunk = 2 * kVec;  // elements per vector step (two float vectors = one bf16 vector)
constexpr int64_t kBlock = 4096;      // elements per L1-resident block of the stats pass (multiple of kChunk)

inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kVec);
}
inline void load2(const at::BFloat16* p, Vec& a, Vec& b) { at::vec::load_to_float<at::BFloat16>(p, a, b); }
inline void store2(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kVec);
}
inline void store2(at::BFloat16* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<at::BFloat16>(a, b).store(p);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// Stats of one row x[0, v) relative to its max, blocked so the exp pass re-reads the block from L1.
// With kKeep, also stores e_j = exp(x_j - ref_b) in keep[0, v) (fp32 scratch) and each block's reference max ref_b
// in block_ref (-inf for a block skipped as all -inf, whose e_j are 0), so a fused gradient pass needs no exp.
template <typename scalar_t, bool kKeep = false>
math::SoftmaxStats row_stats(const scalar_t* x, int64_t v, float* keep = nullptr, float* block_ref = nullptr) {
  float m = -INFINITY;
  Vec s0(0.f), s1(0.f), p0(0.f), p1(0.f);
  float s_tail = 0.f, p_tail = 0.f;
  const Vec lo(math::kMinShift);
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t len = std::min(kBlock, v - start);
    const int64_t nvec = len - len % kChunk;
    const scalar_t* xb = x + start;
    Vec mx0(-INFINITY), mx1(-INFINITY), a, b;
    for (int64_t j = 0; j < nvec; j += kChunk) {
      load2(xb + j, a, b);
      mx0 = at::vec::maximum(mx0, a);
      mx1 = at::vec::maximum(mx1, b);
    }
    float bm = hmax(at::vec::maximum(mx0, mx1));
    for (int64_t j = nvec; j < len; ++j) bm = std::max(bm, static_cast<float>(xb[j]));
    if (bm > m) {  // new reference max: rebase the vector accumulators (one exp per block, not per element)
      if (m != -INFINITY) {
        const float delta = m - bm;
        const Vec av(std::exp(delta)), dv(delta);
        p0 = av * at::vec::fmadd(dv, s0, p0);
        p1 = av * at::vec::fmadd(dv, s1, p1);
        s0 = av * s0;
        s1 = av * s1;
      }
      m = bm;
    }
    if (m == -INFINITY) {  // everything so far is -inf
      if constexpr (kKeep) {
        std::fill(keep + start, keep + start + len, 0.f);
        block_ref[start / kBlock] = -INFINITY;
      }
      continue;
    }
    if constexpr (kKeep) block_ref[start / kBlock] = m;
    const Vec mv(m);
    for (int64_t j = 0; j < nvec; j += kChunk) {
      load2(xb + j, a, b);
      const Vec d0 = at::vec::maximum(a - mv, lo), d1 = at::vec::maximum(b - mv, lo);
      const Vec e0 = d0.exp_u20(), e1 = d1.exp_u20();
      s0 = s0 + e0;
      s1 = s1 + e1;
      p0 = at::vec::fmadd(e0, d0, p0);
      p1 = at::vec::fmadd(e1, d1, p1);
      if constexpr (kKeep) {
        e0.store(keep + start + j);
        e1.store(keep + start + j + kVec);
      }
    }
    // Only the last block can have a tail (kBlock is a multiple of kChunk), so m is final here.
    for (int64_t j = nvec; j < len; ++j) {
      const float d = math::finite_shift(static_cast<float>(xb[j]), m);
      const float e = std::exp(d);
      s_tail += e;
      p_tail += e * d;
      if constexpr (kKeep) keep[start + j] = e;
    }
  }
  math::SoftmaxStats st;
  st.max = m;
  st.sumexp = m == -INFINITY ? 0.f : hsum(s0 + s1) + s_tail;
  st.sum_pd = m == -INFINITY ? 0.f : hsum(p0 + p1) + p_tail;
  return st;
}

// grad[j] = d/dx_j (g_logp * log p(target) + g_ent * H) for one row; `target_local` < 0 when not in this shard.
// The row's full-vocabulary (max, log sumexp) give log p_j = (x_j - max) - log sumexp.
template <typename scalar_t>
void row_grad(const scalar_t* x, scalar_t* out, int64_t v, int64_t target_local, float row_max, float log_sumexp,
              float entropy, float g_logp, float g_ent, bool with_entropy) {
  // Read the target logit first: `out` may alias `x` (in-place backward).
  const float x_target = target_local >= 0 ? static_cast<float>(x[target_local]) : 0.f;
  const int64_t nvec = v - v % kChunk;
  const Vec mv(row_max), ls(log_sumexp), ngl(-g_logp), ge(g_ent), hv(entropy), lo(math::kMinShift);
  Vec a, b;
  if (with_entropy) {
    for (int64_t j = 0; j < nvec; j += kChunk) {
      load2(x + j, a, b);
      const Vec d0 = at::vec::maximum((a - mv) - ls, lo), d1 = at::vec::maximum((b - mv) - ls, lo);
      const Vec q0 = d0.exp_u20(), q1 = d1.exp_u20();
      store2(out + j, q0 * (ngl - ge * (d0 + hv)), q1 * (ngl - ge * (d1 + hv)));
    }
  } else {
    for (int64_t j = 0; j < nvec; j += kChunk) {
      load2(x + j, a, b);
      const Vec q0 = at::vec::maximum((a - mv) - ls, lo).exp_u20(), q1 = at::vec::maximum((b - mv) - ls, lo).exp_u20();
      store2(out + j, q0 * ngl, q1 * ngl);
    }
  }
  const float g_e = with_entropy ? g_ent : 0.f;
  for (int64_t j = nvec; j < v; ++j) {
    const float lp = math::log_softmax_value(static_cast<float>(x[j]), row_max, log_sumexp);
    out[j] = static_cast<scalar_t>(math::logprob_entropy_grad(lp, std::exp(lp), false, entropy, g_logp, g_e));
  }
  if (target_local >= 0) {
    const float lp = math::log_softmax_value(x_target, row_max, log_sumexp);
    out[target_local] =
        static_cast<scalar_t>(math::logprob_entropy_grad(lp, std::exp(lp), true, entropy, g_logp, g_e));
  }
}

// The fused pass's gradient g_logp * (onehot - p) from the kept exponentials of row_stats<.., true>:
// p_j = e_j * exp(ref_b - max) / sumexp. One read of the fp32 scratch (in cache) and one write, no exp per element.
template <typename scalar_t>
void row_grad_from_kept(const float* keep, const float* block_ref, scalar_t* out, int64_t v, int64_t target,
                        math::SoftmaxStats st, float g_logp) {
  float p_target = 0.f;
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t len = std::min(kBlock, v - start);
    const int64_t nvec = len - len % kChunk;
    const float ref = block_ref[start / kBlock];
    const float scale = ref == -INFINITY ? 0.f : std::exp(ref - st.max) / st.sumexp;  // e_j -> p_j
    const Vec sv(-g_logp * scale);
    const float* kb = keep + start;
    scalar_t* ob = out + start;
    for (int64_t j = 0; j < nvec; j += kChunk) store2(ob + j, Vec::loadu(kb + j) * sv, Vec::loadu(kb + j + kVec) * sv);
    for (int64_t j = nvec; j < len; ++j) ob[j] = static_cast<scalar_t>(-g_logp * scale * kb[j]);
    if (target >= start && target < start + len) p_target = scale * kb[target - start];
  }
  out[target] = static_cast<scalar_t>(math::logprob_entropy_grad(0.f, p_target, true, 0.f, g_logp, 0.f));
}

struct RowLayout {
  int64_t n;
  int64_t v;
  int64_t stride;
};

RowLayout check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, op,
              ": logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V/tp], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits has an empty vocabulary dimension");
  TORCH_CHECK(logits.stride(1) == 1 && (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)), op,
              ": logits rows must be contiguous (stride(1) == 1), got strides ", logits.strides());
  return {logits.size(0), logits.size(1), logits.size(0) <= 1 ? logits.size(1) : logits.stride(0)};
}

at::Tensor check_target(const at::Tensor& target, int64_t n, int64_t vocab_size, const char* op) {
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be a CPU tensor, got ", target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, op, ": target must be [N] with N=", n,
              " (rows of logits), got shape ", target.sizes());
  auto t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < vocab_size, op, ": target[", i, "] = ", tp[i],
                " is outside the vocabulary [0, ", vocab_size, ")");
  }
  return t;
}

void check_row_vector(const at::Tensor& t, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n, op, ": ",
              name, " must be a float32 CPU tensor [N] with N=", n, ", got ", t.scalar_type(), " ", t.sizes());
}

void check_shard(int64_t vocab_start, int64_t v, int64_t vocab_size, const char* op) {
  TORCH_CHECK(vocab_start >= 0 && vocab_start + v <= vocab_size, op, ": shard [", vocab_start, ", ",
              vocab_start + v, ") does not fit in the vocabulary [0, ", vocab_size, ")");
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(grad_out.sizes() == logits.sizes() && grad_out.scalar_type() == logits.scalar_type() &&
                  grad_out.device() == logits.device(),
              op, ": grad_out must match logits (", logits.scalar_type(), " ", logits.sizes(), "), got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(grad_out.stride(1) == 1, op, ": grad_out rows must be contiguous, got strides ", grad_out.strides());
}

// Calls fn(scalar_t{}) with scalar_t = float or at::BFloat16 (the dtypes check_logits admits).
template <typename Fn>
void dispatch_logits(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(at::BFloat16{});
  }
}

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, 16384 / v); }

}  // namespace

// [N, 4] float32: (shard max, sumexp, sum_pd, target logit or 0 when the target is not in [vocab_start, +V)).
at::Tensor logprob_shard_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                               int64_t vocab_size) {
  const char* op = "logprob_shard_stats";
  const RowLayout L = check_logits(logits, op);
  check_shard(vocab_start, L.v, vocab_size, op);
  const at::Tensor t = check_target(target, L.n, vocab_size, op);
  at::Tensor stats = at::empty({L.n, 4}, logits.options().dtype(at::kFloat));
  float* sp = stats.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, L.n, grain_rows(L.v), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = x + i * L.stride;
        const math::SoftmaxStats st = row_stats(row, L.v);
        const int64_t tl = tp[i] - vocab_start;
        sp[4 * i + 0] = st.max;
        sp[4 * i + 1] = st.sumexp;
        sp[4 * i + 2] = st.sum_pd;
        sp[4 * i + 3] = (tl >= 0 && tl < L.v) ? static_cast<float>(row[tl]) : 0.f;
      }
    });
  });
  return stats;
}

// Writes d(sum_i g_logp[i] * logp[i] + g_ent[i] * H[i]) / d logits into grad_out (which may alias logits).
void logprob_shard_backward(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                            int64_t vocab_size, const at::Tensor& row_max, const at::Tensor& log_sumexp,
                            const at::Tensor& entropy,
                            const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& grad_out) {
  const char* op = "logprob_shard_backward";
  const RowLayout L = check_logits(logits, op);
  check_shard(vocab_start, L.v, vocab_size, op);
  const at::Tensor t = check_target(target, L.n, vocab_size, op);
  check_row_vector(row_max, L.n, "row_max", op);
  check_row_vector(log_sumexp, L.n, "log_sumexp", op);
  check_row_vector(entropy, L.n, "entropy", op);
  check_row_vector(grad_logp, L.n, "grad_logp", op);
  const bool with_ent = grad_entropy.has_value() && grad_entropy->defined();
  if (with_ent) check_row_vector(*grad_entropy, L.n, "grad_entropy", op);
  check_grad_out(grad_out, logits, op);
  const auto mx = row_max.contiguous(), ls = log_sumexp.contiguous(), h = entropy.contiguous();
  const auto gl = grad_logp.contiguous();
  const auto ge = with_ent ? grad_entropy->contiguous() : at::Tensor();
  const float* mxp = mx.data_ptr<float>();
  const float* lsp = ls.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* glp = gl.data_ptr<float>();
  const float* gep = with_ent ? ge.data_ptr<float>() : nullptr;
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t out_stride = L.n <= 1 ? L.v : grad_out.stride(0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* o = grad_out.data_ptr<scalar_t>();
    at::parallel_for(0, L.n, grain_rows(L.v), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t tl = tp[i] - vocab_start;
        row_grad(x + i * L.stride, o + i * out_stride, L.v, (tl >= 0 && tl < L.v) ? tl : -1, mxp[i], lsp[i], hp[i], glp[i],
                 with_ent ? gep[i] : 0.f, with_ent);
      }
    });
  });
}

// TP=1, full vocabulary: stats [N, 4] as above, and grad_out = grad_logp[:, None] * (onehot - softmax), row by row.
at::Tensor logprob_fused_fwd_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad_logp,
                                 const at::Tensor& grad_out) {
  const char* op = "logprob_fused_fwd_bwd";
  const RowLayout L = check_logits(logits, op);
  const at::Tensor t = check_target(target, L.n, L.v, op);
  check_row_vector(grad_logp, L.n, "grad_logp", op);
  check_grad_out(grad_out, logits, op);
  const auto gl = grad_logp.contiguous();
  const float* glp = gl.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t out_stride = L.n <= 1 ? L.v : grad_out.stride(0);
  at::Tensor stats = at::empty({L.n, 4}, logits.options().dtype(at::kFloat));
  float* sp = stats.data_ptr<float>();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* o = grad_out.data_ptr<scalar_t>();
    at::parallel_for(0, L.n, grain_rows(L.v), [&](int64_t begin, int64_t end) {
      std::vector<float> keep(L.v), block_ref((L.v + kBlock - 1) / kBlock);  // per-thread fp32 scratch, one row
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = x + i * L.stride;
        const math::SoftmaxStats st = row_stats<scalar_t, true>(row, L.v, keep.data(), block_ref.data());
        sp[4 * i + 0] = st.max;
        sp[4 * i + 1] = st.sumexp;
        sp[4 * i + 2] = st.sum_pd;
        sp[4 * i + 3] = static_cast<float>(row[tp[i]]);  // read before a possible in-place write
        row_grad_from_kept(keep.data(), block_ref.data(), o + i * out_stride, L.v, tp[i], st, glp[i]);
      }
    });
  });
  return stats;
}

// Vectorised exp_u20 applied elementwise (float32), exposed so the tests can measure its error.
at::Tensor vec_exp_u20(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "vec_exp_u20: x must be a float32 CPU tensor");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = xc.numel(), nvec = n - n % kVec;
  for (int64_t j = 0; j < nvec; j += kVec) Vec::loadu(xp + j).exp_u20().store(op + j);
  if (nvec < n) {
    float buf[kVec] = {0.f};
    std::copy(xp + nvec, xp + n, buf);
    Vec::loadu(buf).exp_u20().store(buf);
    std::copy(buf, buf + (n - nvec), op + nvec);
  }
  return out;
}

}  // namespace aapo

TORCH_LIBRARY_FRAGMENT(aapo, m) {
  m.def("logprob_shard_stats(Tensor logits, Tensor target, int vocab_start, int vocab_size) -> Tensor");
  m.def(
      "logprob_shard_backward(Tensor logits, Tensor target, int vocab_start, int vocab_size, Tensor row_max, "
      "Tensor log_sumexp, "
      "Tensor entropy, Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) grad_out) -> ()");
  m.def("logprob_fused_fwd_bwd(Tensor logits, Tensor target, Tensor grad_logp, Tensor(a!) grad_out) -> Tensor");
  m.def("vec_exp_u20(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(aapo, CPU, m) {
  m.impl("logprob_shard_stats", &aapo::logprob_shard_stats);
  m.impl("logprob_shard_backward", &aapo::logprob_shard_backward);
  m.impl("logprob_fused_fwd_bwd", &aapo::logprob_fused_fwd_bwd);
  m.impl("vec_exp_u20", &aapo::vec_exp_u20);
}
