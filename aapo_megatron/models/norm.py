"""RMSNorm for the local (non-TE) layer spec under sequence parallelism.

Megatron's local spec builds its norms with `WrappedTorchNorm`, which refuses `sequence_parallel`
(its weight carries no `sequence_parallel` flag, so the TP all-reduce of the norm gradients in
`finalize_model_grads` would skip it). TE's `TENorm` and Apex's `FusedLayerNorm` set the flag; this
torch `RMSNorm` does the same, with the same math as `WrappedTorchNorm`'s:

    layer = sequence_parallel_layer_spec(layer)              # input/pre-MLP/q/k norms
    block = sequence_parallel_block_spec(config, layer)      # + the final norm; pass to GPTModel
"""

from __future__ import annotations

import copy

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm over the last dim [..., hidden]; its weight is marked `sequence_parallel` as the config says."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"SequenceParallelRMSNorm is a plain RMSNorm; config.normalization is "
                             f"{config.normalization!r}, zero_centered_gamma={config.layernorm_zero_centered_gamma}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # Megatron's finalize_model_grads sums the grads of flagged params over the TP group (each TP rank saw
        # only its sequence shard); TENorm sets the same flag.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def sequence_parallel_layer_spec(layer):
    """A copy of a local-spec TransformerLayer ModuleSpec whose norms (input, pre-MLP, q/k) are SequenceParallelRMSNorm."""
    from megatron.core.transformer.identity_op import IdentityOp

    layer = copy.deepcopy(layer)
    sub = layer.submodules
    sub.input_layernorm = SequenceParallelRMSNorm
    sub.pre_mlp_layernorm = SequenceParallelRMSNorm
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn, name) is not IdentityOp:
            setattr(attn, name, SequenceParallelRMSNorm)
    return layer


def sequence_parallel_block_spec(config, layer):
    """TransformerBlock spec of this PP stage: `layer` repeated, SequenceParallelRMSNorm as the final norm."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layers = get_num_layers_to_build(config)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * layers,
                                                            layer_norm=SequenceParallelRMSNorm))
