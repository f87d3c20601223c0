"""CPU shims that let Megatron-Core run on a machine without CUDA (gloo backend).

Megatron-Core 0.16.1 assumes a GPU in a handful of places: it asks for the current
CUDA device, reads/writes the CUDA RNG state, synchronises streams, and creates
small bookkeeping tensors with a hard-coded ``device="cuda"``. `install_cpu_shims()`
patches exactly those places so the same Megatron code paths run on CPU over gloo:

    install_cpu_shims()          # idempotent; a no-op when CUDA is available

`aapo_megatron.distributed.detect_platform` installs them, once, when the process has no CUDA device; nothing
else should. They were written against megatron-core TESTED_MEGATRON_CORE (they reach into its private
functions and module globals), so installing them on any other version raises MegatronVersionError.
Every shim below names the Megatron code it works around. Nothing here changes numerics: tensors simply stay
on the CPU.

The patches are scoped to Megatron: the public torch API (`torch.cuda.*`, `torch.Tensor.cuda`) stays stock in
the process. Megatron modules get a `torch` proxy (`CpuTorchProxy`) as their module-level `torch` name, whose
factories allocate on the CPU and whose `torch.cuda` (`CpuCudaProxy`) answers current_device / RNG state /
manual_seed / synchronize for the CPU; the rest are Megatron attributes (two private RNG helpers, the grad
clipping function) and two methods wrapped so that a CUDA-only call works during that method only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, Callable, Optional

import torch

from aapo_megatron.compat.float16_checkpoint import install_float16_checkpoint_shim
from aapo_megatron.errors import AapoError

logger = logging.getLogger(__name__)

TESTED_MEGATRON_CORE = "0.16.1"
"""The megatron-core version every shim below was read against and is tested with."""


class MegatronVersionError(AapoError):
    """The installed megatron-core is not the version the CPU shims were written for."""

_INSTALLED = False

# Megatron modules that create tensors with a hard-coded `device="cuda"` (or `device=torch.cuda.current_device()`),
# or call torch.cuda.{current_device, get_rng_state, set_rng_state, manual_seed, synchronize}, through their
# module-level `torch` name. Each gets a `torch` proxy (see `CpuTorchProxy`) in place of the real module.
# Not listed (GPU-only features this package never uses on CPU): Megatron FSDP, the Transformer Engine
# extension, inference contexts, the NCCL allocator, CUDA graphs, MoE routing, the hybrid-CP schedule.
PROXIED_MODULES: tuple[str, ...] = (
    # schedules.py: `total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")` in every schedule.
    "megatron.core.pipeline_parallel.schedules",
    # optimizer.py: FP32Optimizer's `self._scale = torch.tensor([1.0], ..., device='cuda')`, found_inf, etc.
    "megatron.core.optimizer.optimizer",
    # clip_grads.py: `total_norm_cuda = torch.tensor(..., device='cuda')`, dummy overflow buffers.
    "megatron.core.optimizer.clip_grads",
    # distrib_optimizer.py: buffers created on `torch.cuda.current_device()`.
    "megatron.core.optimizer.distrib_optimizer",
    # param_and_grad_buffer.py: `torch.zeros([1], device="cuda")` warm-up tensor and the grad buffers.
    "megatron.core.distributed.param_and_grad_buffer",
    # utils.py: `local_multi_tensor_l2_norm` returns `torch.tensor(..., device="cuda")`.
    "megatron.core.utils",
    # language_module.py: loss / embedding helpers allocate on cuda.
    "megatron.core.models.common.language_module.language_module",
    # tensor_parallel/data.py: `broadcast_data` sizes tensor on cuda.
    "megatron.core.tensor_parallel.data",
    # state_dict_saver.py: `torch.tensor([local_verify_reuse], ..., device='cuda')` in dist_checkpointing save.
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # exchange_utils.py: `torch.empty_like(tensor, device="cuda")` when exchanging checkpoint shards.
    "megatron.core.dist_checkpointing.exchange_utils",
    # rerun_state_machine.py: `torch.tensor(value, dtype=torch.int32, device='cuda')` in its reductions.
    "megatron.core.rerun_state_machine",
    # pipeline_parallel/utils.py: p2p helpers allocate on cuda.
    "megatron.core.pipeline_parallel.utils",
    # transformer/utils.py: `get_default_causal_mask` does `torch.ones(sq, sq, device="cuda")`; used when
    # a layer is called with attention_mask=None (we normally pass an explicit mask, see gpt.py).
    "megatron.core.transformer.utils",
    # The modules below call torch.cuda.current_device() / synchronize() / the RNG state functions:
    # parallel_state.py: `torch.cuda.current_device()` for the group's device, `synchronize` in barriers.
    "megatron.core.parallel_state",
    # tensor_parallel/random.py: CudaRNGStatesTracker.add() / model_parallel_cuda_manual_seed() save, seed and
    # restore the "CUDA" generator (`torch.cuda.get_rng_state`, `manual_seed`, `set_rng_state`): on CPU, the
    # CPU generator (torch.cuda.manual_seed is otherwise a silent lazy no-op and get_rng_state raises).
    "megatron.core.tensor_parallel.random",
    # tensor_parallel/{layers,mappings,utils}.py: weights and buffers on `torch.cuda.current_device()`.
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    # rotary_pos_embedding.py: RotaryEmbedding.get_emb moves inv_freq to `torch.cuda.current_device()` (yarn too).
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    # transformer/{module,transformer_layer}.py: `torch.cuda.current_device()` for buffers and offsets.
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    # distributed_data_parallel.py: `torch.cuda.current_device()` / `synchronize` around the grad buffers.
    "megatron.core.distributed.distributed_data_parallel",
    # grad_scaler.py: scales on `torch.cuda.current_device()`.
    "megatron.core.optimizer.grad_scaler",
    # p2p_communication.py: PP send/recv buffers on `torch.cuda.current_device()`, `synchronize` after batched p2p.
    "megatron.core.pipeline_parallel.p2p_communication",
    # timers.py: `torch.cuda.synchronize()` before reading a timer.
    "megatron.core.timers",
    # dist_checkpointing strategies: `torch.cuda.synchronize()` / `current_device()` around saves and loads.
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)

# torch factory functions whose `device=` argument the proxy rewrites.
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # An int device index means a CUDA ordinal to Megatron (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (str, torch.device, ordinal) to "cpu"; leave anything else alone."""
    return "cpu" if _is_cuda_device(device) else device


