// Grouped rewards and advantages (docs/algorithms.md), one group per task:
//   r_i   = NaN-ignoring weighted sum of the policy sample's per-function rewards (all-NaN -> 0)
//   r'_i  = the same for the reference samples
//   A_i   = (r_i - mean_g) / (std_g + eps)   [or r_i - mean_g without scaling]   (std: unbiased)
//         + clamp(r_i - ref_i, -delta_low, +delta_high)   when reference rewards are given,
//           ref_i = r'_i (paired) or the mean of the reference group (group_mean).
// Statistics are computed in double and stored as float32.
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "aapo_math.h"

namespace aapo {

namespace {

void check_rewards(const at::Tensor& t, const char* name, int64_t num_functions) {
  TORCH_CHECK(t.device().is_cpu(), "grouped_advantages: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "grouped_advantages: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "grouped_advantages: ", name, " must be [num_samples, num_functions], got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) == num_functions, "grouped_advantages: ", name, " has ", t.size(1),
              " reward functions but weights has ", num_functions);
}

// Row sums of a [N, F] reward matrix into double, all-NaN rows -> 0.
void row_sums(const float* R, const float* w, int64_t f, int64_t begin, int64_t end, double* out) {
  for (int64_t i = begin; i < end; ++i) {
    int64_t count = 0;
    out[i - begin] = math::nan_weighted_sum(R + i * f, w, f, &count);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_advantages(
    const at::Tensor& rewards, const at::Tensor& weights, const std::optional<at::Tensor>& ref_rewards,
    int64_t group_size, double eps, bool scale, double delta_low, double delta_high, int64_t pairing) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.dim() == 1,
              "grouped_advantages: weights must be a 1-D float32 CPU tensor [num_functions], got ",
              weights.scalar_type(), " ", weights.sizes());
  const int64_t f = weights.size(0);
  TORCH_CHECK(f >= 1, "grouped_advantages: need at least one reward function (weights is empty)");
  check_rewards(rewards, "rewards", f);
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

  const float* rp = R.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rrp = has_ref ? R_ref.data_ptr<float>() : nullptr;
  float* r_o = r_out.data_ptr<float>();
  float* ref_o = has_ref ? ref_out.data_ptr<float>() : nullptr;
  float* a_o = adv.data_ptr<float>();
  float* ab_o = adv_base.data_ptr<float>();
  float* mu_o = mean_out.data_ptr<float>();
  float* sd_o = std_out.data_ptr<float>();
  bool* zv_o = zero_var.data_ptr<bool>();
  const int64_t g = group_size;

  at::parallel_for(0, b, 256, [&](int64_t gb, int64_t ge) {
    std::vector<double> r(g), rr(has_ref ? ref_group : 0);
    for (int64_t grp = gb; grp < ge; ++grp) {
      row_sums(rp, wp, f, grp * g, (grp + 1) * g, r.data());
      const math::GroupStats s = math::group_stats(r.data(), g);
      double ref_mean = 0.0;
      if (has_ref) {
        row_sums(rrp, wp, f, grp * ref_group, (grp + 1) * ref_group, rr.data());
        for (int64_t j = 0; j < ref_group; ++j) {
          ref_o[grp * ref_group + j] = static_cast<float>(rr[j]);
          ref_mean += rr[j];
        }
        ref_mean /= static_cast<double>(ref_group);
      }
      mu_o[grp] = static_cast<float>(s.mean);
      sd_o[grp] = static_cast<float>(s.std);
      zv_o[grp] = s.zero_variance;
      for (int64_t j = 0; j < g; ++j) {
        const int64_t i = grp * g + j;
        const double base = math::base_advantage(r[j], s, scale, eps);
        double a = base;
        if (has_ref) {
          const double ref = pairing == math::kPaired ? rr[j] : ref_mean;
          a += math::advantage_margin(r[j], ref, delta_low, delta_high);
        }
        r_o[i] = static_cast<float>(r[j]);
        ab_o[i] = static_cast<float>(base);
        a_o[i] = static_cast<float>(a);
      }
    }
  });
  return {r_out, ref_out, adv, adv_base, mean_out, std_out, zero_var};
}

}  // namespace aapo

TORCH_LIBRARY_FRAGMENT(aapo, m) {
  m.def(
      "grouped_advantages(Tensor rewards, Tensor weights, Tensor? ref_rewards, int group_size, float eps, "
      "bool scale, float delta_low, float delta_high, int pairing) -> "
      "(Tensor rewards_sum, Tensor ref_rewards_sum, Tensor advantages, Tensor advantages_no_margin, "
      "Tensor group_mean, Tensor group_std, Tensor zero_variance)");
}

TORCH_LIBRARY_IMPL(aapo, CPU, m) {
  m.impl("grouped_advantages", &aapo::grouped_advantages);
}
