"""How one Megatron tensor is built from its HF tensors, and back: the converter objects the family tables name.

- `COPY`: the Megatron tensor is the HF tensor;
- `GATE_UP`: linear_fc1 = [gate; up] along rows;
- `QKV`: Megatron's interleaved GQA layout. For each query group g the rows are
  [q heads of g; k head g; v head g], i.e. [ng, (hpg + 2) * d, (H)]; the same code serves the
  weight ([., H]) and the bias ([.]) and a TP rank's shard (ng / tp whole groups).

torch is imported where a tensor is built, so the family tables and `ArchSpec` load without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from aapo_megatron.errors import AapoError

if TYPE_CHECKING:
    import torch

    from aapo_megatron.models.arch import ArchSpec

Shape = tuple[int, ...]


class MappingError(AapoError, ValueError):
    """A tensor is missing, has the wrong shape, or its name is unknown to the mapping."""


class Converter:
    """How the HF tensors of one weight combine into its Megatron tensor, and back (bitwise reversible)."""

    name = "copy"

    def to_megatron(self, spec: "ArchSpec", tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor from the HF tensors (in table order); shapes were checked by the caller."""
        return tensors[0]

    def to_hf(self, spec: "ArchSpec", tensor: torch.Tensor, tp_size: int = 1) -> list[torch.Tensor]:
        """The HF tensors (table order) of a full Megatron tensor (tp_size=1) or of one TP rank's shard."""
        return [tensor]

    def hf_shapes(self, spec: "ArchSpec", shape: Shape) -> list[Shape]:
        """Shapes of the HF tensors, from the full (unpadded) Megatron shape."""
        return [shape]

    def tp_problem(self, spec: "ArchSpec", tp_size: int) -> Optional[str]:
        """Why the tensor cannot be split over `tp_size` ranks, or None."""
        return None

    def __repr__(self) -> str:
        return self.name.upper()


class GateUp(Converter):
    """linear_fc1 = [gate_proj; up_proj]: [2F, H]; a gated_column shard is [gate_r; up_r], so the same split applies."""

    name = "gate_up"

    def to_megatron(self, spec, tensors):
        import torch

        return torch.cat(list(tensors), dim=0)  # [2F, H] = [gate; up]

    def to_hf(self, spec, tensor, tp_size=1):
        return list(tensor.chunk(2, dim=0))

    def hf_shapes(self, spec, shape):
        return [(shape[0] // 2,) + tuple(shape[1:])] * 2


class QKVInterleave(Converter):
    """linear_qkv from q_proj, k_proj, v_proj (weights [., H] or biases [.]) in Megatron's per-group interleave."""

    name = "qkv"

    def to_megatron(self, spec, tensors):
        import torch

        q, k, v = tensors
        ng, hpg, d = spec.num_key_value_heads, spec.heads_per_group, spec.head_dim
        tail = q.shape[1:]  # (H,) for weights, () for biases
        qkv = torch.cat([q.reshape(ng, hpg * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1)
        return qkv.reshape(ng * (hpg + 2) * d, *tail)  # [ng * (hpg + 2) * d, (H)]

    def to_hf(self, spec, tensor, tp_size=1):
        ng, hpg, d = spec.num_key_value_heads // tp_size, spec.heads_per_group, spec.head_dim
        tail = tensor.shape[1:]
        q, k, v = tensor.reshape(ng, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
        return [q.reshape(ng * hpg * d, *tail), k.reshape(ng * d, *tail), v.reshape(ng * d, *tail)]

    def hf_shapes(self, spec, shape):
        tail = tuple(shape[1:])
        return [(spec.q_size,) + tail, (spec.kv_size,) + tail, (spec.kv_size,) + tail]

    def tp_problem(self, spec, tp_size):
        # Each rank must hold whole query groups (Megatron requires num_query_groups % tp == 0).
        if spec.num_key_value_heads % tp_size:
            return f"tp={tp_size} must divide num_key_value_heads={spec.num_key_value_heads}"
        return None


COPY = Converter()
GATE_UP = GateUp()
QKV = QKVInterleave()
