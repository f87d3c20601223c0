// Host entry points of the CUDA kernels (csrc/cuda/*.cu): raw device pointers plus a stream, no torch types.
// The tensor binding (csrc/cuda/ops_cuda.cpp) validates arguments and calls these; each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_math.h"

namespace aapo {
namespace cuda {

// Grouped rewards and advantages, one warp per group; pointers in `args` are device pointers (see AdvantageArgs).
cudaError_t launch_grouped_advantages(const AdvantageArgs& args, cudaStream_t stream);

// out[i] = NaN-ignoring weighted sum of rewards[i, :] (NaN when every entry is NaN); rewards [n, f], weights [f].
cudaError_t launch_nan_weighted_reward_sum(const float* rewards, const float* weights, int64_t n, int64_t f,
                                           float* out, cudaStream_t stream);

// Row layout of logits [n, v] with row stride `stride` (elements); dtype is float32 or bfloat16 (raw bits).
struct LogitsView {
  const void* data;
  bool bf16;
  int64_t n;
  int64_t v;
  int64_t stride;
};

// stats [n, 4] float32: (shard max, sumexp, sum_pd, target logit or 0 when target[i] - vocab_start is outside [0, v)).
cudaError_t launch_logprob_shard_stats(const LogitsView& x, const int64_t* target, int64_t vocab_start, float* stats,
                                       cudaStream_t stream);

// grad_out[i, j] = d(g_logp[i] * log p_i(target) + g_ent[i] * H_i) / d x[i, j], given per row the full-vocabulary
// max, log sumexp (relative to that max) and entropy H; grad_ent may be nullptr (no entropy term).
// grad_out (row stride out_stride) may be x itself.
cudaError_t launch_logprob_shard_backward(const LogitsView& x, const int64_t* target, int64_t vocab_start,
                                          const float* row_max, const float* log_sumexp, const float* entropy,
                                          const float* grad_logp, const float* grad_ent, void* grad_out,
                                          int64_t out_stride, cudaStream_t stream);

// TP=1: stats as launch_logprob_shard_stats (vocab_start 0) and grad_out = d(g_logp * log p(target)) / dx per row,
// in one kernel: the row stays in shared memory between the two passes when it fits (else the re-read hits L2).
// grad_out may be x itself.
cudaError_t launch_logprob_fused_fwd_bwd(const LogitsView& x, const int64_t* target, const float* grad_logp,
                                         float* stats, void* grad_out, int64_t out_stride, cudaStream_t stream);

}  // namespace cuda
}  // namespace aapo
