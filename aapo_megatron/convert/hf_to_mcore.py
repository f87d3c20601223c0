"""HF safetensors -> Megatron dist_checkpointing, streamed, with bounded memory.

The conversion runs as W gloo worker processes laid out as a TP=1, PP=W Megatron
job: worker r builds only pipeline stage r of the GPTModel (layers
[r*L/W, (r+1)*L/W), plus the embedding on the first and the output layer on the
last stage), fills it tensor by tensor from the HF shards through
`convert.mapping`, and all workers save together with
`dist_checkpointing.save(model.sharded_state_dict(), dir)`. Megatron's sharded
state dict stores every tensor with its global shape (layers stacked by global
index), so the result loads at any TP/PP. Per-worker memory: its stage
(~ model size / W) plus one HF group of tensors (e.g. q, k, v of one layer).

    convert_hf_to_mcore("/ckpt/Qwen2.5-7B", "/ckpt/qwen-mcore", dtype="bfloat16", workers=4)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from aapo_megatron.convert.errors import ConversionError
from aapo_megatron.convert.hf_io import HFCheckpointReader
from aapo_megatron.convert.launch import run_workers
from aapo_megatron.convert.mcore_io import save_mcore_checkpoint, write_checkpoint_metadata
from aapo_megatron.convert.outdir import atomic_output_dir
from aapo_megatron.models.arch import ArchSpec

DTYPES = ("float32", "bfloat16", "float16")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_BYTES_PER_WORKER = 2 * 2**30
"""`workers=None` picks the fewest workers that keep each stage under this many bytes (2 GiB)."""


@dataclass
class ConversionResult:
    """What a conversion wrote."""

    out_dir: str
    workers: int
    num_tensors: int
    bytes_written: int
    seconds: float


def resolve_dtype_name(dtype: Optional[str], spec: ArchSpec) -> str:
    """The dtype to convert to: `dtype` if given, else the checkpoint's own (float32 if it names another)."""
    if dtype is None:
        dtype = spec.torch_dtype if spec.torch_dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def choose_workers(num_layers: int, model_bytes: int, workers: Optional[int],
                   bytes_per_worker: int = DEFAULT_BYTES_PER_WORKER) -> int:
    """Number of worker processes (= pipeline stages); must divide num_layers. None: fewest under bytes_per_worker."""
    if workers is not None:
        if workers < 1 or num_layers % workers:
            raise ConversionError(
                f"--workers {workers} must be a positive divisor of the number of layers ({num_layers})"
            )
        return workers
    divisors = [w for w in range(1, num_layers + 1) if num_layers % w == 0]
    for w in divisors:
        if model_bytes / w <= bytes_per_worker:
            return w
    return divisors[-1]


def validate_hf_checkpoint(reader: HFCheckpointReader) -> tuple[ArchSpec, list[str]]:
    """ArchSpec of the checkpoint after checking every tensor it needs exists with the right shape; also unused names."""
    from aapo_megatron.convert.mapping import WeightMapping

    spec = ArchSpec.from_hf_config(reader.config)  # UnsupportedArchitectureError names it + lists the supported
    mapping = WeightMapping(spec)
    needed = mapping.hf_names()
    for name in needed:
        reader.check(name, mapping.hf_shape(name))  # MissingTensorError / ShapeMismatchError
    unused = sorted(set(reader.names()) - set(needed))
    return spec, unused


def _hf_to_mcore_worker(rank: int, world: int, hf_dir: str, out_dir: str, dtype: str, progress: bool) -> dict:
    """Worker `rank` of `world`: build pipeline stage `rank`, fill it from the HF shards, save collectively."""
    import torch
    from tqdm import tqdm

    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.convert.mapping import WeightMapping
    from aapo_megatron.models.gpt import build_gpt_model, transformer_config
    from aapo_megatron.models.parallel import init_distributed, seed_everything
    from aapo_megatron.models.weights import load_hf_weights, model_naming, stage_hf_names

    init_distributed(ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=world,
                                    backend="gloo", timeout_minutes=120.0))
    seed_everything(0)
    reader = HFCheckpointReader(hf_dir)  # headers only
    spec = ArchSpec.from_hf_config(reader.config)
    # No random init: every parameter is overwritten from the checkpoint.
    config = transformer_config(spec, 1, world, dtype, perform_initialization=False)
    model = build_gpt_model(spec, dtype=dtype, config=config)
    mapping = WeightMapping(spec, naming=model_naming(model))
    names = stage_hf_names(mapping, rank, world)
    bar = tqdm(total=len(names), desc=f"hf-to-mcore stage {rank}/{world}", unit="tensor",
               disable=not progress or rank != 0, leave=False)

    def fetch(name: str) -> torch.Tensor:
        tensor = reader.load([name])[name]  # opens the shard, copies this one tensor, closes it
        bar.update(1)
        return tensor

    load_hf_weights(model, mapping, fetch, tp_rank=0, tp_size=1, pp_rank=rank, pp_size=world)
    bar.close()
    # the last stage's copy of a tied embedding is not saved (Megatron marks it a replica)
    params = [p for n, p in model.named_parameters() if not (spec.tie_word_embeddings and n == "output_layer.weight")]
    stats = {"num_params": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params),
             "hf_tensors": len(names)}
    save_mcore_checkpoint(model, out_dir, release_weights=True)
    return stats


def convert_hf_to_mcore(hf_dir: str, out_dir: str, dtype: Optional[str] = None, workers: Optional[int] = None,
                        force: bool = False, progress: bool = True) -> ConversionResult:
    """Convert an HF directory to a Megatron dist_checkpointing directory (atomic: all or nothing at out_dir)."""
    t0 = time.perf_counter()
    reader = HFCheckpointReader(hf_dir)
    spec, unused = validate_hf_checkpoint(reader)
    if unused and not (unused == ["lm_head.weight"] and spec.tie_word_embeddings):
        shown = ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else "")
        print(f"aapo-convert: ignoring {len(unused)} tensor(s) the {spec.hf_architecture} mapping does not use: {shown}")
    dtype = resolve_dtype_name(dtype, spec)
    model_bytes = reader.total_bytes * _BYTES[dtype] // max(1, _source_itemsize(reader))
    workers = choose_workers(spec.num_layers, model_bytes, workers)
    with atomic_output_dir(out_dir, force, inputs=(hf_dir,)) as tmp:
        results = run_workers(_hf_to_mcore_worker, workers, (reader.hf_dir, tmp, dtype, progress))
        write_checkpoint_metadata(
            tmp, reader.config, dtype, reader.hf_dir, ("config.json", *reader.carried_files()),
            extra={"source": reader.hf_dir, "workers": workers},
        )
    return ConversionResult(
        out_dir=os.path.abspath(out_dir),
        workers=workers,
        num_tensors=sum(r["hf_tensors"] for r in results),
        bytes_written=sum(r["bytes"] for r in results),
        seconds=time.perf_counter() - t0,
    )


def _source_itemsize(reader: HFCheckpointReader) -> int:
    """Bytes per element of the checkpoint's floating tensors (the most common one)."""
    sizes = [info.dtype.itemsize for info in reader.tensors.values() if info.dtype.is_floating_point]
    return max(set(sizes), key=sizes.count) if sizes else 4
