"""Former home of the weight-sync code, now `aapo_megatron.rollout.transport`; re-exports its names."""

from aapo_megatron.rollout.transport.base import (  # noqa: F401
    StageRunner,
    SyncStats,
    WeightSyncError,
    WeightSyncTimeout,
    bucket_nbytes,
    hf_named_tensors,
    iter_buckets,
    stream_buckets,
)
from aapo_megatron.rollout.transport.shm import (  # noqa: F401
    FileSink,
    ShmSlots,
    default_shm_dir,
    stream_via_files,
)
