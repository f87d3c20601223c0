"""The model-family registry: one module per family (its HF name table), one entry per family here.

    family = get_family("qwen2")                     # ModelFamily, or None if not registered
    family = family_of_hf_architecture("Qwen2ForCausalLM")

A new family is one file in this folder (a `FAMILY = ModelFamily(...)`) and one line in `FAMILIES`.
"""

from __future__ import annotations

from typing import Optional

from aapo_megatron.models.families import llama, qwen2, qwen3
from aapo_megatron.models.families.base import ModelFamily, WeightEntry

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}
"""Registered families by name (HF model_type)."""


def get_family(name: str) -> Optional[ModelFamily]:
    """The family registered as `name` (e.g. "llama"), or None."""
    return FAMILIES.get(name)


def family_of_hf_architecture(hf_architecture: str) -> Optional[ModelFamily]:
    """The family whose HF class is `hf_architecture` (e.g. "LlamaForCausalLM"), or None."""
    return next((f for f in FAMILIES.values() if f.hf_architecture == hf_architecture), None)


def supported_hf_architectures() -> str:
    """"LlamaForCausalLM, Qwen2ForCausalLM, ...": the registered HF classes, sorted, for messages."""
    return ", ".join(sorted(f.hf_architecture for f in FAMILIES.values()))


__all__ = ["FAMILIES", "ModelFamily", "WeightEntry", "family_of_hf_architecture", "get_family",
           "supported_hf_architectures"]
