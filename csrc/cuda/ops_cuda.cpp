// CUDA implementations of the torch.ops.aapo operators, registered for the CUDA dispatch key under the schemas the
// CPU kernels define (csrc/advantages.cpp, csrc/reward_sum.cpp, csrc/logprob.cpp), so torch.ops.aapo.<op> runs here
// for CUDA tensors. Argument checks mirror the CPU ones (same messages, "CUDA" for "CPU"); the kernels themselves
// (csrc/cuda/*.cu) take raw pointers and the current stream. Compiled only in CUDA builds (setup.py).
#ifdef AAPO_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "aapo_math.h"
#include "cuda/launch.h"

namespace aapo {
namespace cuda_ops {

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_same_device(const at::Tensor& t, const at::Tensor& anchor, const char* op, const char* name,
                       const char* anchor_name) {
  TORCH_CHECK(t.device() == anchor.device(), op, ": ", name, " must be on ", anchor_name, "'s device ",
              anchor.device(), ", got ", t.device());
}

// ------------------------------------------------------------------------------------------------ rewards

void check_rewards(const at::Tensor& t, const char* name, int64_t num_functions) {
  TORCH_CHECK(t.device().is_cuda(), "grouped_advantages: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "grouped_advantages: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "grouped_advantages: ", name, " must be [num_samples, num_functions], got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) == num_functions, "grouped_advantages: ", name, " has ", t.size(1),
              " reward functions but weights has ", num_functions);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_advantages(
    const at::Tensor& rewards, const at::Tensor& weights, const std::optional<at::Tensor>& ref_rewards,
    int64_t group_size, double eps, bool scale, double delta_low, double delta_high, int64_t pairing) {
  const char* op = "grouped_advantages";
  TORCH_CHECK(weights.device().is_cuda() && weights.scalar_type() == at::kFloat && weights.dim() == 1,
              "grouped_advantages: weights must be a 1-D float32 CUDA tensor [num_functions], got ",
              weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  const int64_t f = weights.size(0);
  TORCH_CHECK(f >= 1, "grouped_advantages: need at least one reward function (weights is empty)");
  check_rewards(rewards, "rewards", f);
  check_same_device(weights, rewards, op, "weights", "rewards");
  TORCH_CHECK(group_size >= 1, "grouped_advantages: group_size must be >= 1, got ", group_size);
  const int64_t n = rewards.size(0);
  TORCH_CHECK(n > 0, "grouped_advantages: rewards is empty");
  TORCH_CHECK(n % group_size == 0, "grouped_advantages: number of samples ", n,
              " (B*G) is not divisible by group_size G=", group_size);
  TORCH_CHECK(!(scale && group_size == 1), "grouped_advantages: group_size G=1 with std scaling: the unbiased "
              "std of a single sample is undefined; use G >= 2 or scale_rewards=False");
  TORCH_CHECK(eps >= 0.0, "grouped_advantages: eps must be >= 0, got ", eps);
  TORCH_CHECK(delta_low >= 0.0 && delta_high >= 0.0,
              "grouped_advantages: delta_low and delta_high must be >= 0, got ", delta_low, " and ", delta_high);
  TORCH_CHECK(pairing == math::kPaired || pairing == math::kGroupMean,
              "grouped_advantages: pairing must be 0 (paired) or 1 (group_mean), got ", pairing);
  const int64_t b = n / group_size;

  const bool has_ref = ref_rewards.has_value() && ref_rewards->defined();
  int64_t ref_group = 0;
  at::Tensor R_ref;
  if (has_ref) {
    check_rewards(*ref_rewards, "ref_rewards", f);
    check_same_device(*ref_rewards, rewards, op, "ref_rewards", "rewards");
    const int64_t m = ref_rewards->size(0);
    if (pairing == math::kPaired) {
      TORCH_CHECK(m == n, "grouped_advantages: paired reference needs one reference sample per policy sample: "
                  "ref_rewards has ", m, " rows, rewards has ", n);
    } else {
      TORCH_CHECK(m > 0 && m % b == 0, "grouped_advantages: group_mean reference needs the same number of groups "
                  "(B=", b, "): ref_rewards has ", m, " rows, not a positive multiple of B");
    }
    ref_group = m / b;
    R_ref = ref_rewards->contiguous();
  }

  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto R = rewards.contiguous();
  const auto w = weights.contiguous();
  auto f32 = R.options();
  at::Tensor r_out = at::empty({n}, f32);
  at::Tensor ref_out = at::empty({has_ref ? b * ref_group : 0}, f32);
  at::Tensor adv = at::empty({n}, f32);
  at::Tensor adv_base = at::empty({n}, f32);
  at::Tensor mean_out = at::empty({b}, f32);
  at::Tensor std_out = at::empty({b}, f32);
  at::Tensor zero_var = at::empty({b}, f32.dtype(at::kBool));

  cuda::AdvantageArgs a;
  a.rewards = R.data_ptr<float>();
  a.weights = w.data_ptr<float>();
  a.ref_rewards = has_ref ? R_ref.data_ptr<float>() : nullptr;
  a.num_groups = b;
  a.group_size = group_size;
  a.ref_group_size = ref_group;
  a.num_functions = f;
  a.eps = eps;
  a.scale = scale;
  a.delta_low = delta_low;
  a.delta_high = delta_high;
  a.pairing = pairing;
  a.rewards_sum = r_out.data_ptr<float>();
  a.ref_rewards_sum = has_ref ? ref_out.data_ptr<float>() : nullptr;
  a.advantages = adv.data_ptr<float>();
  a.advantages_base = adv_base.data_ptr<float>();
  a.group_mean = mean_out.data_ptr<float>();
  a.group_std = std_out.data_ptr<float>();
  a.zero_variance = zero_var.data_ptr<bool>();
  C10_CUDA_CHECK(cuda::launch_grouped_advantages(a, current_stream(R)));
  return {r_out, ref_out, adv, adv_base, mean_out, std_out, zero_var};
}

at::Tensor nan_weighted_reward_sum(const at::Tensor& rewards, const at::Tensor& weights) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [N, F], got ", rewards.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == rewards.size(1),
              "weights must be [F] with F=", rewards.size(1), ", got ", weights.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "rewards and weights must be float32");
  TORCH_CHECK(rewards.device().is_cuda() && weights.device() == rewards.device(),
              "nan_weighted_reward_sum: rewards and weights must be CUDA tensors on one device, got ",
              rewards.device(), " and ", weights.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto R = rewards.contiguous();
  const auto w = weights.contiguous();
  auto out = at::empty({R.size(0)}, R.options());
  C10_CUDA_CHECK(cuda::launch_nan_weighted_reward_sum(R.data_ptr<float>(), w.data_ptr<float>(), R.size(0), R.size(1),
                                                      out.data_ptr<float>(), current_stream(R)));
  return out;
}

// ------------------------------------------------------------------------------------------------ log-prob

namespace {

cuda::LogitsView check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, op,
              ": logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V/tp], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits has an empty vocabulary dimension");
  TORCH_CHECK(logits.stride(1) == 1 && (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)), op,
              ": logits rows must be contiguous (stride(1) == 1), got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= static_cast<int64_t>(INT32_MAX), op, ": ", logits.size(0),
              " rows exceed one launch's grid (one block per row, at most 2^31 - 1)");
  cuda::LogitsView x;
  x.data = logits.data_ptr();
  x.bf16 = logits.scalar_type() == at::kBFloat16;
  x.n = logits.size(0);
  x.v = logits.size(1);
  x.stride = logits.size(0) <= 1 ? logits.size(1) : logits.stride(0);
  return x;
}

// Validates target on the device; reporting a bad index costs one device-to-host sync per call.
at::Tensor check_target(const at::Tensor& target, const at::Tensor& logits, int64_t n, int64_t vocab_size,
                        const char* op) {
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device ", logits.device(),
              ", got ", target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, op, ": target must be [N] with N=", n,
              " (rows of logits), got shape ", target.sizes());
  auto t = target.contiguous();
  if (n > 0) {
    const at::Tensor bad = t.lt(0).logical_or_(t.ge(vocab_size));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.to(at::kFloat).argmax().item<int64_t>();  // the first bad index
      TORCH_CHECK(false, op, ": target[", i, "] = ", t[i].item<int64_t>(), " is outside the vocabulary [0, ",
                  vocab_size, ")");
    }
  }
  return t;
}

