"""Llama (LlamaForCausalLM, incl. Llama 3 RoPE scaling): the HF name table of one decoder layer."""

from aapo_megatron.models.converters import GATE_UP, QKV
from aapo_megatron.models.families.base import INPUT_NORM, PRE_MLP_NORM, ModelFamily, WeightEntry

FAMILY = ModelFamily(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    layer_weights=(
        WeightEntry(INPUT_NORM, ("input_layernorm.weight",), ("hidden",)),
        WeightEntry("self_attention.linear_qkv.weight",
                    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                    ("qkv", "hidden"), "column", QKV),
        WeightEntry("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ("hidden", "q"), "row"),
        WeightEntry(PRE_MLP_NORM, ("post_attention_layernorm.weight",), ("hidden",)),
        WeightEntry("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("gate_up", "hidden"),
                    "gated_column", GATE_UP),
        WeightEntry("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ("hidden", "ffn"), "row"),
    ),
    # Llama's attention_bias also biases o_proj, which Megatron cannot express without add_bias_linear.
    refused_hf_flags=("mlp_bias", "use_sliding_window", "attention_bias"),
    hf_export_flags={"attention_bias": False, "mlp_bias": False},
    gguf_architecture="llama",
)
