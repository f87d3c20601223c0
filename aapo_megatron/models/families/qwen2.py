"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's layer with biases on the q/k/v projections."""

from aapo_megatron.models.converters import GATE_UP, QKV
from aapo_megatron.models.families.base import INPUT_NORM, PRE_MLP_NORM, ModelFamily, WeightEntry

FAMILY = ModelFamily(
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    layer_weights=(
        WeightEntry(INPUT_NORM, ("input_layernorm.weight",), ("hidden",)),
        WeightEntry("self_attention.linear_qkv.weight",
                    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                    ("qkv", "hidden"), "column", QKV),
        WeightEntry("self_attention.linear_qkv.bias",
                    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                    ("qkv",), "column", QKV),
        WeightEntry("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ("hidden", "q"), "row"),
        WeightEntry(PRE_MLP_NORM, ("post_attention_layernorm.weight",), ("hidden",)),
        WeightEntry("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("gate_up", "hidden"),
                    "gated_column", GATE_UP),
        WeightEntry("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ("hidden", "ffn"), "row"),
    ),
    refused_hf_flags=("mlp_bias", "use_sliding_window"),
    hf_export_flags={"use_sliding_window": False},
    gguf_architecture="qwen2",
)
