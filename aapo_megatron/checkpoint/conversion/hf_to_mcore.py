"""HF safetensors -> Megatron dist_checkpointing, streamed, with bounded memory.

The conversion runs as W gloo worker processes laid out as a TP=1, PP=W Megatron
job: worker r builds pipeline stage r of the GPTModel (layers [r*L/W, (r+1)*L/W),
plus the embedding on the first and the output layer on the last stage) without
writing its parameters, and all workers save together with Megatron's
`dist_checkpointing.save(model.sharded_state_dict(), dir)` through
`convert.lazy_save`: each tensor is built from the HF shards (`models.mapping`)
only when the checkpoint writer asks for it, written and dropped. Megatron's
sharded state dict stores every tensor with its global shape (layers stacked by
global index), so the result loads at any TP/PP. Per-worker memory: the process
itself plus about one HF group of tensors (e.g. q, k, v of one layer and their
interleaved copy); the stage is never held whole.

    convert_hf_to_mcore("/ckpt/Qwen2.5-7B", "/ckpt/qwen-mcore", dtype="bfloat16", workers=4)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from aapo_megatron.checkpoint.errors import ConversionError
from aapo_megatron.checkpoint.hf import HFCheckpointReader
from aapo_megatron.checkpoint.mcore import write_checkpoint_metadata
from aapo_megatron.checkpoint.conversion.launch import run_workers
from aapo_megatron.checkpoint.conversion.outdir import atomic_output_dir
from aapo_megatron.models.arch import ArchSpec

DTYPES = ("float32", "bfloat16", "float16")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ConversionResult:
    """What a conversion wrote."""

    out_dir: str
    workers: int
    num_tensors: int
    bytes_written: int
    seconds: float
    peak_live_bytes: int = 0
    """The most bytes of converted tensors one worker held at once (tensors produced for writing, still alive)."""
    worker_base_rss: int = 0
    """The largest RSS of a worker once set up (imports, process group, empty model), before it read any weight."""


def resolve_dtype_name(dtype: Optional[str], spec: ArchSpec) -> str:
    """The dtype to convert to: `dtype` if given, else the checkpoint's own (float32 if it names another)."""
    if dtype is None:
        dtype = spec.torch_dtype if spec.torch_dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


