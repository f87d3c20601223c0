// CUDA vocab-parallel token log-prob and entropy over logits [N, V/tp] (float32 or bfloat16), forward and backward
// (docs/train-step.md); the same ops and outputs as the CPU kernels in csrc/logprob.cpp.
//
// One block of kThreads threads per row. Each thread reads its share of the row with 16-byte vector loads (4 fp32 or
// 8 bf16) after a scalar head up to the first 16-byte boundary, keeps an online (max, sumexp, sum_pd) in fp32
// (aapo_math.h's SoftmaxStats), and the block merges them with warp shuffles and math::softmax_stats_merge.
// The backward reads and writes each element once, by the same thread, so it may run in place over the logits.
// The fused TP=1 kernel keeps the row's vectors in shared memory from the stats pass to the gradient pass when the
// row fits the device's per-block limit (bf16 rows up to ~113k logits on H100, ~81k on A100), so each logit is read
// from global memory once and written once.
// The TP all-reduces and the finalisation (log Z, log p, H) stay in Python, as on CPU.
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace aapo {
namespace cuda {

namespace {

constexpr int kThreads = 256;       // per block (one row); >= 8 so head and tail elements each have an owner
constexpr int kFusedThreads = 512;  // fused kernel: fewer resident blocks when a row sits in shared memory
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ math::SoftmaxStats warp_merge(math::SoftmaxStats s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    math::SoftmaxStats o;
    o.max = __shfl_xor_sync(kFullMask, s.max, offset);
    o.sumexp = __shfl_xor_sync(kFullMask, s.sumexp, offset);
    o.sum_pd = __shfl_xor_sync(kFullMask, s.sum_pd, offset);
    s = math::softmax_stats_merge(s, o);  // commutative, so both lanes of a pair hold the same value
  }
  return s;
}

// Stats of the whole block of kBlock threads (<= 1024), returned to every thread: warp butterflies, then each warp
// merges the warp totals. `scratch` holds kBlock / kWarp entries; one call per kernel (no barrier guards a reuse).
template <int kBlock>
__device__ __forceinline__ math::SoftmaxStats block_merge(math::SoftmaxStats s, math::SoftmaxStats* scratch) {
  static_assert(kBlock % kWarp == 0 && kBlock / kWarp <= kWarp, "block_merge: kBlock must be 32..1024, whole warps");
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  s = warp_merge(s);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < kBlock / kWarp ? scratch[lane] : math::softmax_stats_empty();
  return warp_merge(s);
}

__device__ __forceinline__ void write_stats(float* out, math::SoftmaxStats s, float target_logit) {
  out[0] = s.max;
  out[1] = s.sumexp;
  out[2] = s.sum_pd;
  out[3] = target_logit;
}

template <typename T>
__device__ __forceinline__ float target_logit_or_zero(const T* row, int64_t v, int64_t target_local) {
  return (target_local >= 0 && target_local < v) ? to_float(row[target_local]) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    shard_stats_kernel(const T* x, int64_t v, int64_t stride, const int64_t* target, int64_t vocab_start,
                       float* stats) {
  __shared__ math::SoftmaxStats scratch[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  const T* row = x + i * stride;
  math::SoftmaxStats s = thread_row_stats(row, v, static_cast<int>(threadIdx.x), kThreads);
  s = block_merge<kThreads>(s, scratch);
  if (threadIdx.x == 0) write_stats(stats + 4 * i, s, target_logit_or_zero(row, v, target[i] - vocab_start));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    shard_backward_kernel(const T* x, int64_t v, int64_t stride, const int64_t* target, int64_t vocab_start,
                          const float* row_max, const float* log_sumexp, const float* entropy,
                          const float* grad_logp, const float* grad_ent, T* out, int64_t out_stride) {
  const int64_t i = blockIdx.x;
  const int64_t tl = target[i] - vocab_start;
  const bool with_ent = grad_ent != nullptr;
  // Without the entropy term, H is multiplied by 0: pass 0 so a non-finite H cannot turn it into NaN.
  thread_row_grad(x + i * stride, out + i * out_stride, v, (tl >= 0 && tl < v) ? tl : int64_t{-1}, row_max[i],
                  log_sumexp[i], with_ent ? entropy[i] : 0.f, grad_logp[i], with_ent ? grad_ent[i] : 0.f,
                  static_cast<int>(threadIdx.x), kThreads);
}

// kCache: the row's 16-byte vectors stay in dynamic shared memory (row_cache_bytes<T>(v) bytes) between the stats
// and the gradient, so each logit is read from global memory once; otherwise the second read relies on L2.
template <typename T, bool kCache>
__global__ void __launch_bounds__(kFusedThreads)
    fused_fwd_bwd_kernel(const T* x, int64_t v, int64_t stride, const int64_t* target, const float* grad_logp,
                         float* stats, T* out, int64_t out_stride) {
  __shared__ math::SoftmaxStats scratch[kFusedThreads / kWarp];
  extern __shared__ Words4 row_cache[];
  Words4* cache = kCache ? row_cache : nullptr;
  const int64_t i = blockIdx.x;
  const T* row = x + i * stride;
  const int64_t t = target[i];
  const int tid = static_cast<int>(threadIdx.x);
  // Read before block_merge's barrier: after it, other threads may overwrite the row (in-place gradient).
  const float target_logit = tid == 0 ? target_logit_or_zero(row, v, t) : 0.f;
  math::SoftmaxStats s = thread_row_stats(row, v, tid, kFusedThreads, cache);
  s = block_merge<kFusedThreads>(s, scratch);
  if (tid == 0) write_stats(stats + 4 * i, s, target_logit);
  thread_row_grad(row, out + i * out_stride, v, (t >= 0 && t < v) ? t : int64_t{-1}, s.max, logf(s.sumexp), 0.f,
                  grad_logp[i], 0.f, tid, kFusedThreads, cache);
}

// Largest dynamic shared memory one block of the current device may use (opt-in limit), minus the static scratch.
cudaError_t max_dynamic_smem(int64_t* bytes) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *bytes = static_cast<int64_t>(optin) - static_cast<int64_t>(sizeof(math::SoftmaxStats)) * (kFusedThreads / kWarp);
  return err;
}

template <typename T>
cudaError_t launch_fused(const LogitsView& x, const int64_t* target, const float* grad_logp, float* stats,
                         void* grad_out, int64_t out_stride, cudaStream_t stream) {
  const T* data = static_cast<const T*>(x.data);
  T* out = static_cast<T*>(grad_out);
  const unsigned blocks = static_cast<unsigned>(x.n);
  const int64_t cache_bytes = row_cache_bytes<T>(x.v);
  int64_t smem_limit = 0;
  cudaError_t err = max_dynamic_smem(&smem_limit);
  if (err != cudaSuccess) return err;
  if (cache_bytes <= smem_limit) {
    err = cudaFuncSetAttribute(fused_fwd_bwd_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(cache_bytes));
    if (err != cudaSuccess) return err;
    fused_fwd_bwd_kernel<T, true><<<blocks, kFusedThreads, static_cast<size_t>(cache_bytes), stream>>>(
        data, x.v, x.stride, target, grad_logp, stats, out, out_stride);
  } else {
    fused_fwd_bwd_kernel<T, false><<<blocks, kFusedThreads, 0, stream>>>(data, x.v, x.stride, target, grad_logp,
                                                                         stats, out, out_stride);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_logprob_shard_stats(const LogitsView& x, const int64_t* target, int64_t vocab_start, float* stats,
                                       cudaStream_t stream) {
  if (x.n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(x.n);
  if (x.bf16) {
    shard_stats_kernel<Bf16Bits><<<blocks, kThreads, 0, stream>>>(static_cast<const Bf16Bits*>(x.data), x.v,
                                                                   x.stride, target, vocab_start, stats);
  } else {
    shard_stats_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(x.data), x.v, x.stride,
                                                                target, vocab_start, stats);
  }
  return cudaGetLastError();
}

cudaError_t launch_logprob_shard_backward(const LogitsView& x, const int64_t* target, int64_t vocab_start,
                                          const float* row_max, const float* log_sumexp, const float* entropy,
                                          const float* grad_logp, const float* grad_ent, void* grad_out,
                                          int64_t out_stride, cudaStream_t stream) {
  if (x.n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(x.n);
  if (x.bf16) {
    shard_backward_kernel<Bf16Bits><<<blocks, kThreads, 0, stream>>>(
        static_cast<const Bf16Bits*>(x.data), x.v, x.stride, target, vocab_start, row_max, log_sumexp, entropy,
        grad_logp, grad_ent, static_cast<Bf16Bits*>(grad_out), out_stride);
  } else {
    shard_backward_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(x.data), x.v, x.stride, target, vocab_start, row_max, log_sumexp, entropy,
        grad_logp, grad_ent, static_cast<float*>(grad_out), out_stride);
  }
  return cudaGetLastError();
}

cudaError_t launch_logprob_fused_fwd_bwd(const LogitsView& x, const int64_t* target, const float* grad_logp,
                                         float* stats, void* grad_out, int64_t out_stride, cudaStream_t stream) {
  if (x.n == 0) return cudaSuccess;
  return x.bf16 ? launch_fused<Bf16Bits>(x, target, grad_logp, stats, grad_out, out_stride, stream)
                : launch_fused<float>(x, target, grad_logp, stats, grad_out, out_stride, stream);
}

}  // namespace cuda
}  // namespace aapo