def _wrap_factory(fn: Callable) -> Callable:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__doc__ = f"CPU shim of torch.{factory.__name__}: device 'cuda' -> 'cpu'."
    return factory


class CpuCudaProxy(types.ModuleType):
    """Stands in for `torch.cuda` inside the proxied Megatron modules: current_device is "cpu", the RNG state
    functions use the CPU generator, synchronize waits for nothing; all else is torch.cuda."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.current_device = _current_device
        self.get_rng_state = _get_rng_state
        self.set_rng_state = _set_rng_state
        self.manual_seed = _manual_seed
        self.synchronize = _synchronize

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class CpuTorchProxy(types.ModuleType):
    """Stands in for `torch` inside one Megatron module: factories map device "cuda" to "cpu", `torch.cuda` is a
    `CpuCudaProxy`, all else is torch."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _wrap_factory(getattr(torch, name)))
        self.cuda = CpuCudaProxy()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_PROXY: Optional[CpuTorchProxy] = None


def torch_proxy() -> CpuTorchProxy:
    """The shared `torch` proxy installed into `PROXIED_MODULES`."""
    global _PROXY
    if _PROXY is None:
        _PROXY = CpuTorchProxy()
    return _PROXY


# --------------------------------------------------------------------------- individual shims


def _current_device() -> str:
    """CPU shim of torch.cuda.current_device (returns "cpu" so `device=current_device()` allocates on CPU)."""
    return "cpu"


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    """CPU shim of torch.cuda.get_rng_state: the CPU generator's state [ByteTensor]."""
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    """CPU shim of torch.cuda.set_rng_state: sets the CPU generator's state."""
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    """CPU shim of torch.cuda.manual_seed: seeds the CPU generator (not via torch.manual_seed, which calls back)."""
    torch.default_generator.manual_seed(int(seed))


def _synchronize(device: Any = None) -> None:
    """CPU shim of torch.cuda.synchronize: CPU ops are synchronous, nothing to wait for."""


def _megatron_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU shim of megatron.core.tensor_parallel.random._get_cuda_rng_state: the CPU generator's state."""
    return torch.get_rng_state()


def _megatron_set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU shim of megatron.core.tensor_parallel.random._set_cuda_rng_state: sets the CPU generator's state."""
    torch.set_rng_state(new_state)


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
    """CPU shim of Tensor.cuda: returns the tensor itself (there is no CUDA device to move it to)."""
    return self


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, `Tensor.cuda()` returns the tensor itself (a CPU tensor stays where it is)."""
    own = torch.Tensor.__dict__.get("cuda")  # None: `cuda` is inherited from torch._C.TensorBase
    torch.Tensor.cuda = _tensor_cuda
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = own


def _within(context: Callable[[], Any], method: Callable) -> Callable:
    """`method` run inside `context()`; the original is kept as `.cpu_shim_of`."""
    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with context():
            return method(*args, **kwargs)

    wrapped.cpu_shim_of = method
    return wrapped


def clip_grad_by_total_norm_fp32_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """CPU version of megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 (in place, fp32/bf16 grads)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is None:
            continue
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 gradients, got {grad.dtype}")
        grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


# --------------------------------------------------------------------------- bf16 mixed-precision optimizer

