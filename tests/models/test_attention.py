"""SDPA core attention equals Megatron's DotProductAttention (forward and backward): packed, causal, GQA."""

import pytest
import torch

from tests.distributed import run_ranks


def _compare(rank, world):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.validation import load_config
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.attention import SDPADotProductAttention
    from aapo_megatron.models.gpt import transformer_config
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.trainer.train_step import causal_mask, segment_causal_mask

    init_distributed(ParallelConfig())
    seed_everything(0)
    cfg = load_config(None, ["model.scratch.num_attention_heads=4", "model.scratch.num_key_value_heads=2"])
    spec = ArchSpec.from_scratch(cfg.model.scratch)
    tcfg = transformer_config(spec, dtype="float32")
    ref = DotProductAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    fast = SDPADotProductAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, hn = 12, 3, spec.head_dim
    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12, [0] * 2 + [1] * 10])
    left_pad = causal_mask(s, torch.device("cpu")).expand(b, 1, s, s).clone()
    left_pad[0, :, :, :3] = True  # three left-padding keys: the first three queries see nothing
    masks = {"packed": segment_causal_mask(segments), "causal": causal_mask(s, torch.device("cpu")),
             "left_pad": left_pad}
    out = {}
    for name, mask in masks.items():
        q = torch.randn(s, b, spec.num_attention_heads, hn, generator=g)
        k = torch.randn(s, b, spec.num_key_value_heads, hn, generator=g)
        v = torch.randn(s, b, spec.num_key_value_heads, hn, generator=g)
        w = torch.randn(s, b, spec.num_attention_heads * hn, generator=g)
        results = []
        for module in (ref, fast):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            ctx = module(*leaves, mask)
            (ctx * w).sum().backward()
            results.append([ctx.detach()] + [t.grad for t in leaves])
        diffs = [float((a - c).abs().max()) for a, c in zip(*results)]
        out[name] = {"diffs": diffs, "sdpa": fast._sdpa_applies(mask, None, None), "shape": tuple(results[1][0].shape)}
    return out


def test_sdpa_matches_megatron_dot_product_attention():
    out = run_ranks(_compare, 1, env={"OMP_NUM_THREADS": "1"})[0]
    assert out["packed"]["sdpa"] and out["causal"]["sdpa"]
    assert not out["left_pad"]["sdpa"]  # fully masked query rows: Megatron's own path (uniform attention)
    for name, r in out.items():
        assert r["shape"][:2] == (12, 3)  # [sq, b, hp]
        for what, d in zip(("context", "dq", "dk", "dv"), r["diffs"]):
            assert d < 1e-5, f"{name}: max |sdpa - megatron| of {what} = {d:.3e}"
