// Weighted, NaN-ignoring sum of per-function rewards: r[i] = sum_f w[f] * R[i, f]
// over the f where R[i, f] is not NaN (NaN means "this function does not apply").
// A row where every entry is NaN sums to NaN.
#include <torch/extension.h>

#include <cmath>

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
      float acc = 0.f;
      bool any = false;
      for (int64_t j = 0; j < f; ++j) {
        const float v = rp[i * f + j];
        if (!std::isnan(v)) {
          acc += wp[j] * v;
          any = true;
        }
      }
      op[i] = any ? acc : NAN;
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