# Float16OptimizerWithFloat16Params.__init__ (megatron/core/optimizer/optimizer.py, 0.16.1): the only CUDA-only
# check on its path is `param.type()`.

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def cpu_tensors_report_cuda_type():
    """Within the block, `Tensor.type()` (no arguments) of a CPU fp32/fp16/bf16 tensor returns its torch.cuda name."""
    own = torch.Tensor.__dict__.get("type")  # None: `type` is inherited from torch._C.TensorBase
    original = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = cuda_named_type
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.type
        else:
            torch.Tensor.type = own


def megatron_core_version() -> str:
    """The installed megatron-core version string (e.g. "0.16.1")."""
    return importlib.import_module("megatron.core").__version__


def check_megatron_core_version() -> None:
    """Raise MegatronVersionError unless the installed megatron-core is TESTED_MEGATRON_CORE."""
    version = megatron_core_version()
    if version != TESTED_MEGATRON_CORE:
        raise MegatronVersionError(
            f"megatron-core {version} is installed, but the CPU shims (aapo_megatron/compat/megatron_cpu.py) were "
            f"written and tested against megatron-core {TESTED_MEGATRON_CORE} only; install "
            f"megatron-core=={TESTED_MEGATRON_CORE} (requirements/cpu.txt) or run on CUDA")


def _wrap_method(module: str, cls_name: str, method: str, context: Callable[[], Any]) -> None:
    """Run `module.cls_name.method` inside `context()` from now on (once)."""
    cls = getattr(importlib.import_module(module), cls_name)
    if not hasattr(getattr(cls, method), "cpu_shim_of"):
        setattr(cls, method, _within(context, getattr(cls, method)))


# --------------------------------------------------------------------------- install


def install_cpu_shims(force: bool = False) -> bool:
    """Patch Megatron-Core (not torch) for CPU-only runs; idempotent; returns True when the shims are active.

    A no-op (returns False) when CUDA is available, unless `force` (used by tests on GPU hosts: never).
    Raises MegatronVersionError (before patching anything) on a megatron-core other than TESTED_MEGATRON_CORE.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_megatron_core_version()

    # torch.cuda.current_device() / {get,set}_rng_state / manual_seed / synchronize as Megatron calls them:
    # through the `torch` proxy of each module in PROXIED_MODULES (below), never on torch.cuda itself.

    # Tensor.cuda(): LanguageModule.setup_embeddings_and_output_layer does `weight.data = weight.data.cuda()`
    # before all-reducing tied embeddings across the first and last pipeline stage (PP > 1, tied): identity
    # during that method only. (The other `.cuda()` calls of megatron-core 0.16.1 are off this package's CPU
    # paths: optimizer CPU offload, fully parallel checkpoint loading, broadcast_data, context parallelism.)
    _wrap_method("megatron.core.models.common.language_module.language_module", "LanguageModule",
                 "setup_embeddings_and_output_layer", tensor_cuda_is_identity)

    # megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state: used by
    # CudaRNGStatesTracker.fork() (dropout / init inside TP regions); they index torch.cuda.default_generators.
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _megatron_get_cuda_rng_state
    random_mod._set_cuda_rng_state = _megatron_set_cuda_rng_state

    # Module-level `torch` proxy: hard-coded `device="cuda"` tensor factories in the listed modules.
    proxy = torch_proxy()
    for name in PROXIED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy

    # clip_grad_by_total_norm_fp32 asserts `param.grad.type() == 'torch.cuda.FloatTensor'` and uses an
    # apex/TE multi-tensor kernel; replace it (also the name imported into optimizer.py) with a CPU version.
    clip_mod = importlib.import_module("megatron.core.optimizer.clip_grads")
    opt_mod = importlib.import_module("megatron.core.optimizer.optimizer")
    clip_mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32_cpu
    opt_mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32_cpu

    # Float16OptimizerWithFloat16Params.__init__ (bf16/fp16 params with fp32 main params) sorts parameters by
    # `param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']` / `== 'torch.cuda.FloatTensor'`
    # and raises "Wrapped parameters must be one of torch.cuda.FloatTensor, ..." for CPU tensors. During that
    # constructor only, CPU float tensors report their torch.cuda type name. The rest of its path is CPU-safe:
    # `_scale_one` goes through the torch proxy, bf16 copies main->model with a plain loop (no multi-tensor
    # kernel), and there is no grad scaler for bf16 without a loss scale. (DistributedOptimizer has the same
    # check and more; it stays GPU-only.) Its sharded_state_dict numbers the optimizer state wrongly when the
    # model also has fp32 params (the local spec's norms), so checkpoints failed; it is replaced too.
    _wrap_method("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__",
                 cpu_tensors_report_cuda_type)
    install_float16_checkpoint_shim()

    _INSTALLED = True
    logger.info("installed Megatron-Core CPU shims (no CUDA device)")
    return True


def cpu_shims_installed() -> bool:
    """Whether `install_cpu_shims` has patched this process."""
    return _INSTALLED
