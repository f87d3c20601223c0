// CUDA grouped rewards and advantages (docs/algorithms.md): one warp per group of G samples.
// Lanes take samples j = lane, lane + 32, ...; per-lane passes are in kernel_math.h, and the group statistics are
// reduced with warp shuffles (xor butterflies, so every lane ends with the total). Double precision throughout, stored
// as float32, like the CPU kernel (csrc/advantages.cpp).
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace aapo {
namespace cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ double warp_sum(double x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
__device__ __forceinline__ double warp_min(double x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmin(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
__device__ __forceinline__ double warp_max(double x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmax(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// grid: ceil(B / kWarpsPerBlock) blocks of kWarpsPerBlock warps; warp w of block b handles group b * 8 + w.
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp) grouped_advantages_kernel(AdvantageArgs a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + static_cast<int64_t>(threadIdx.x) / kWarp;
  if (grp >= a.num_groups) return;  // whole warps exit together: the shuffles below see full warps

  const LaneMoments m = advantage_lane_moments(a, grp, lane);
  const double mean = warp_sum(m.sum) / static_cast<double>(a.group_size);
  const double lo = warp_min(m.lo), hi = warp_max(m.hi);
  const double ss = warp_sum(advantage_lane_sq_dev(a, grp, lane, mean));
  const math::GroupStats s = group_stats_finish(mean, ss, lo, hi, a.group_size);
  double ref_mean = 0.0;
  if (a.ref_rewards != nullptr) {
    ref_mean = warp_sum(advantage_lane_ref_sum(a, grp, lane)) / static_cast<double>(a.ref_group_size);
  }
  advantage_lane_write(a, grp, lane, s, ref_mean);
}

__global__ void nan_weighted_reward_sum_kernel(const float* rewards, const float* w, int64_t n, int64_t f,
                                               float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = reward_row_sum(rewards, w, f, i);
}

}  // namespace

cudaError_t launch_grouped_advantages(const AdvantageArgs& args, cudaStream_t stream) {
  if (args.num_groups == 0) return cudaSuccess;
  const int64_t blocks = (args.num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  grouped_advantages_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_nan_weighted_reward_sum(const float* rewards, const float* weights, int64_t n, int64_t f,
                                           float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  nan_weighted_reward_sum_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(rewards, weights, n, f, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aapo
