"""Where the colocated rollout engines run: `rollout.tensor_parallel_size` x `rollout.data_parallel_size`.

Each role (policy, reference) gets `data_parallel_size` replicas, one vLLM engine per TP group of
`tensor_parallel_size` ranks; the replicas of a role form a `ReplicaSet` (`rollout/replicas.py`), which
restarts a dead replica alone, with the placement it had.

- GPU: replica r of each role runs on the job's GPUs r*TP .. (r+1)*TP - 1 of rank 0's node (its
  CUDA_VISIBLE_DEVICES while it starts); the policy and the reference replica on a GPU group time-share it
  with Megatron (sleep mode). TP x DP must fit the job's GPUs on that node.
- CPU: the replicas split the job's cores into disjoint contiguous groups, each group split again over its
  TP ranks (VLLM_CPU_OMP_THREADS_BIND "0,1|2,3"). With `overlap_reference` the policy and reference replicas
  generate at once and get different groups; without it replica r of both roles shares group r.

TP = DP = 1 is the single-engine path of `vllm_engine.build_engines`, unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from aapo_megatron.config import ConfigError
from aapo_megatron.errors import BadInputError


class LayoutError(ConfigError, BadInputError):
    """The rollout TP x DP layout does not fit the job or the model (exit 2, before any engine starts)."""



def _torch() -> Any:
    """torch, imported on use: config validation imports this module, and Slurm's resolve_config.py runs it
    on a login node's python without torch."""
    import torch

    return torch


def _platform() -> Any:
    """The job's Platform (aapo_megatron.distributed imports torch, hence on use)."""
    from aapo_megatron.distributed import current_platform

    return current_platform()


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, stop) ranges covering range(n), sizes differing by at most 1 (larger first)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    q, rem = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < rem else 0)
        out.append((start, stop))
        start = stop
    return out


def concurrent_roles(rollout_cfg: Any, reference: bool) -> int:
    """How many roles generate at the same time: 2 with a reference engine and overlap_reference, else 1."""
    return 2 if reference and rollout_cfg.overlap_reference else 1


def check_layout(rollout_cfg: Any, heads: Optional[int] = None, kv_heads: Optional[int] = None) -> None:
    """The machine-independent checks (config validation): server placement, TP against the model's heads."""
    tp, dp = rollout_cfg.tensor_parallel_size, rollout_cfg.data_parallel_size
    if rollout_cfg.placement == "server":
        for key, value in (("tensor_parallel_size", tp), ("data_parallel_size", dp)):
            if value != 1:
                raise LayoutError(f"'rollout.{key}' must be 1 with rollout.placement=server (it lays out the "
                                  f"engines this job starts; a rollout server takes --tensor-parallel-size), got {value}")
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count and count % tp:
            raise LayoutError(f"'rollout.tensor_parallel_size' must divide the number of {what} ({count}), got {tp}")


def job_gpus() -> list[str]:
    """CUDA device ids (as CUDA_VISIBLE_DEVICES names them) of this job on rank 0's node, in order.

    The job's GPUs are the first LOCAL_WORLD_SIZE (torchrun; 1 without it) of the devices this process sees.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(_torch().cuda.device_count())]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ids[:local]


def gpu_groups(gpus: Sequence[str], tp: int, dp: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each of the dp replicas: consecutive groups of tp of `gpus`."""
    if tp * dp > len(gpus):
        raise LayoutError(f"'rollout.tensor_parallel_size' x 'rollout.data_parallel_size' = {tp} x {dp} = "
                          f"{tp * dp} GPUs, but the job has {len(gpus)} on rank 0's node "
                          f"({','.join(gpus) or 'none'}; LOCAL_WORLD_SIZE={os.environ.get('LOCAL_WORLD_SIZE', 1)})")
    return [",".join(gpus[r * tp:(r + 1) * tp]) for r in range(dp)]


def cpu_binds(cores: Sequence[int], tp: int, dp: int, roles: int) -> list[list[str]]:
    """VLLM_CPU_OMP_THREADS_BIND of each replica, [role][replica]: disjoint core groups, "|" between TP ranks.

    `roles` engines sets generate at once (2: policy and reference overlap, each role gets its own groups;
    1: the roles take turns on the same groups). Every TP rank needs a core of its own.
    """
    cores = list(cores)
    engines = roles * dp
    if tp * engines > len(cores):
        overlap = " (x2: rollout.overlap_reference runs the policy and the reference replicas at once; set it " \
                  "to false to share the cores)" if roles == 2 else ""
        raise LayoutError(f"'rollout.data_parallel_size' = {dp} replicas x 'rollout.tensor_parallel_size' = {tp} "
                          f"ranks{overlap} need {tp * engines} CPU cores, but this job has {len(cores)} "
                          f"({','.join(map(str, cores))}): each rank needs a core of its own")
    groups = [cores[a:b] for a, b in chunks(len(cores), engines)]
    binds = ["|".join(",".join(map(str, g[a:b])) for a, b in chunks(len(g), tp)) for g in groups]
    per_role = [binds[i * dp:(i + 1) * dp] for i in range(roles)]
    return per_role if roles == 2 else per_role * 2


def replica_placements(rollout_cfg: Any, reference: bool) -> list[list[dict[str, str]]]:
    """Per role (policy, reference) and replica: the environment its engine starts with (CUDA / CPU binding)."""
    tp, dp = rollout_cfg.tensor_parallel_size, rollout_cfg.data_parallel_size
    if _platform().cuda:
        groups = gpu_groups(job_gpus(), tp, dp)
        return [[{"CUDA_VISIBLE_DEVICES": g} for g in groups]] * 2
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        if dp > 1:
            raise LayoutError(f"'rollout.data_parallel_size' = {dp} gives each replica its own cores, but "
                              f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']!r} would bind "
                              f"them all to the same ones: unset it")
        return [[{}]] * 2  # yours wins (one replica)
    binds = cpu_binds(sorted(os.sched_getaffinity(0)), tp, dp, concurrent_roles(rollout_cfg, reference))
    return [[{"VLLM_CPU_OMP_THREADS_BIND": b} for b in role] for role in binds]


def check_fits(rollout_cfg: Any, reference: bool = True) -> None:
    """LayoutError unless TP x DP fits this job's GPUs (CUDA) or cores (CPU); a no-op for TP = DP = 1."""
    if rollout_cfg.placement == "colocated" and rollout_cfg.tensor_parallel_size * rollout_cfg.data_parallel_size > 1:
        replica_placements(rollout_cfg, reference)


def check_job_fits(cfg: Any) -> None:
    """`check_fits` for a training `Config` (aapo-train, before any work): the reference counts when the
    algorithm samples it; SFT starts no engines."""
    if cfg.trainer.mode == "sft":
        return
    from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS

    check_fits(cfg.rollout, ADVANTAGE_ESTIMATORS.get(cfg.algorithm.name).uses_reference)
