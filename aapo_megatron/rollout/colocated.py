"""Open the colocated rollout engines of a `rollout.tensor_parallel_size` x `rollout.data_parallel_size` layout.

`open_engines` starts one vLLM engine per replica where `layout.replica_placements` puts it and wraps each
role's replicas in a `ReplicaSet`; TP = DP = 1 is the single-engine path of `vllm_engine.build_engines`.
"""

from __future__ import annotations

from typing import Any, Optional

from aapo_megatron.distributed import current_platform
from aapo_megatron.rollout.layout import replica_placements


def open_engines(model_path: str, rollout_cfg: Any, *, reference: bool = True,
                 max_prompt_tokens: Optional[int] = None, **kwargs: Any) -> tuple[Any, Optional[Any]]:
    """Policy and (optionally) reference engines of `rollout_cfg`'s layout: single engines (DP = 1) or
    `ReplicaSet`s of DP engines; the arguments are those of `vllm_engine.build_engines`."""
    from aapo_megatron.rollout.replicas import ReplicaSet  # vLLM and the replica set, on use
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine, _scoped_env, build_engines, engine_kwargs

    tp, dp = rollout_cfg.tensor_parallel_size, rollout_cfg.data_parallel_size
    if tp * dp == 1:
        return build_engines(model_path, rollout_cfg, reference=reference, max_prompt_tokens=max_prompt_tokens,
                             **kwargs)
    places = replica_placements(rollout_cfg, reference)
    common = engine_kwargs(model_path, rollout_cfg, max_prompt_tokens, **kwargs)
    common["tensor_parallel_size"] = tp
    cuda = current_platform().cuda
    built: list[list[Any]] = [[], []]

    def start(role: str, env: dict[str, str]) -> Any:
        extra = {"weight_transport": getattr(rollout_cfg, "weight_transport", "auto")} if role == "policy" else {}
        bind = env.get("VLLM_CPU_OMP_THREADS_BIND")
        with _scoped_env(CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES")):
            engine = VLLMRolloutEngine(model_path, role=role, **common, **extra,
                                       **({"cpu_threads_bind": bind} if bind and "cpu_threads_bind" not in common else {}))
        return engine

    try:
        for r in range(dp):
            built[0].append(start("policy", places[0][r]))
            if cuda and reference:
                built[0][r].sleep()  # free its GPUs' memory for the reference replica; the first generate wakes it
        if reference:
            for r in range(dp):
                built[1].append(start("reference", places[1][r]))
    except BaseException:
        for engine in built[0] + built[1]:
            engine.close()
        raise
    if dp == 1:
        return built[0][0], built[1][0] if reference else None
    labels = [[" ".join(f"{k}={v}" for k, v in env.items()) for env in role] for role in places]
    return (ReplicaSet(built[0], "policy", labels[0], restart=lambda r: start("policy", places[0][r])),
            ReplicaSet(built[1], "reference", labels[1], restart=lambda r: start("reference", places[1][r]))
            if reference else None)
