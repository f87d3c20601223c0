// Weighted, NaN-ignoring sum of per-function rewards: r[i] = sum_f w[f] * R[i, f]
// over the f where R[i, f] is not NaN (NaN means "this function does not apply").
// A row where every entry is NaN sums to NaN here (so callers can see it); the grouped-advantage op
// (advantages.cpp) instead treats such a row as the empty sum 0, like torch.nansum.
#include <torch/extension.h>

#include <cmath>

#include "aapo_math.h"

namespace aapo {

at::Tensor nan_weighted_reward_sum(const at::Tensor& rewards, const at::Tensor& weights) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [N, F], got ", rewards.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == rewards.size(1),
              "weights must be [F] with F=", rewards.size(1), ", got ", weights.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "rewards and weights must be float32");
  TORCH_CHECK(rewards.device().is_cpu(), "nan_weighted_reward_sum: CPU tensors only");
  const auto R = rewards.contiguous();
  const auto w = weights.contiguous();
  const int64_t n = R.size(0), f = R.size(1);
  auto out = at::empty({n}, R.options());
  const float* rp = R.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t count = 0;
      const double acc = math::nan_weighted_sum(rp + i * f, wp, f, &count);
      op[i] = count > 0 ? static_cast<float>(acc) : NAN;
    }
  });
  return out;
}

}  // namespace aapo

TORCH_LIBRARY_FRAGMENT(aapo, m) {
  m.def("nan_weighted_reward_sum(Tensor rewards, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(aapo, CPU, m) {
  m.impl("nan_weighted_reward_sum", &aapo::nan_weighted_reward_sum);
}
