"""What a model family declares: `ModelFamily` and the rows of its HF name table (`WeightEntry`).

A family's table lists, for one decoder layer and for the weights outside the layers, which HF tensors make
each Megatron tensor, with which converter (`models.converters`), how it is split across TP ranks and its
full shape in named dimensions. `models.mapping.WeightMapping` turns the table into concrete names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from aapo_megatron.models.converters import COPY, Converter

if TYPE_CHECKING:
    from aapo_megatron.models.tensor_layout import TPLayout

# Megatron names of the two layer norms: the local layer spec has separate modules, Transformer Engine's fuses
# them into the following linear layer.
INPUT_NORM = {"local": "input_layernorm.weight", "te": "self_attention.linear_qkv.layer_norm_weight"}
PRE_MLP_NORM = {"local": "pre_mlp_layernorm.weight", "te": "mlp.linear_fc1.layer_norm_weight"}

# Named dimensions a table shape may use, and the ArchSpec quantity each one is.
DIMS = {
    "hidden": lambda s: s.hidden_size,
    "q": lambda s: s.q_size,
    "qkv": lambda s: s.q_size + 2 * s.kv_size,
    "ffn": lambda s: s.ffn_hidden_size,
    "gate_up": lambda s: 2 * s.ffn_hidden_size,
    "vocab": lambda s: s.vocab_size,
    "head_dim": lambda s: s.head_dim,
}


@dataclass(frozen=True)
class WeightEntry:
    """One row of a family's HF name table: one Megatron tensor and the HF tensors it is made of."""

    megatron: Union[str, dict[str, str]]
    """Megatron name (inside `decoder.layers.{i}.` for layer rows), or {naming: name} where it depends on the spec."""
    hf: tuple[str, ...]
    """HF names (inside `model.layers.{i}.` for layer rows) in the order the converter takes them."""
    shape: tuple[str, ...]
    """Full Megatron shape in named dimensions (keys of DIMS); vocab rows unpadded."""
    tp_layout: TPLayout = "replicated"
    """How the full Megatron tensor is split across TP ranks."""
    converter: Converter = COPY
    """How the HF tensors combine (COPY, GATE_UP, QKV)."""

    def megatron_name(self, naming: str) -> str:
        """Megatron name under `naming` ("local" or "te")."""
        return self.megatron if isinstance(self.megatron, str) else self.megatron[naming]

    def resolve_shape(self, spec: Any) -> tuple[int, ...]:
        """Full Megatron shape for `spec` (an ArchSpec), in elements."""
        return tuple(DIMS[d](spec) for d in self.shape)


# The weights outside the layers of an HF *ForCausalLM decoder; the output layer only when untied.
HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
CAUSAL_LM_GLOBALS = (
    WeightEntry(EMBEDDING, (HF_EMBEDDING,), ("vocab", "hidden"), "vocab"),
    WeightEntry(FINAL_NORM, (HF_FINAL_NORM,), ("hidden",)),
)
CAUSAL_LM_OUTPUT = WeightEntry(OUTPUT_LAYER, (HF_LM_HEAD,), ("vocab", "hidden"), "vocab")


@dataclass(frozen=True)
class ModelFamily:
    """A dense decoder family (RMSNorm, SwiGLU, RoPE, GQA): its names, its HF name table and what it refuses."""

    name: str
    """Registry name: the HF `model_type`, and `model.scratch.architecture` in the config."""
    hf_architecture: str
    """HF class name in config.json `architectures`, e.g. "Qwen2ForCausalLM"."""
    layer_weights: tuple[WeightEntry, ...]
    """The HF name table of one decoder layer, in the order the weights are streamed."""
    global_weights: tuple[WeightEntry, ...] = CAUSAL_LM_GLOBALS
    """The table of the weights outside the layers (the untied output layer is added after them)."""
    output_weight: WeightEntry = CAUSAL_LM_OUTPUT
    """The output layer's row, used when the embeddings are not tied."""
    refused_hf_flags: tuple[str, ...] = ()
    """HF config booleans this project cannot build when true (each refused with a message naming it)."""
    hf_export_flags: dict[str, Any] = field(default_factory=dict)
    """Keys `to_hf_config` writes for this family (e.g. attention_bias: False)."""
    gguf_architecture: Optional[str] = None
    """GGUF `general.architecture` that `aapo-convert gguf-to-hf` accepts for this family, or None."""

    def _has(self, megatron_name: str) -> bool:
        return any(e.megatron_name("local") == megatron_name for e in self.layer_weights)

    @property
    def qkv_bias(self) -> bool:
        """The table has q/k/v biases."""
        return self._has("self_attention.linear_qkv.bias")

    @property
    def qk_norm(self) -> bool:
        """The table has per-head query/key RMSNorms."""
        return self._has("self_attention.q_layernorm.weight")
