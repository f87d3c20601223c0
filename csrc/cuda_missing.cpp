// CPU-only builds: a CUDA kernel for every aapo op that says the extension was built without CUDA.
// Without it a CUDA tensor reaching torch.ops.aapo.* gets torch's generic "Could not run ... with arguments
// from the 'CUDA' backend". The CUDA variant (AAPO_WITH_CUDA) registers the real kernels in csrc/cuda/.
#include <torch/library.h>

#ifndef AAPO_WITH_CUDA

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

namespace {

void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "torch.ops.", op.schema().name(), " got CUDA tensors, but aapo_megatron._C was built without CUDA ",
              "(CPU-only: torch had no CUDA or nvcc was not found at build time). Rebuild it on the GPU machine with ",
              "the CUDA toolkit: `python setup.py build_ext --inplace` with nvcc under CUDA_HOME (docs/gpu.md).");
}

}  // namespace

TORCH_LIBRARY_IMPL(aapo, CUDA, m) {
  for (const char* name : {"grouped_advantages", "nan_weighted_reward_sum", "logprob_shard_stats",
                           "logprob_shard_backward", "logprob_fused_fwd_bwd", "vec_exp_u20"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  }
}

#endif  // AAPO_WITH_CUDA
