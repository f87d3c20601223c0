"""HF <-> Megatron-Core weight mapping: names, layouts, TP sharding and PP layer placement.

Pure tensor code, no torch.distributed. Three layers of API:

1. Names and groups. A `WeightGroup` is one Megatron tensor and the HF tensors it is
   made of (linear_qkv <- q_proj, k_proj, v_proj; linear_fc1 <- gate_proj, up_proj;
   everything else 1:1). `WeightMapping.layer_groups(i)` lists the groups of global
   layer i, `global_groups()` the embedding / final norm / output layer, so a
   streaming converter needs only one layer's HF tensors in memory:

       m = WeightMapping(spec)                          # spec: models.arch.ArchSpec
       for i in range(spec.num_layers):
           hf = {n: reader.get(n) for n in m.layer_hf_names(i)}
           mc = m.hf_to_megatron_layer(i, hf)          # {global Megatron name: full tensor}

2. Full-tensor conversion (`to_megatron` / `to_hf`) of one group, bitwise reversible:
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

Naming = Literal["local", "te"]
TPLayout = Literal["replicated", "column", "gated_column", "row", "vocab"]
Converter = Literal["copy", "qkv", "qkv_bias", "fc1"]
HFSource = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """A tensor is missing, has the wrong shape, or its name is unknown to the mapping."""


@dataclass(frozen=True)
class WeightGroup:
    """One Megatron tensor and the HF tensors it is built from."""

    megatron_name: str
    """Megatron state-dict name with the GLOBAL layer index (e.g. decoder.layers.7.mlp.linear_fc1.weight)."""
    hf_names: tuple[str, ...]
    """HF names, in the order `to_megatron` concatenates them (q, k, v / gate, up)."""
    converter: Converter
    """How the HF tensors combine: copy, qkv (interleaved GQA), qkv_bias, fc1 ([gate; up])."""
    tp_layout: TPLayout
    """How the full Megatron tensor is split across TP ranks."""
    layer: Optional[int] = None
    """Global layer index, or None for the embedding / final norm / output layer."""


def _hf_layer(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


def _mc_layer(i: int, suffix: str) -> str:
    return f"decoder.layers.{i}.{suffix}"


class WeightMapping:
    """HF <-> Megatron mapping for one architecture (see the module docstring for the API)."""

    def __init__(self, spec: ArchSpec, naming: Naming = "local") -> None:
        if naming not in ("local", "te"):
            raise ValueError(f"naming must be 'local' or 'te', got {naming!r}")
        self.spec = spec
        self.naming: Naming = naming

    # ------------------------------------------------------------------ groups

    def layer_groups(self, layer: int) -> list[WeightGroup]:
        """The weight groups of global layer `layer` (0-based)."""
        s = self.spec
        if not 0 <= layer < s.num_layers:
            raise MappingError(f"layer index {layer} out of range [0, {s.num_layers})")
        h = lambda suffix: _hf_layer(layer, suffix)  # noqa: E731
        m = lambda suffix: _mc_layer(layer, suffix)  # noqa: E731
        input_norm = "self_attention.linear_qkv.layer_norm_weight" if self.naming == "te" else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if self.naming == "te" else "pre_mlp_layernorm.weight"
        groups = [
            WeightGroup(m(input_norm), (h("input_layernorm.weight"),), "copy", "replicated", layer),
            WeightGroup(
                m("self_attention.linear_qkv.weight"),
                (h("self_attn.q_proj.weight"), h("self_attn.k_proj.weight"), h("self_attn.v_proj.weight")),
                "qkv", "column", layer,
            ),
        ]
        if s.qkv_bias:
            groups.append(WeightGroup(
                m("self_attention.linear_qkv.bias"),
                (h("self_attn.q_proj.bias"), h("self_attn.k_proj.bias"), h("self_attn.v_proj.bias")),
                "qkv_bias", "column", layer,
            ))
        if s.qk_norm:
            groups.append(WeightGroup(m("self_attention.q_layernorm.weight"), (h("self_attn.q_norm.weight"),),
                                      "copy", "replicated", layer))
            groups.append(WeightGroup(m("self_attention.k_layernorm.weight"), (h("self_attn.k_norm.weight"),),
                                      "copy", "replicated", layer))
        groups += [
            WeightGroup(m("self_attention.linear_proj.weight"), (h("self_attn.o_proj.weight"),), "copy", "row", layer),
            WeightGroup(m(mlp_norm), (h("post_attention_layernorm.weight"),), "copy", "replicated", layer),
            WeightGroup(m("mlp.linear_fc1.weight"), (h("mlp.gate_proj.weight"), h("mlp.up_proj.weight")),
                        "fc1", "gated_column", layer),
            WeightGroup(m("mlp.linear_fc2.weight"), (h("mlp.down_proj.weight"),), "copy", "row", layer),
        ]
        return groups

    def global_groups(self) -> list[WeightGroup]:
        """Groups outside the layers: embedding, final norm and (untied only) the output layer."""
        groups = [
            WeightGroup(EMBEDDING, (HF_EMBEDDING,), "copy", "vocab"),
            WeightGroup(FINAL_NORM, (HF_FINAL_NORM,), "copy", "replicated"),
        ]
        if not self.spec.tie_word_embeddings:
            groups.append(WeightGroup(OUTPUT_LAYER, (HF_LM_HEAD,), "copy", "vocab"))
        return groups

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
        """Expected shape of an HF tensor."""
        s = self.spec
        if hf_name in (HF_EMBEDDING, HF_LM_HEAD):
            return (s.vocab_size, s.hidden_size)
        if hf_name == HF_FINAL_NORM:
            return (s.hidden_size,)
        match = _HF_LAYER_RE.match(hf_name)
        if not match:
            raise MappingError(f"unknown HF tensor {hf_name!r}")
        suffix = match.group(2)
        shapes = {
            "input_layernorm.weight": (s.hidden_size,),
            "post_attention_layernorm.weight": (s.hidden_size,),
            "self_attn.q_proj.weight": (s.q_size, s.hidden_size),
            "self_attn.k_proj.weight": (s.kv_size, s.hidden_size),
            "self_attn.v_proj.weight": (s.kv_size, s.hidden_size),
            "self_attn.q_proj.bias": (s.q_size,),
            "self_attn.k_proj.bias": (s.kv_size,),
            "self_attn.v_proj.bias": (s.kv_size,),
            "self_attn.q_norm.weight": (s.head_dim,),
            "self_attn.k_norm.weight": (s.head_dim,),
            "self_attn.o_proj.weight": (s.hidden_size, s.q_size),
            "mlp.gate_proj.weight": (s.ffn_hidden_size, s.hidden_size),
            "mlp.up_proj.weight": (s.ffn_hidden_size, s.hidden_size),
            "mlp.down_proj.weight": (s.hidden_size, s.ffn_hidden_size),
        }
        if suffix not in shapes:
            raise MappingError(f"unknown HF tensor {hf_name!r}")
        return shapes[suffix]

    def megatron_shape(self, megatron_name: str, tp_size: int = 1) -> tuple[int, ...]:
        """Shape of a Megatron tensor on one TP rank (tp_size=1: the full tensor; vocab rows unpadded)."""
        g = self.group(megatron_name)
        s = self.spec
        if g.converter == "qkv":
            full = (s.q_size + 2 * s.kv_size, s.hidden_size)
        elif g.converter == "qkv_bias":
            full = (s.q_size + 2 * s.kv_size,)
        elif g.converter == "fc1":
            full = (2 * s.ffn_hidden_size, s.hidden_size)
        else:
            full = self.hf_shape(g.hf_names[0])
        if tp_size == 1:
            return full
        if g.tp_layout == "replicated":
            return full
        if g.tp_layout == "vocab":
            return (s.padded_vocab_size(tp_size) // tp_size,) + full[1:]
        if g.tp_layout == "row":
            return (full[0], full[1] // tp_size)
        return (full[0] // tp_size,) + full[1:]

    # ------------------------------------------------------------------ full-tensor conversion

    def to_megatron(self, group: WeightGroup, hf: HFSource) -> torch.Tensor:
        """Full Megatron tensor of `group` from its HF tensors (`hf`: dict or name -> tensor getter); checks shapes."""
        tensors = [self._fetch(hf, name) for name in group.hf_names]
        s = self.spec
        if group.converter == "copy":
            return tensors[0]
        if group.converter == "fc1":
            return torch.cat(tensors, dim=0)  # [2F, H] = [gate; up]
        q, k, v = tensors
        ng, hpg, d = s.num_key_value_heads, s.heads_per_group, s.head_dim
        tail = q.shape[1:]  # (H,) for weights, () for biases
        qkv = torch.cat(
            [q.reshape(ng, hpg * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1
        )  # [ng, (hpg + 2) * d, (H)]
        return qkv.reshape(ng * (hpg + 2) * d, *tail)

    def to_hf(self, group: WeightGroup, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF tensors of `group` from its full Megatron tensor (vocab rows beyond vocab_size are dropped)."""
        s = self.spec
        if group.tp_layout == "vocab":
            tensor = tensor[: s.vocab_size]
        expected = self.megatron_shape(group.megatron_name)
        if tuple(tensor.shape) != expected:
            raise MappingError(f"Megatron tensor {group.megatron_name!r} has shape {tuple(tensor.shape)}, "
                               f"expected {expected}")
        if group.converter == "copy":
            return {group.hf_names[0]: tensor}
        if group.converter == "fc1":
            gate, up = tensor.chunk(2, dim=0)
            return {group.hf_names[0]: gate, group.hf_names[1]: up}
        ng, hpg, d = s.num_key_value_heads, s.heads_per_group, s.head_dim
        tail = tensor.shape[1:]
        q, k, v = tensor.reshape(ng, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
        return {
            group.hf_names[0]: q.reshape(ng * hpg * d, *tail),
            group.hf_names[1]: k.reshape(ng * d, *tail),
            group.hf_names[2]: v.reshape(ng * d, *tail),
        }

    def _fetch(self, hf: HFSource, name: str) -> torch.Tensor:
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
        if g.converter in ("qkv", "qkv_bias") and self.spec.num_key_value_heads % tp_size:
            # Each rank must hold whole query groups (Megatron requires num_query_groups % tp == 0).
            raise MappingError(f"tp={tp_size} must divide num_key_value_heads={self.spec.num_key_value_heads} "
                               f"to shard {megatron_name!r}")
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
        if g.converter == "copy":
            return {g.hf_names[0]: shard}
        if g.converter == "fc1":
            gate, up = shard.chunk(2, dim=0)
            return {g.hf_names[0]: gate, g.hf_names[1]: up}
        ng, hpg, d = s.num_key_value_heads // tp_size, s.heads_per_group, s.head_dim
        tail = shard.shape[1:]
        q, k, v = shard.reshape(ng, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
        return {
            g.hf_names[0]: q.reshape(ng * hpg * d, *tail),
            g.hf_names[1]: k.reshape(ng * d, *tail),
            g.hf_names[2]: v.reshape(ng * d, *tail),
        }

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


# --------------------------------------------------------------------------- free functions


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer indices [start, stop) of pipeline stage `pp_rank` when `num_layers` are split evenly."""
    if pp_size <= 0 or num_layers % pp_size:
        raise MappingError(f"pipeline size {pp_size} must divide the number of layers ({num_layers})")
    if not 0 <= pp_rank < pp_size:
        raise MappingError(f"pipeline rank {pp_rank} out of range [0, {pp_size})")
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def shard_tensor(full: torch.Tensor, layout: TPLayout, tp_rank: int, tp_size: int,
                 padded_rows: Optional[int] = None) -> torch.Tensor:
    """TP slice of `full` for a layout: column [N/tp, ...], row [N, K/tp], gated_column [2F/tp, H], vocab [Vp/tp, H]."""
    if not 0 <= tp_rank < tp_size:
        raise MappingError(f"tensor-parallel rank {tp_rank} out of range [0, {tp_size})")
    if layout == "replicated":
        return full
    if layout == "vocab":
        rows = padded_rows if padded_rows is not None else full.shape[0]
        if rows % tp_size:
            raise MappingError(f"padded vocab size {rows} is not divisible by tp={tp_size}")
        per = rows // tp_size
        start, stop = tp_rank * per, (tp_rank + 1) * per
        if stop <= full.shape[0]:
            return full[start:stop]
        out = full.new_zeros((per,) + tuple(full.shape[1:]))  # [Vp/tp, H], padding rows are zero
        if start < full.shape[0]:
            out[: full.shape[0] - start] = full[start:]
        return out
    if layout == "column":
        _check_divisible(full.shape[0], tp_size, "rows")
        return full.chunk(tp_size, dim=0)[tp_rank]
    if layout == "row":
        _check_divisible(full.shape[1], tp_size, "columns")
        return full.chunk(tp_size, dim=1)[tp_rank]
    if layout == "gated_column":
        gate, up = full.chunk(2, dim=0)  # [F, H] each
        _check_divisible(gate.shape[0], tp_size, "rows of each fc1 half")
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise MappingError(f"unknown TP layout {layout!r}")


def unshard_tensor(shards: Sequence[torch.Tensor], layout: TPLayout, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Inverse of `shard_tensor`: concatenate TP shards (rank order); vocab rows cut back to `vocab_size`."""
    if layout == "replicated":
        return shards[0]
    if len(shards) == 1 and layout != "vocab":
        return shards[0]
    if layout == "vocab":
        full = torch.cat(list(shards), dim=0)
        return full[:vocab_size] if vocab_size is not None else full
    if layout == "column":
        return torch.cat(list(shards), dim=0)
    if layout == "row":
        return torch.cat(list(shards), dim=1)
    if layout == "gated_column":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise MappingError(f"unknown TP layout {layout!r}")


def _check_divisible(n: int, tp_size: int, what: str) -> None:
    if n % tp_size:
        raise MappingError(f"{n} {what} are not divisible by tp={tp_size}")


def detect_naming(names: Iterable[str]) -> Naming:
    """'te' if the Megatron names use Transformer Engine's fused layer-norm naming, else 'local'."""
    return "te" if any(n.endswith("layer_norm_weight") for n in names) else "local"