at::Tensor check_row_vector(const at::Tensor& t, const at::Tensor& logits, int64_t n, const char* name,
                            const char* op) {
  TORCH_CHECK(t.device() == logits.device() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n, op,
              ": ", name, " must be a float32 tensor [N] with N=", n, " on ", logits.device(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

void check_shard(int64_t vocab_start, int64_t v, int64_t vocab_size, const char* op) {
  TORCH_CHECK(vocab_start >= 0 && vocab_start + v <= vocab_size, op, ": shard [", vocab_start, ", ",
              vocab_start + v, ") does not fit in the vocabulary [0, ", vocab_size, ")");
}

int64_t check_grad_out(const at::Tensor& grad_out, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(grad_out.sizes() == logits.sizes() && grad_out.scalar_type() == logits.scalar_type() &&
                  grad_out.device() == logits.device(),
              op, ": grad_out must match logits (", logits.scalar_type(), " ", logits.sizes(), "), got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(grad_out.stride(1) == 1, op, ": grad_out rows must be contiguous, got strides ", grad_out.strides());
  return logits.size(0) <= 1 ? logits.size(1) : grad_out.stride(0);
}

}  // namespace

// [N, 4] float32: (shard max, sumexp, sum_pd, target logit or 0 when the target is not in [vocab_start, +V)).
at::Tensor logprob_shard_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                               int64_t vocab_size) {
  const char* op = "logprob_shard_stats";
  const cuda::LogitsView x = check_logits(logits, op);
  check_shard(vocab_start, x.v, vocab_size, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor t = check_target(target, logits, x.n, vocab_size, op);
  at::Tensor stats = at::empty({x.n, 4}, logits.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_logprob_shard_stats(x, t.data_ptr<int64_t>(), vocab_start, stats.data_ptr<float>(),
                                                  current_stream(logits)));
  return stats;
}

// Writes d(sum_i g_logp[i] * logp[i] + g_ent[i] * H[i]) / d logits into grad_out (which may alias logits).
void logprob_shard_backward(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                            int64_t vocab_size, const at::Tensor& row_max, const at::Tensor& log_sumexp,
                            const at::Tensor& entropy, const at::Tensor& grad_logp,
                            const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad_out) {
  const char* op = "logprob_shard_backward";
  const cuda::LogitsView x = check_logits(logits, op);
  check_shard(vocab_start, x.v, vocab_size, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor t = check_target(target, logits, x.n, vocab_size, op);
  const at::Tensor mx = check_row_vector(row_max, logits, x.n, "row_max", op);
  const at::Tensor ls = check_row_vector(log_sumexp, logits, x.n, "log_sumexp", op);
  const at::Tensor h = check_row_vector(entropy, logits, x.n, "entropy", op);
  const at::Tensor gl = check_row_vector(grad_logp, logits, x.n, "grad_logp", op);
  const bool with_ent = grad_entropy.has_value() && grad_entropy->defined();
  const at::Tensor ge = with_ent ? check_row_vector(*grad_entropy, logits, x.n, "grad_entropy", op) : at::Tensor();
  const int64_t out_stride = check_grad_out(grad_out, logits, op);
  C10_CUDA_CHECK(cuda::launch_logprob_shard_backward(
      x, t.data_ptr<int64_t>(), vocab_start, mx.data_ptr<float>(), ls.data_ptr<float>(), h.data_ptr<float>(),
      gl.data_ptr<float>(), with_ent ? ge.data_ptr<float>() : nullptr, grad_out.data_ptr(), out_stride,
      current_stream(logits)));
}

// TP=1, full vocabulary: stats [N, 4] as above, and grad_out = d(grad_logp * log p(target)) / d logits, row by row.
at::Tensor logprob_fused_fwd_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad_logp,
                                 const at::Tensor& grad_out) {
  const char* op = "logprob_fused_fwd_bwd";
  const cuda::LogitsView x = check_logits(logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor t = check_target(target, logits, x.n, x.v, op);
  const at::Tensor gl = check_row_vector(grad_logp, logits, x.n, "grad_logp", op);
  const int64_t out_stride = check_grad_out(grad_out, logits, op);
  at::Tensor stats = at::empty({x.n, 4}, logits.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_logprob_fused_fwd_bwd(x, t.data_ptr<int64_t>(), gl.data_ptr<float>(),
                                                    stats.data_ptr<float>(), grad_out.data_ptr(), out_stride,
                                                    current_stream(logits)));
  return stats;
}

}  // namespace cuda_ops
}  // namespace aapo

// The schemas are defined once, by the CPU translation units (TORCH_LIBRARY_FRAGMENT(aapo, ...)).
TORCH_LIBRARY_IMPL(aapo, CUDA, m) {
  m.impl("grouped_advantages", &aapo::cuda_ops::grouped_advantages);
  m.impl("nan_weighted_reward_sum", &aapo::cuda_ops::nan_weighted_reward_sum);
  m.impl("logprob_shard_stats", &aapo::cuda_ops::logprob_shard_stats);
  m.impl("logprob_shard_backward", &aapo::cuda_ops::logprob_shard_backward);
  m.impl("logprob_fused_fwd_bwd", &aapo::cuda_ops::logprob_fused_fwd_bwd);
}

#endif  // AAPO_WITH_CUDA
