"""Bring-up of the policy on every rank: tokenizer, architecture, model, initial weights, optimizer, and the
trainer checkpoint it saves and resumes from (policy + optimizer, LR schedule, loop counters, RNG)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from aapo_megatron.config import Config, ConfigError, OptimConfig
from aapo_megatron.checkpoint.hf import HFCheckpointReader
from aapo_megatron.models.mapping import WeightMapping
from aapo_megatron.checkpoint.mcore import is_mcore_checkpoint, load_mcore_checkpoint, read_arch
from aapo_megatron.data.tokenizer import tokenizer_for_config
from aapo_megatron.distributed import current_platform
from aapo_megatron.models.activation_memory import model_config_overrides
from aapo_megatron.models.arch import ArchSpec
from aapo_megatron.models.gpt import build_policy, resolve_dtype
from aapo_megatron.models.weights import load_hf_weights, model_naming
from aapo_megatron.checkpoint.errors import CheckpointError
from aapo_megatron.checkpoint.manager import CheckpointInfo, CheckpointManager
from aapo_megatron.trainer.optim import build_optimizer as megatron_optimizer
from aapo_megatron.trainer.optim import build_scheduler, wrap_ddp
from aapo_megatron.trainer.rank_zero import on_rank0
from aapo_megatron.trainer.state import (MODEL_DIR, load_model_and_optimizer, load_rng, load_trainer_state,
                                         save_model_and_optimizer, save_rng, save_trainer_state)

TOKENIZER_DIR = "tokenizer"


def load_tokenizer(cfg: Config, run_dir: str, group: Optional[dist.ProcessGroup]) -> Any:
    """Collective: model.tokenizer, else one trained once into <run_dir>/tokenizer (data.train_tokenizer, on rank
    0), else model.path."""
    if cfg.model.tokenizer is None and not cfg.data.train_tokenizer and cfg.model.path is None:
        raise ConfigError("no tokenizer: set model.tokenizer, model.path, or data.train_tokenizer=true")
    out_dir = os.path.join(run_dir, TOKENIZER_DIR)
    on_rank0(lambda: tokenizer_for_config(cfg, out_dir), group, share=False)  # trains (or reuses) on rank 0 only
    return tokenizer_for_config(cfg, out_dir)


def arch_spec(cfg: Config, vocab_size: int) -> ArchSpec:
    """The policy's architecture: model.path's (HF or Megatron checkpoint), else model.scratch with `vocab_size`."""
    if cfg.model.path is None:
        return ArchSpec.from_scratch(cfg.model.scratch).replace(vocab_size=vocab_size)
    if is_mcore_checkpoint(cfg.model.path):
        return read_arch(cfg.model.path)
    return ArchSpec.from_hf_dir(cfg.model.path)


def build_model(cfg: Config, spec: ArchSpec) -> tuple[torch.dtype, torch.nn.Module, WeightMapping]:
    """(dtype, this rank's policy shard with its starting weights, its HF <-> Megatron mapping)."""
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_policy(spec, dtype=dtype, config_overrides=model_config_overrides(cfg.parallel, cfg.trainer))
    mapping = WeightMapping(spec, naming=model_naming(model))
    load_initial_weights(model, mapping, cfg.model.path)
    return dtype, model, mapping


def load_initial_weights(model: torch.nn.Module, mapping: WeightMapping, path: Optional[str]) -> None:
    """Starting weights of the policy: `path` (HF or Megatron), else (None) Megatron's random init."""
    if path is None:
        return
    if is_mcore_checkpoint(path):
        load_mcore_checkpoint(model, path)
        return
    reader = HFCheckpointReader(path)
    load_hf_weights(model, mapping, lambda name: reader.load([name])[name])


def build_optimizer(chunks: Optional[list], model: torch.nn.Module, ocfg: OptimConfig, dtype: torch.dtype,
                    total_updates: int, lr: Optional[float] = None, constant: bool = False) -> tuple:
    """(DDP chunks (built once), a fresh optimizer, its LR schedule over `total_updates`); `lr`/`constant`
    override optim.lr and the schedule (SFT)."""
    use_dist_opt = current_platform().distributed_optimizer  # Megatron's DistributedOptimizer refuses CPU tensors
    if chunks is None:
        chunks = wrap_ddp([model], use_distributed_optimizer=use_dist_opt)
    if lr is not None:
        ocfg = dataclasses.replace(ocfg, lr=lr, min_lr=min(ocfg.min_lr, lr), warmup_steps=0 if constant else ocfg.warmup_steps,
                                   lr_schedule="constant" if constant else ocfg.lr_schedule)
    optimizer = megatron_optimizer(chunks, ocfg, bf16=dtype == torch.bfloat16, use_distributed_optimizer=use_dist_opt)
    return chunks, optimizer, build_scheduler(optimizer, ocfg, total_updates)


def find_checkpoint(ckpt: CheckpointManager, resume: Optional[str],
                    group: Optional[dist.ProcessGroup]) -> Optional[CheckpointInfo]:
    """Collective: the checkpoint `checkpoint.resume` selects (rank 0 resolves it), or None for a fresh start."""
    info = on_rank0(lambda: ckpt.resolve(resume), group)
    if info is None and resume not in (None, "auto"):
        raise CheckpointError(f"no checkpoint at {resume}")
    return info


def read_trainer_state(info: CheckpointInfo) -> dict:
    """The checkpoint's trainer state (loop counters, scheduler, config, world size)."""
    trainer_state = load_trainer_state(info.path)
    if trainer_state is None:
        raise CheckpointError(f"checkpoint {info.path} has no trainer state")
    return trainer_state


def load_checkpoint(info: CheckpointInfo, trainer_state: dict, chunks: list, optimizer: Any, scheduler: Any) -> None:
    """Collective: load policy + optimizer, LR schedule and this rank's RNG from the checkpoint."""
    load_model_and_optimizer(os.path.join(info.path, MODEL_DIR), chunks, optimizer)
    scheduler.load_state_dict(trainer_state["scheduler"])
    load_rng(info.path)


def save_checkpoint(ckpt: CheckpointManager, step: int, chunks: list, optimizer: Any,
                    trainer_state: Optional[dict]) -> CheckpointInfo:
    """Collective: policy + optimizer (dist checkpoint), `trainer_state` (rank 0's; None elsewhere), RNG."""
    def write(tmp_dir: str) -> None:
        save_model_and_optimizer(os.path.join(tmp_dir, MODEL_DIR), chunks, optimizer)
        save_rng(tmp_dir)
        if trainer_state is not None:
            save_trainer_state(tmp_dir, trainer_state)

    return ckpt.save(step, write)