DEFAULT_BYTES_PER_WORKER = 2 * 2**30
"""`workers=None` gives each worker at least this many bytes to convert (2 GiB), up to one worker per core."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)


def choose_workers(num_layers: int, model_bytes: int, workers: Optional[int], cores: Optional[int] = None,
                   bytes_per_worker: int = DEFAULT_BYTES_PER_WORKER) -> int:
    """Number of worker processes (= pipeline stages); must divide num_layers.

    None: enough workers that each converts at most `bytes_per_worker` (a smaller share is not worth a
    process), but no more than `cores` (default: `available_cores()`), since workers stream one tensor at a
    time and their memory does not grow with their share. Always a divisor of num_layers.
    """
    if workers is not None:
        if workers < 1 or num_layers % workers:
            raise ConversionError(
                f"--workers {workers} must be a positive divisor of the number of layers ({num_layers})"
            )
        return workers
    cores = available_cores() if cores is None else max(1, cores)
    divisors = [w for w in range(1, num_layers + 1) if num_layers % w == 0]
    by_work = next((w for w in divisors if model_bytes / w <= bytes_per_worker), divisors[-1])
    return max(w for w in divisors if w <= min(by_work, cores))


def validate_hf_checkpoint(reader: HFCheckpointReader) -> tuple[ArchSpec, list[str]]:
    """ArchSpec of the checkpoint after checking every tensor it needs exists with the right shape; also unused names."""
    from aapo_megatron.models.mapping import WeightMapping

    spec = ArchSpec.from_hf_config(reader.config)  # UnsupportedArchitectureError names it + lists the supported
    mapping = WeightMapping(spec)
    needed = mapping.hf_names()
    for name in needed:
        reader.check(name, mapping.hf_shape(name))  # MissingTensorError / ShapeMismatchError
    unused = sorted(set(reader.names()) - set(needed))
    return spec, unused


def _hf_to_mcore_worker(rank: int, world: int, hf_dir: str, out_dir: str, dtype: str, progress: bool) -> dict:
    """Worker `rank` of `world`: pipeline stage `rank`, saved collectively with each tensor built when it is written."""
    from aapo_megatron.checkpoint.conversion.memory import current_rss, import_megatron_without_compile

    import_megatron_without_compile()  # before anything else imports Megatron: ~70 MiB less per worker
    from tqdm import tqdm

    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.checkpoint.conversion.lazy_save import save_mcore_checkpoint_lazy
    from aapo_megatron.models.gpt import build_gpt_model, transformer_config
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.models.weights import model_naming, stage_hf_names

    init_distributed(ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=world,
                                    backend="gloo", timeout_minutes=120.0))
    seed_everything(0)
    reader = HFCheckpointReader(hf_dir)  # headers only
    spec = ArchSpec.from_hf_config(reader.config)
    # No init: the parameters are allocated but never written (untouched pages cost no RSS); the model only
    # provides Megatron's sharded_state_dict. The data comes from `produce` as the checkpoint writer asks for it.
    config = transformer_config(spec, 1, world, dtype, perform_initialization=False)
    model = build_gpt_model(spec, dtype=dtype, config=config)
    mapping = WeightMapping(spec, naming=model_naming(model))
    names = stage_hf_names(mapping, rank, world)
    bar = tqdm(total=len(names), desc=f"hf-to-mcore stage {rank}/{world}", unit="tensor",
               disable=not progress or rank != 0, leave=False)
    produce = _stage_producer(mapping, reader, rank, world, bar)
    base_rss = current_rss()
    tracker = save_mcore_checkpoint_lazy(model, out_dir, produce)
    bar.close()
    # the last stage's copy of a tied embedding is not saved (Megatron marks it a replica)
    params = [p for n, p in model.named_parameters() if not (spec.tie_word_embeddings and n == "output_layer.weight")]
    return {"num_params": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params),
            "hf_tensors": len(names), "peak_live_bytes": tracker.peak, "produced": tracker.count, "base_rss": base_rss}


def _stage_producer(mapping, reader: HFCheckpointReader, pp_rank: int, pp_size: int, bar=None):
    """produce(local name, first row, end row) -> those rows of stage `pp_rank`'s parameter (TP=1), from the HF files.

    Each call reads only the HF tensors it needs (plain file reads, no mmap). linear_fc1 is saved as its
    [gate; up] halves: each half is the HF gate_proj / up_proj tensor itself, not a slice of a concatenation.
    """
    from aapo_megatron.models.converters import GATE_UP
    from aapo_megatron.models.mapping import EMBEDDING, OUTPUT_LAYER

    spec = mapping.spec

    def fetch(name):
        if bar is not None:
            bar.update(1)
        return reader.read(name)

    def produce(local: str, first: int, end: int):
        if local == OUTPUT_LAYER and spec.tie_word_embeddings:
            name = EMBEDDING  # the last stage's copy of a tied embedding
        else:
            name = mapping.global_name(local, pp_rank, pp_size)
        group = mapping.group(name)
        if group.converter is GATE_UP:
            f = spec.ffn_hidden_size
            if (first, end) in ((0, f), (f, 2 * f)):
                return mapping.hf_tensor(fetch, group.hf_names[0 if first == 0 else 1])
        full = mapping.shard(name, mapping.to_megatron(group, fetch), 0, 1)  # TP=1: vocab rows padded as Megatron's
        return full if (first, end) == (0, full.shape[0]) else full[first:end]

    return produce


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
        peak_live_bytes=max(r["peak_live_bytes"] for r in results),
        worker_base_rss=max(r["base_rss"] for r in results),
    )


def _source_itemsize(reader: HFCheckpointReader) -> int:
    """Bytes per element of the checkpoint's floating tensors (the most common one)."""
    sizes = [info.dtype.itemsize for info in reader.tensors.values() if info.dtype.is_floating_point]
    return max(set(sizes), key=sizes.count) if sizes else 4
