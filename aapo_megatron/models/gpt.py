"""Megatron-Core GPTModel from an `ArchSpec`: policy (trainable) and reference (frozen) builders.

    init_distributed(cfg); seed_everything(seed)
    spec = ArchSpec.from_hf_dir(path)
    policy = build_policy(spec)                       # this rank's TP shard / PP stage, trainable
    reference = build_reference(spec)                 # same layout, eval(), requires_grad=False
    mask, pos = attention_mask_and_position_ids(padding_mask)    # [B, 1, S, S] bool, [B, S]
    logits = policy(input_ids, pos, mask)             # [B, S, V/tp] on the last stage

The model math is Megatron's; this module only chooses the config and the layer spec
(Transformer Engine with CUDA + TE, the local spec otherwise; see `use_transformer_engine`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from aapo_megatron.distributed import current_platform
from aapo_megatron.dtypes import DTYPES, dtype_name
from aapo_megatron.models.arch import ArchSpec, RopeScaling


def use_transformer_engine() -> bool:
    """True when CUDA and Transformer Engine are both usable (then the TE layer spec is used; the Platform decides)."""
    return current_platform().transformer_engine


def layer_spec(spec: ArchSpec, use_te: Optional[bool] = None, sdpa_attention: bool = True,
               sequence_parallel: bool = False):
    """Megatron ModuleSpec of one transformer layer: TE spec with CUDA + TE, otherwise the local spec with
    torch SDPA as its core attention (models/attention.py; sdpa_attention=False keeps Megatron's) and, with
    sequence_parallel, norms that support it (models/norm.py)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = use_transformer_engine()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    from aapo_megatron.models.attention import SDPADotProductAttention

    layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    if sdpa_attention:
        layer.submodules.self_attention.submodules.core_attention = SDPADotProductAttention  # fused torch SDPA
    if sequence_parallel:
        from aapo_megatron.models.norm import sequence_parallel_layer_spec

        layer = sequence_parallel_layer_spec(layer)
    return layer


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    """Parameter dtype: 'auto' is bfloat16 with CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES[dtype_name(dtype, current_platform().default_dtype)]


def transformer_config(
    spec: ArchSpec,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: str | torch.dtype = "auto",
    sequence_parallel: bool = False,
    **overrides,
):
    """Megatron TransformerConfig for `spec` (RMSNorm, SwiGLU, no linear biases, GQA, no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = resolve_dtype(dtype)
    cuda = current_platform().cuda
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not cuda,
        # Fusions need CUDA (torch.jit kernels); the unfused paths are exact. The masked-softmax kernel is
        # Megatron-LM's separately built extension (not in megatron-core), and TE attention does not use it.
        bias_activation_fusion=cuda,
        masked_softmax_fusion=False,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=cuda,  # gloo has no batched isend/irecv
        deallocate_pipeline_outputs=cuda,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def llama3_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] (fp32), with llama3 scaling when given (all four HF parameters)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_gpt_model(
    spec: ArchSpec,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    dtype: str | torch.dtype = "auto",
    use_te: Optional[bool] = None,
    parallel_output: bool = True,
    config=None,
    sdpa_attention: bool = True,
    config_overrides: Optional[dict] = None,
):
    """This rank's GPTModel (its TP shard and PP stage; pre/post-process default from parallel_state).

    config_overrides: extra TransformerConfig kwargs when `config` is None (sequence parallelism and activation
    recompute: `models.activation_memory.model_config_overrides`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if spec.num_layers % pp:
        raise ValueError(f"pipeline size {pp} must divide the number of layers ({spec.num_layers})")
    if spec.num_attention_heads % tp or spec.num_key_value_heads % tp:
        raise ValueError(f"tensor-parallel size {tp} must divide the attention heads ({spec.num_attention_heads}) "
                         f"and KV heads ({spec.num_key_value_heads})")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    if config is None:
        config = transformer_config(spec, tp, pp, dtype, **(config_overrides or {}))
    if use_te is None:
        use_te = use_transformer_engine()
    block_spec = layer_spec(spec, use_te, sdpa_attention, sequence_parallel=config.sequence_parallel)
    if config.sequence_parallel and not use_te:
        from aapo_megatron.models.norm import sequence_parallel_block_spec

        block_spec = sequence_parallel_block_spec(config, block_spec)  # the final norm too
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=spec.padded_vocab_size(tp),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
    )
    # Megatron's own rope_scaling hard-codes low/high_freq_factor=1/4 and an 8192 original context;
    # set the llama3 frequencies from the spec instead (identical for the default parameters).
    inv_freq = llama3_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    platform = current_platform()
    if platform.cuda:
        model.cuda(platform.device)
    return model


def build_policy(spec: ArchSpec, dtype: str | torch.dtype = "auto", use_te: Optional[bool] = None, **kwargs):
    """The trainable policy: this rank's GPTModel in train mode (wrap it in Megatron DDP for training)."""
    model = build_gpt_model(spec, dtype=dtype, use_te=use_te, **kwargs)
    model.train()
    return model


def build_reference(spec: ArchSpec, dtype: str | torch.dtype = "auto", use_te: Optional[bool] = None, **kwargs):
    """The frozen reference: same TP/PP layout as the policy, eval mode, requires_grad=False, no grads."""
    model = build_gpt_model(spec, dtype=dtype, use_te=use_te, **kwargs)
    freeze(model)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a model in eval mode with every parameter requires_grad=False and .grad=None."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model


def attention_mask_and_position_ids(padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron attention mask [B, 1, S, S] (bool, True = masked) and position ids [B, S] from a padding mask [B, S].

    `padding_mask` is 1/True on real tokens; left, right or mixed padding. Positions count real
    tokens only (the first real token is position 0); a padded key is never attended to.
    Note: Megatron's Transformer Engine layer spec is causal-only and ignores this mask, so on the
    GPU/TE path batches must be right-padded (real tokens first); the local spec (CPU) applies it.
    """
    if padding_mask.dim() != 2:
        raise ValueError(f"padding_mask must be [batch, seq], got shape {tuple(padding_mask.shape)}")
    valid = padding_mask.bool()  # [B, S]
    seq = valid.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril()  # [S, S], True = may attend
    allowed = causal[None] & valid[:, None, :]  # [B, S(q), S(k)]
    position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, S]
    return (~allowed).unsqueeze(1), position_ids
