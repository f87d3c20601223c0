"""Load a Megatron dist checkpoint into a model that has `_extra_state` entries the checkpoint lacks, and nothing else.

Checkpoints written with the local layer spec (`aapo-convert` on a CPU node) have no entry for state that only
Transformer Engine modules carry (e.g. `TEDotProductAttention`'s `core_attention._extra_state`: FP8 metadata).
With Megatron's default strictness the TE model then fails in torch DCP with "Missing key in checkpoint
state_dict: ..._extra_state". Here Megatron's `StrictHandling.RETURN_UNEXPECTED` drops the requested entries the
checkpoint does not have and returns their keys; those named `*_extra_state` are tolerated (the module keeps its
freshly initialised extra state), any other one is an error naming it:

    state = load_tolerating_extra_state(model.sharded_state_dict(), ckpt_dir)    # collective
    load_module_state(model, state)                                                 # torch load_state_dict
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from aapo_megatron.checkpoint.errors import MissingTensorError

EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state(key: str) -> bool:
    """True for a module's extra-state entry (torch's `<prefix>._extra_state`, also Megatron's sharded key)."""
    return key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def _on_every_rank(keys: Iterable[str]) -> list[str]:
    """The union over all ranks of `keys` (Megatron's unexpected keys can differ per rank), sorted."""
    local = sorted(set(keys))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted(set().union(*gathered))


def load_tolerating_extra_state(sharded_state_dict: dict, ckpt_dir: str, **load_kwargs) -> dict:
    """`dist_checkpointing.load` (collective) that skips requested `*_extra_state` entries the checkpoint lacks.

    Any other requested key absent from the checkpoint raises MissingTensorError naming it, on every rank.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, _, not_in_ckpt = dist_checkpointing.load(sharded_state_dict, ckpt_dir,
                                                    strict=StrictHandling.RETURN_UNEXPECTED, **load_kwargs)
    absent = [k for k in _on_every_rank(not_in_ckpt) if not is_extra_state(k)]
    if absent:
        raise MissingTensorError(f"the checkpoint {ckpt_dir} has no entry for {absent} (only Transformer Engine "
                                 f"'{EXTRA_STATE_SUFFIX}' entries may be missing)")
    return state


def load_module_state(module: torch.nn.Module, state: dict, ckpt_dir: str = "the checkpoint") -> None:
    """module.load_state_dict(state) where only `*_extra_state` entries may be absent from `state`."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise MissingTensorError(f"loading {ckpt_dir}: the model's {missing} are not in the loaded state and its "
                                 f"{list(result.unexpected_keys)} are not in the model")
