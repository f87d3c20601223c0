"""Moved to `aapo_megatron.distributed`; these names stay importable here until trainer/loop.py and
convert/hf_to_mcore.py import them from there."""

from aapo_megatron.distributed import (  # noqa: F401
    DistEnv,
    ParallelLayout,
    check_world_size,
    current_layout,
    expand_hostlist,
    init_distributed,
    read_dist_env,
    resolve_backend,
    seed_everything,
    teardown_distributed,
)
