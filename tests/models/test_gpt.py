"""Foundation: a Llama-style Megatron GPTModel (RMSNorm, SwiGLU, RoPE, GQA) on CPU over gloo at TP=1, TP=2, PP=2.

Forward and backward through Megatron's forward-backward schedule; the loss and every gradient are
compared with HF transformers running the same weights (the scratch spec exported via to_hf_config).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.models.layouts import LAYOUT_IDS, LAYOUTS, run_layout, scratch_config


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_backward(tp: int, pp: int):
    """Loss finite and equal to HF's; every parameter gets a finite non-zero gradient equal to HF's."""
    results = [r["foundation"] for r in run_layout(tp, pp)]
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert len(losses) == tp
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) - min(losses) < 1e-6  # TP ranks agree
    r0 = results[0]
    assert abs(losses[0] - r0["hf_loss"]) < 1e-5, (losses[0], r0["hf_loss"])
    for r in results:
        assert not r["no_grad"], f"rank {r['rank']}: parameters without a (finite, non-zero) gradient: {r['no_grad']}"
        assert r["ref_frozen"] and r["policy_trainable"]
    assert r0["grad_scale"] > 1e-3
    assert r0["grad_diff"] < 1e-5, f"max |grad megatron - grad hf| = {r0['grad_diff']:.3e}"


def test_attention_mask_and_position_ids():
    from aapo_megatron.models.gpt import attention_mask_and_position_ids

    pad = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    mask, pos = attention_mask_and_position_ids(pad)
    assert mask.shape == (3, 1, 4, 4) and mask.dtype == torch.bool
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1], [0, 0, 0, 1]]
    for b in range(3):
        for q in range(4):
            for k in range(4):
                allowed = k <= q and bool(pad[b, k])
                assert bool(mask[b, 0, q, k]) == (not allowed), (b, q, k)
    with pytest.raises(ValueError, match=r"padding_mask must be \[batch, seq\], got shape \(4,\)"):
        attention_mask_and_position_ids(torch.ones(4))


def test_layer_spec_is_local_without_cuda():
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import layer_spec, use_transformer_engine

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert use_transformer_engine() is False
    spec = ArchSpec.from_scratch(scratch_config())
    ls = layer_spec(spec)
    attn = ls.submodules.self_attention.submodules
    assert attn.linear_qkv.__name__ == "ColumnParallelLinear"  # not TELayerNormColumnParallelLinear
    assert ls.submodules.input_layernorm.__name__ != "IdentityOp"  # the norm is a separate module
    assert attn.core_attention.__name__ == "SDPADotProductAttention"
    assert layer_spec(spec, sdpa_attention=False).submodules.self_attention.submodules.core_attention.__name__ == "DotProductAttention"


def test_llama3_inv_freq_matches_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import llama3_inv_freq

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg.architectures = ["LlamaForCausalLM"]
    spec = ArchSpec.from_hf_config(cfg.to_dict())
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = llama3_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, llama3_inv_freq(spec.head_dim, spec.rope_theta, None))
