"""Distributed bring-up and the platform: torchrun / Slurm environment, the `Platform` (decided once),
torch.distributed, Megatron parallel_state, seeds.

    env = init_distributed(cfg)            # cfg: config.Config or ParallelConfig (TP*PP must divide the world size);
                                           # also decides the Platform and, on CPU, installs the Megatron CPU shims
    platform = current_platform()          # device, backend, TE or local spec, distributed optimizer
    seed_everything(cfg.trainer.seed)      # Megatron's model-parallel RNG tracker, CPU too
    ...
    teardown_distributed()

`read_dist_env(environ)` is a pure function of an environment mapping (unit-testable):
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under `srun` the
rank comes from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the master is the first
host of SLURM_JOB_NODELIST (a Slurm hostlist such as ``gpu[001-004,007],cpu01``),
the port MASTER_PORT or one derived from SLURM_JOB_ID.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist

from aapo_megatron.compat.megatron_cpu import install_cpu_shims
from aapo_megatron.config import Config, ConfigError, ParallelConfig

DEFAULT_MASTER_PORT = 29500
# Slurm-derived ports: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN (stays in the unprivileged, non-ephemeral range).
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    master_addr: str
    """Host of rank 0 (rendezvous)."""
    master_port: int
    """TCP port of the rendezvous."""
    launcher: Literal["torchrun", "slurm", "single"]
    """Which environment the values came from."""


# --------------------------------------------------------------------------- Slurm hostlists


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, hostlist: str) -> list[str]:
    """'001-003,7' -> ['001', '002', '003', '7'] (zero padding kept)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            out.append(item)
            continue
        match = re.fullmatch(r"(\d+)-(\d+)", item)
        if not match:
            raise ValueError(f"bad range {item!r} in Slurm hostlist {hostlist!r}")
        lo, hi = match.groups()
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm hostlist {hostlist!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, hostlist: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [h for v in _expand_range(match.group(1), hostlist) for h in _expand_host(head + v + tail, hostlist)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist: 'gpu[001-002,007],cpu01' -> ['gpu001', 'gpu002', 'gpu007', 'cpu01']."""
    hosts = [h for part in _split_top_level(hostlist) for h in _expand_host(part, hostlist)]
    if not hosts:
        raise ValueError(f"empty Slurm hostlist {hostlist!r}")
    return hosts


# --------------------------------------------------------------------------- environment


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def read_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """DistEnv from torchrun's variables, else Slurm's, else a single process (pure function of `environ`)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        if "LOCAL_RANK" in environ:
            local = _int(environ, "LOCAL_RANK")
        elif "LOCAL_WORLD_SIZE" in environ:
            local = rank % _int(environ, "LOCAL_WORLD_SIZE")
        else:
            local = 0
        addr = environ.get("MASTER_ADDR", "127.0.0.1")
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
        launcher = "torchrun"
    elif "SLURM_PROCID" in environ:
        rank = _int(environ, "SLURM_PROCID")
        world_key = "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
        if world_key not in environ:
            raise ValueError("SLURM_PROCID is set but neither SLURM_NTASKS nor SLURM_NPROCS is")
        world = _int(environ, world_key)
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        if "MASTER_ADDR" in environ:
            addr = environ["MASTER_ADDR"]
        else:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("Slurm launch without MASTER_ADDR needs SLURM_JOB_NODELIST to find the master host")
            addr = expand_hostlist(nodelist)[0]
        if "MASTER_PORT" in environ:
            port = _int(environ, "MASTER_PORT")
        elif "SLURM_JOB_ID" in environ:
            port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        else:
            port = DEFAULT_MASTER_PORT
        launcher = "slurm"
    else:
        rank, world, local = 0, 1, 0
        addr = environ.get("MASTER_ADDR", "127.0.0.1")
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
        launcher = "single"
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world size {world}) ({launcher} environment)")
    if not 0 <= port <= 65535 or (port == 0 and world > 1):
        raise ValueError(f"MASTER_PORT={port} is not a usable rendezvous port for {world} processes "
                         f"(torchrun --master-port=0 is not supported: use --standalone or a fixed port)")
    return DistEnv(rank, world, local, addr, port, launcher)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- platform


def _cuda_present() -> bool:
    """Whether this process sees a CUDA device (the one place the package asks torch)."""
    return torch.cuda.is_available()


def _transformer_engine_usable() -> bool:
    """Transformer Engine's torch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing, or built for another CUDA/torch) means "no TE"
        return False
    return True


@dataclass(frozen=True)
class Platform:
    """What this process runs on, decided once (`detect_platform`) and passed to the code that depends on it."""

    cuda: bool
    """A CUDA device is used (else everything runs on the CPU over gloo, with the Megatron CPU shims)."""
    device: torch.device
    """The device tensors live on: cuda:<local rank mod device count>, or cpu."""
    backend: str
    """torch.distributed backend: nccl or gloo."""
    transformer_engine: bool
    """Build Megatron's Transformer Engine layer spec (CUDA and TE importable); else the local spec."""
    distributed_optimizer: bool
    """Use Megatron's DistributedOptimizer (it refuses CPU tensors, so CUDA only)."""

    @property
    def default_dtype(self) -> str:
        """What dtype 'auto' means here: bfloat16 with CUDA, float32 on the CPU."""
        return "bfloat16" if self.cuda else "float32"


def detect_platform(parallel: Optional[ParallelConfig] = None, env: Optional[DistEnv] = None) -> Platform:
    """The Platform of this process from the hardware, `parallel.backend` (ConfigError if nccl without CUDA), the rank."""
    cuda = _cuda_present()
    if parallel is not None:
        backend = resolve_backend(parallel, cuda=cuda)
    else:
        backend = "nccl" if cuda else "gloo"
    local_rank = env.local_rank if env is not None else 0
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    return Platform(cuda=cuda, device=device, backend=backend,
                    transformer_engine=cuda and _transformer_engine_usable(), distributed_optimizer=cuda)


_PLATFORM: Optional[Platform] = None


def _set_platform(platform: Platform) -> Platform:
    global _PLATFORM
    _PLATFORM = platform
    return platform


def current_platform() -> Platform:
    """This process's Platform: the one `init_distributed` decided, else detected now (once) without a config."""
    return _PLATFORM if _PLATFORM is not None else _set_platform(detect_platform())


# --------------------------------------------------------------------------- init / teardown


def check_world_size(parallel: ParallelConfig, world_size: int) -> None:
    """Raise ConfigError unless TP * PP divides `world_size` (same message as validation.validate)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"'parallel' tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} must divide the world "
            f"size ({world_size}); tp={tp}, pp={pp}, got {world_size!r}"
        )


def resolve_backend(parallel: ParallelConfig, cuda: Optional[bool] = None) -> str:
    """'nccl' with CUDA, 'gloo' without; an explicit nccl request without CUDA is a ConfigError."""
    cuda = _cuda_present() if cuda is None else cuda
    if parallel.backend == "auto":
        return "nccl" if cuda else "gloo"
    if parallel.backend == "nccl" and not cuda:
        raise ConfigError("'parallel.backend' is 'nccl' but CUDA is not available; use 'gloo' or 'auto'")
    return parallel.backend


def init_distributed(cfg: Union["Config", ParallelConfig], environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Initialise torch.distributed (nccl/gloo) and Megatron's TP/PP/DP groups; check the world size first
    (a whole training Config is validated by its caller: `validation.validate(cfg, world_size)`).

    Decides this process's `Platform` (see `current_platform`) and, without CUDA, installs the Megatron CPU shims.
    """
    env = read_dist_env(environ)
    parallel = cfg.parallel if isinstance(cfg, Config) else cfg
    check_world_size(parallel, env.world_size)  # ConfigError naming 'parallel' and the world size
    platform = _set_platform(detect_platform(parallel, env))
    backend = platform.backend
    if platform.cuda:
        torch.cuda.set_device(platform.device)
    else:
        install_cpu_shims()  # the one place the package installs them: Megatron is about to be brought up

    timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(f"torch.distributed is already initialised with world size {dist.get_world_size()}, "
                               f"the environment says {env.world_size}")
    else:
        # env:// rather than tcp://: under torchrun the agent already serves the rendezvous store on
        # MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE) and a second server on that port would never come up.
        port = env.master_port
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:
            port = _free_port()  # a lone process needs no agreed port; two single-process jobs must not collide
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(port),
                          RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        distributed_timeout_minutes=max(1, int(round(parallel.timeout_minutes))),
    )
    return env


def teardown_distributed() -> None:
    """Destroy Megatron's parallel groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and Megatron's model-parallel RNG tracker (works on CPU via the shims).

    Like Megatron's `model_parallel_cuda_manual_seed`: the default generator gets `seed` on every rank
    (data-parallel state), the tracker's model-parallel state gets `seed + 2718 + tp_rank`.
    """
    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's coordinates in the Megatron TP/PP/DP grid."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        """First pipeline stage (holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Last pipeline stage (holds the final norm and the output layer)."""
        return self.pp_rank == self.pp_size - 1


def current_layout() -> ParallelLayout:
    """ParallelLayout from Megatron's parallel_state (after init_distributed)."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )
