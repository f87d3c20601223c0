"""What a training checkpoint holds, and how it is written and read inside a checkpoint directory.

    <step dir>/model/            Megatron dist checkpoint (torch_dist) of the policy and its optimizer
    <step dir>/trainer.pt        rank 0: step, LR scheduler, data sampler, counters, reference cache, config
    <step dir>/rng/rank_XXXXX.pt every rank's RNG states (python, numpy, torch)

The directory itself is made atomic and verified by `checkpoint.manager.CheckpointManager`.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from aapo_megatron.distributed import current_platform

MODEL_DIR = "model"
TRAINER_FILE = "trainer.pt"
RNG_DIR = "rng"


def rng_state() -> dict[str, Any]:
    """This process's RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if current_platform().cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and current_platform().cuda:
        torch.cuda.set_rng_state(state["cuda"])


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP wrapper (checkpoint keys then match `aapo-convert`'s)."""
    from aapo_megatron.models.weights import unwrap_model

    return unwrap_model(chunk)


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return _unwrap(model_chunks[0]).sharded_state_dict()
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_model_and_optimizer(path: str, model_chunks: list[torch.nn.Module], optimizer=None) -> None:
    """Collective: write the policy (and optimizer state) as a Megatron dist checkpoint under `path`."""
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    state = {"model": _model_sharded_state_dict(model_chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
    dist_checkpointing.save(state, path)


def load_model_and_optimizer(path: str, model_chunks: list[torch.nn.Module], optimizer=None) -> None:
    """Collective: load what `save_model_and_optimizer` wrote, into models built with any TP/PP.

    Model `_extra_state` entries the checkpoint lacks keep their initial value (`checkpoint.extra_state`); any other
    absent entry is a MissingTensorError naming it.
    """
    from aapo_megatron.checkpoint.extra_state import load_module_state, load_tolerating_extra_state

    state = {"model": _model_sharded_state_dict(model_chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    loaded = load_tolerating_extra_state(state, path)
    if len(model_chunks) == 1:
        load_module_state(_unwrap(model_chunks[0]), loaded["model"], path)
    else:
        for i, chunk in enumerate(model_chunks):
            load_module_state(_unwrap(chunk), loaded["model"][f"model{i}"], path)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


def save_rng(step_dir: str) -> None:
    """Every rank writes its RNG states."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(os.path.join(step_dir, RNG_DIR), exist_ok=True)
    torch.save(rng_state(), os.path.join(step_dir, RNG_DIR, f"rank_{rank:05d}.pt"))


def load_rng(step_dir: str) -> None:
    """Every rank restores its RNG states (a missing file means the world size changed: keep the current ones)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(step_dir, RNG_DIR, f"rank_{rank:05d}.pt")
    if os.path.isfile(path):
        set_rng_state(torch.load(path, weights_only=False))


def save_trainer_state(step_dir: str, state: dict[str, Any]) -> None:
    """Rank 0 writes the trainer's own state (small)."""
    torch.save(state, os.path.join(step_dir, TRAINER_FILE))


def load_trainer_state(step_dir: str) -> Optional[dict[str, Any]]:
    """The trainer state of a checkpoint, or None if it has none."""
    path = os.path.join(step_dir, TRAINER_FILE)
    return torch.load(path, weights_only=False) if os.path.isfile(path) else None
