"""The HF <-> Megatron-Core weight contract: names, layouts, TP sharding and PP layer placement.

Pure tensor code, no torch.distributed. The names come from the model family's HF name
table (`models/families/`); the tensor math from its converters (`models.converters`) and
the TP layouts (`models.tensor_layout`).
Three layers of API:

1. Names and groups. A `WeightGroup` is one Megatron tensor and the HF tensors it is
   made of (linear_qkv <- q_proj, k_proj, v_proj; linear_fc1 <- gate_proj, up_proj;
   everything else 1:1). `WeightMapping.layer_groups(i)` lists the groups of global
   layer i, `global_groups()` the embedding / final norm / output layer, so a
   streaming converter needs only one layer's HF tensors in memory:

       m = WeightMapping(spec)                          # spec: models.arch.ArchSpec
       for i in range(spec.num_layers):
           hf = {n: reader.get(n) for n in m.layer_hf_names(i)}
           mc = m.hf_to_megatron_layer(i, hf)          # {global Megatron name: full tensor}

2. Full-tensor conversion (`to_megatron` / `to_hf`) of one group, bitwise reversible,
   by the group's converter (`models.converters`):
   - linear_qkv uses Megatron's interleaved GQA layout: for each query group g,
     the rows are [q heads of g; k head g; v head g], i.e. [ng, (hpg + 2) * d, H];
   - linear_fc1 = [gate; up] along rows;
   - tied embeddings: no output_layer / lm_head group;
   - the vocab rows of embedding/output_layer are NOT padded in the full tensor:
     the full Megatron tensor has exactly `spec.vocab_size` rows, like HF.

3. TP and PP placement of full Megatron tensors:
   - `shard(name, full, tp_rank, tp_size)` / `unshard(name, shards)` for the layouts
     replicated (norms), column (qkv weight/bias: whole query groups per rank),
     gated_column (fc1: each rank holds [gate_r; up_r]), row (linear_proj, linear_fc2)
     and vocab (embedding/output: padded to `spec.padded_vocab_size(tp)` then split);
   - `layer_range(pp_rank, pp_size)`, `local_name(global_name, pp_rank, pp_size)` and
     `global_name(local_name, pp_rank, pp_size)` map global layer indices to the
     `decoder.layers.{local}` index a pipeline stage's model uses.

Naming: `naming="local"` (Megatron's local layer spec: input_layernorm.weight,
pre_mlp_layernorm.weight) or `naming="te"` (Transformer Engine spec: the norms are
fused into linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch

from aapo_megatron.models.arch import ArchSpec
from aapo_megatron.models.converters import Converter, MappingError
from aapo_megatron.models.families.base import (
    EMBEDDING,
    FINAL_NORM,
    HF_EMBEDDING,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    OUTPUT_LAYER,
    WeightEntry,
)
from aapo_megatron.models.tensor_layout import TPLayout, shard_shape, shard_tensor, stage_layer_range, unshard_tensor

Naming = Literal["local", "te"]
HFSource = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WeightGroup:
    """One Megatron tensor and the HF tensors it is built from."""

    megatron_name: str
    """Megatron state-dict name with the GLOBAL layer index (e.g. decoder.layers.7.mlp.linear_fc1.weight)."""
    hf_names: tuple[str, ...]
    """HF names, in the order `to_megatron` concatenates them (q, k, v / gate, up)."""
    converter: Converter
    """How the HF tensors combine: COPY, QKV (interleaved GQA, weight or bias), GATE_UP ([gate; up])."""
    tp_layout: TPLayout
    """How the full Megatron tensor is split across TP ranks."""
    layer: Optional[int] = None
    """Global layer index, or None for the embedding / final norm / output layer."""
    shape: tuple[int, ...] = ()
    """Full Megatron shape (vocab rows unpadded)."""


def _mc_layer(i: int, suffix: str) -> str:
    return f"decoder.layers.{i}.{suffix}"


class WeightMapping:
    """HF <-> Megatron mapping for one architecture (see the module docstring for the API)."""

    def __init__(self, spec: ArchSpec, naming: Naming = "local") -> None:
        if naming not in ("local", "te"):
            raise ValueError(f"naming must be 'local' or 'te', got {naming!r}")
        self.spec = spec
        self.naming: Naming = naming
        self.family = spec.model_family

    # ------------------------------------------------------------------ groups

    def _group(self, entry: WeightEntry, layer: Optional[int]) -> WeightGroup:
        mc_prefix, hf_prefix = ("", "") if layer is None else (f"decoder.layers.{layer}.", f"model.layers.{layer}.")
        return WeightGroup(mc_prefix + entry.megatron_name(self.naming), tuple(hf_prefix + n for n in entry.hf),
                           entry.converter, entry.tp_layout, layer, entry.resolve_shape(self.spec))

    def layer_groups(self, layer: int) -> list[WeightGroup]:
        """The weight groups of global layer `layer` (0-based), in the family table's order."""
        if not 0 <= layer < self.spec.num_layers:
            raise MappingError(f"layer index {layer} out of range [0, {self.spec.num_layers})")
        return [self._group(entry, layer) for entry in self.family.layer_weights]

    def global_groups(self) -> list[WeightGroup]:
        """Groups outside the layers: embedding, final norm and (untied only) the output layer."""
        entries = list(self.family.global_weights)
        if not self.spec.tie_word_embeddings:
            entries.append(self.family.output_weight)
        return [self._group(entry, None) for entry in entries]

    def groups(self) -> list[WeightGroup]:
        """All groups: global ones first, then layer by layer."""
        out = self.global_groups()
        for i in range(self.spec.num_layers):
            out += self.layer_groups(i)
        return out

    def layer_hf_names(self, layer: int) -> list[str]:
        """HF tensor names global layer `layer` needs."""
        return [n for g in self.layer_groups(layer) for n in g.hf_names]

    def global_hf_names(self) -> list[str]:
        """HF tensor names outside the layers (embed_tokens, norm, lm_head when untied)."""
        return [n for g in self.global_groups() for n in g.hf_names]

    def hf_names(self) -> list[str]:
        """Every HF tensor name the model has (tied models: no lm_head.weight)."""
        return [n for g in self.groups() for n in g.hf_names]

    def megatron_names(self) -> list[str]:
        """Every Megatron tensor name (global layer indices)."""
        return [g.megatron_name for g in self.groups()]

    def group(self, megatron_name: str) -> WeightGroup:
        """The group of a Megatron name (global layer index)."""
        match = _LAYER_RE.match(megatron_name)
        candidates = self.layer_groups(int(match.group(1))) if match else self.global_groups()
        for g in candidates:
            if g.megatron_name == megatron_name:
                return g
        raise MappingError(f"unknown Megatron tensor {megatron_name!r} for {self.spec.hf_architecture} "
                           f"(naming={self.naming!r})")

    def group_of_hf(self, hf_name: str) -> WeightGroup:
        """The group an HF tensor name belongs to."""
        match = _HF_LAYER_RE.match(hf_name)
        candidates = self.layer_groups(int(match.group(1))) if match else self.global_groups()
        for g in candidates:
            if hf_name in g.hf_names:
                return g
        raise MappingError(f"unknown HF tensor {hf_name!r} for {self.spec.hf_architecture}")

    # ------------------------------------------------------------------ shapes

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """Expected shape of an HF tensor (also lm_head.weight of a tied model, which has no group)."""
        if hf_name in self.family.output_weight.hf and self.spec.tie_word_embeddings:
            g = self._group(self.family.output_weight, None)
        else:
            g = self.group_of_hf(hf_name)
        return g.converter.hf_shapes(self.spec, g.shape)[g.hf_names.index(hf_name)]

    def megatron_shape(self, megatron_name: str, tp_size: int = 1) -> tuple[int, ...]:
        """Shape of a Megatron tensor on one TP rank (tp_size=1: the full tensor; vocab rows unpadded)."""
        g = self.group(megatron_name)
        return shard_shape(g.shape, g.tp_layout, tp_size, self.spec.padded_vocab_size(tp_size))

    # ------------------------------------------------------------------ full-tensor conversion

    def to_megatron(self, group: WeightGroup, hf: HFSource) -> torch.Tensor:
        """Full Megatron tensor of `group` from its HF tensors (`hf`: dict or name -> tensor getter); checks shapes."""
        return group.converter.to_megatron(self.spec, [self.hf_tensor(hf, name) for name in group.hf_names])

    def to_hf(self, group: WeightGroup, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF tensors of `group` from its full Megatron tensor (vocab rows beyond vocab_size are dropped)."""
        if group.tp_layout == "vocab":
            tensor = tensor[: self.spec.vocab_size]
        expected = self.megatron_shape(group.megatron_name)
        if tuple(tensor.shape) != expected:
            raise MappingError(f"Megatron tensor {group.megatron_name!r} has shape {tuple(tensor.shape)}, "
                               f"expected {expected}")
        return dict(zip(group.hf_names, group.converter.to_hf(self.spec, tensor)))

    def hf_tensor(self, hf: HFSource, name: str) -> torch.Tensor:
        """HF tensor `name` from a dict or getter, after checking its shape (MappingError names it if absent)."""
        try:
            tensor = hf[name] if isinstance(hf, Mapping) else hf(name)
        except KeyError:
            tensor = None
        if tensor is None:
            raise MappingError(f"missing HF tensor {name!r} (expected shape {self.hf_shape(name)}) "
                               f"for {self.spec.hf_architecture}")
        expected = self.hf_shape(name)
        if tuple(tensor.shape) != expected:
            raise MappingError(f"HF tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        return tensor

    def hf_to_megatron_layer(self, layer: int, hf: HFSource) -> dict[str, torch.Tensor]:
        """{global Megatron name: full tensor} for one layer, from that layer's HF tensors."""
        return {g.megatron_name: self.to_megatron(g, hf) for g in self.layer_groups(layer)}

    def megatron_to_hf_layer(self, layer: int, mc: HFSource) -> dict[str, torch.Tensor]:
        """{HF name: tensor} for one layer, from that layer's full Megatron tensors (global names)."""
        out: dict[str, torch.Tensor] = {}
        for g in self.layer_groups(layer):
            out.update(self.to_hf(g, self._fetch_mc(mc, g.megatron_name)))
        return out

    def hf_to_megatron(self, hf: HFSource, layers: Optional[Iterable[int]] = None,
                       include_globals: bool = True) -> dict[str, torch.Tensor]:
        """Full Megatron state dict (global names) from HF tensors; `layers` restricts to some layers."""
        out: dict[str, torch.Tensor] = {}
        if include_globals:
            out.update({g.megatron_name: self.to_megatron(g, hf) for g in self.global_groups()})
        for i in range(self.spec.num_layers) if layers is None else layers:
            out.update(self.hf_to_megatron_layer(i, hf))
        return out

    def megatron_to_hf(self, mc: HFSource, layers: Optional[Iterable[int]] = None,
                       include_globals: bool = True) -> dict[str, torch.Tensor]:
        """HF state dict from full Megatron tensors (global names); tied models produce no lm_head.weight."""
        out: dict[str, torch.Tensor] = {}
        if include_globals:
            for g in self.global_groups():
                out.update(self.to_hf(g, self._fetch_mc(mc, g.megatron_name)))
        for i in range(self.spec.num_layers) if layers is None else layers:
            out.update(self.megatron_to_hf_layer(i, mc))
        return out

    def _fetch_mc(self, mc: HFSource, name: str) -> torch.Tensor:
        try:
            tensor = mc[name] if isinstance(mc, Mapping) else mc(name)
        except KeyError:
            tensor = None
        if tensor is None:
            raise MappingError(f"missing Megatron tensor {name!r} (expected shape {self.megatron_shape(name)})")
        return tensor

    # ------------------------------------------------------------------ tensor parallelism

    def shard(self, megatron_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """TP rank `tp_rank`'s slice of a full Megatron tensor (a view where possible; vocab rows padded with zeros)."""
        g = self.group(megatron_name)
        expected = self.megatron_shape(megatron_name)
        if tuple(full.shape) != expected:
            raise MappingError(f"Megatron tensor {megatron_name!r} has shape {tuple(full.shape)}, expected {expected}")
        problem = g.converter.tp_problem(self.spec, tp_size)
        if problem:
            raise MappingError(f"{problem} to shard {megatron_name!r}")
        return shard_tensor(full, g.tp_layout, tp_rank, tp_size, self.spec.padded_vocab_size(tp_size))

    def unshard(self, megatron_name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full Megatron tensor from all TP ranks' shards (rank order); vocab padding removed."""
        g = self.group(megatron_name)
        tp_size = len(shards)
        expected = self.megatron_shape(megatron_name, tp_size)
        for r, t in enumerate(shards):
            if tuple(t.shape) != expected:
                raise MappingError(f"TP shard {r} of {megatron_name!r} has shape {tuple(t.shape)}, "
                                   f"expected {expected} at tp={tp_size}")
        return unshard_tensor(shards, g.tp_layout, self.spec.vocab_size)

    def hf_split_dim(self, hf_name: str) -> Optional[int]:
        """Dim along which an HF tensor is split across TP ranks (0: column/vocab, 1: row), None if replicated."""
        layout = self.group_of_hf(hf_name).tp_layout
        return None if layout == "replicated" else (1 if layout == "row" else 0)

    def shard_to_hf(self, megatron_name: str, shard: torch.Tensor, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
        """TP rank's slices of the HF tensors from its Megatron shard (no communication; see `hf_split_dim`).

        Each HF slice is the contiguous `tp_rank`-th chunk of the HF tensor along `hf_split_dim`
        (vocab: rows [r * Vp/tp, ...) without padding rows). Concatenating the slices of all ranks gives the HF tensor.
        """
        g = self.group(megatron_name)
        s = self.spec
        expected = self.megatron_shape(megatron_name, tp_size)
        if tuple(shard.shape) != expected:
            raise MappingError(f"TP shard of {megatron_name!r} has shape {tuple(shard.shape)}, "
                               f"expected {expected} at tp={tp_size}")
        if g.tp_layout == "vocab":
            start = tp_rank * expected[0]
            return {g.hf_names[0]: shard[: max(0, min(expected[0], s.vocab_size - start))]}
        return dict(zip(g.hf_names, g.converter.to_hf(s, shard, tp_size)))

    # ------------------------------------------------------------------ pipeline parallelism

    def layer_range(self, pp_rank: int, pp_size: int) -> range:
        """Global layer indices held by pipeline stage `pp_rank` (layers split evenly)."""
        return stage_layer_range(self.spec.num_layers, pp_rank, pp_size)

    def stage_of(self, megatron_name: str, pp_size: int) -> list[int]:
        """Pipeline stages that hold a Megatron tensor (the tied embedding lives on first and last)."""
        match = _LAYER_RE.match(megatron_name)
        if match:
            per = self.spec.num_layers // pp_size
            return [int(match.group(1)) // per]
        if megatron_name == EMBEDDING:
            return [0]
        return [pp_size - 1]

    def local_name(self, megatron_name: str, pp_rank: int, pp_size: int) -> Optional[str]:
        """Name inside stage `pp_rank`'s model (local layer index), or None if that stage does not hold it."""
        match = _LAYER_RE.match(megatron_name)
        if match:
            layer = int(match.group(1))
            r = self.layer_range(pp_rank, pp_size)
            if layer not in r:
                return None
            return _mc_layer(layer - r.start, match.group(2))
        if megatron_name == EMBEDDING:
            return megatron_name if pp_rank == 0 else None
        if megatron_name in (FINAL_NORM, OUTPUT_LAYER):
            return megatron_name if pp_rank == pp_size - 1 else None
        raise MappingError(f"unknown Megatron tensor {megatron_name!r}")

    def global_name(self, local_name: str, pp_rank: int, pp_size: int) -> str:
        """Global name of a stage-local Megatron name (adds the stage's first layer index)."""
        match = _LAYER_RE.match(local_name)
        if not match:
            return local_name
        start = self.layer_range(pp_rank, pp_size).start
        return _mc_layer(int(match.group(1)) + start, match.group(2))

    def stage_groups(self, pp_rank: int, pp_size: int) -> list[WeightGroup]:
        """Groups whose Megatron tensor lives on stage `pp_rank` (the tied output weight is not a group)."""
        out = [g for g in self.global_groups() if self.local_name(g.megatron_name, pp_rank, pp_size) is not None]
        for i in self.layer_range(pp_rank, pp_size):
            out += self.layer_groups(i)
        return out


def detect_naming(names: Iterable[str]) -> Naming:
    """'te' if the Megatron names use Transformer Engine's fused layer-norm naming, else 'local'."""
    return "te" if any(n.endswith("layer_norm_weight") for n in names) else "local"


__all__ = [
    "EMBEDDING", "FINAL_NORM", "HF_EMBEDDING", "HF_FINAL_NORM", "HF_LM_HEAD", "OUTPUT_LAYER", "HFSource",
    "MappingError", "Naming", "TPLayout", "WeightGroup", "WeightMapping", "detect_naming", "shard_tensor",
    "stage_layer_range", "unshard_tensor",
]
