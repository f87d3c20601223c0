"""One spawned gloo job per parallel layout (TP=1, TP=2, PP=2) that runs every model check of that layout.

Spawning ranks and importing Megatron + transformers dominates the cost of the distributed model tests,
so test_gpt.py (forward/backward vs HF), test_parity.py (logits vs HF) and test_reference.py (the frozen
reference model) share the job via `run_layout`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tests.distributed import run_ranks
from tests.models.reference_job import reference_checks
from tests.models.tiny_hf import KINDS, ODD_VOCAB_KIND, gather_vocab, hf_state_dict, padded_batch, pipeline_forward, tiny_hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
LAYOUT_IDS = ["tp1", "tp2", "pp2"]


@functools.lru_cache(maxsize=None)
def run_layout(tp: int, pp: int) -> tuple:
    """Per-rank results of `_layout_body` at this TP/PP (cached for the pytest session)."""
    return tuple(run_ranks(_layout_body, world_size=tp * pp, args=(tp, pp), env={"OMP_NUM_THREADS": "1"}))


def _layout_body(rank: int, world_size: int, tp: int, pp: int) -> dict:
    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.distributed import init_distributed, seed_everything, teardown_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    seed_everything(1234)
    out = {"parity": {kind: _parity_one(kind) for kind in KINDS + (ODD_VOCAB_KIND,)}}
    out["foundation"] = _foundation_one(rank)
    out["reference"] = reference_checks()  # tests/models/test_reference.py
    teardown_distributed()
    if rank == 0:
        out["foundation"].update(_hf_foundation_reference(out["foundation"].pop("grads")))
    else:
        out["foundation"].pop("grads")
    return out


# --------------------------------------------------------------------------- parity (test_parity.py)


def _parity_one(kind: str) -> dict:
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import attention_mask_and_position_ids, build_reference
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.distributed import current_layout
    from aapo_megatron.models.weights import gather_hf_state_dict, load_hf_weights, model_naming

    hf = tiny_hf_model(kind)  # identical on every rank (seeded CPU init)
    sd = hf_state_dict(hf)
    spec = ArchSpec.from_hf_config(hf.config.to_dict())
    model = build_reference(spec, dtype="float32")
    mapping = WeightMapping(spec, naming=model_naming(model))
    load_hf_weights(model, mapping, sd)

    ids, pad = padded_batch(spec.vocab_size)
    attn_mask, pos = attention_mask_and_position_ids(pad)
    with torch.no_grad():
        logits, _ = pipeline_forward(model, ids, pos, attn_mask)
        # Every rank joins the TP/PP gather (a collective), then checks the round trip bitwise.
        back = gather_hf_state_dict(model, mapping)
    roundtrip_ok = back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)

    result = {"roundtrip_ok": roundtrip_ok, "layout": current_layout(), "max_diff": None,
              "vocab_rows": model.vocab_size}
    if logits is not None:
        full = gather_vocab(logits, spec.vocab_size)  # [B, S, V]
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=pad, position_ids=pos).logits  # [B, S, V]
        valid = pad.bool()
        result["max_diff"] = (full[valid] - ref[valid]).abs().max().item()
        result["ref_scale"] = ref[valid].abs().max().item()
    return result


# --------------------------------------------------------------------------- foundation (test_gpt.py)


def scratch_config():
    """The Llama-style scratch model of the foundation test: GQA 8 query / 2 KV heads, 2 layers."""
    from aapo_megatron.config import ScratchModelConfig

    return ScratchModelConfig(architecture="llama", hidden_size=64, num_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, ffn_hidden_size=96, vocab_size=96, max_position_embeddings=64,
                              tie_word_embeddings=False)


def hf_from_spec(spec, seed: int = 0):
    """An HF model built from to_hf_config(spec) with random weights (norms around 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aapo_megatron.models.arch import to_hf_config

    hf_cfg = to_hf_config(spec)
    cfg = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _loss_inputs(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels [B, S] and loss mask [B, S] (real token predicting a real token)."""
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    mask = torch.cat([pad[:, 1:] * pad[:, :-1], torch.zeros_like(pad[:, :1])], dim=1).float()
    return labels, mask


def _foundation_one(rank: int) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import attention_mask_and_position_ids, build_policy, build_reference
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.models.weights import gather_hf_state_dict, load_hf_weights, model_naming

    spec = ArchSpec.from_scratch(scratch_config())
    policy = build_policy(spec, dtype="float32")
    mapping = WeightMapping(spec, naming=model_naming(policy))
    load_hf_weights(policy, mapping, hf_from_spec(spec).state_dict())

    ids, pad = padded_batch(spec.vocab_size)
    attn_mask, pos = attention_mask_and_position_ids(pad)
    labels, loss_mask = _loss_inputs(ids, pad)

    def loss_fn(logits):  # logits [B, S, V/tp]
        per_token = vocab_parallel_cross_entropy(logits.float(), labels)  # [B, S]
        return (per_token * loss_mask).sum() / loss_mask.sum()

    logits, loss = pipeline_forward(policy, ids, pos, attn_mask, loss_fn=loss_fn, forward_only=False)
    out = {"rank": rank, "loss": None if loss is None else loss.item()}
    params = dict(policy.named_parameters())
    out["no_grad"] = [n for n, p in params.items()
                      if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # Reuse the weight gather for gradients: swap each parameter's data for its gradient.
    for p in params.values():
        p.data = p.grad
    out["grads"] = gather_hf_state_dict(policy, mapping)

    reference = build_reference(spec, dtype="float32")
    out["ref_frozen"] = (not reference.training) and not any(p.requires_grad for p in reference.parameters())
    out["policy_trainable"] = policy.training and all(p.requires_grad for p in policy.parameters())
    return out


def _hf_foundation_reference(grads: dict) -> dict:
    """HF loss and the max gradient difference against the gathered Megatron gradients (HF names)."""
    from aapo_megatron.models.arch import ArchSpec

    spec = ArchSpec.from_scratch(scratch_config())
    hf = hf_from_spec(spec)
    ids, pad = padded_batch(spec.vocab_size)
    from aapo_megatron.models.gpt import attention_mask_and_position_ids

    _, pos = attention_mask_and_position_ids(pad)
    labels, mask = _loss_inputs(ids, pad)
    logits = hf(input_ids=ids, attention_mask=pad, position_ids=pos).logits  # [B, S, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    loss = (ce.view_as(mask) * mask).sum() / mask.sum()
    loss.backward()
    return {
        "hf_loss": loss.item(),
        "grad_diff": max((grads[n] - p.grad).abs().max().item() for n, p in hf.named_parameters()),
        "grad_scale": max(p.grad.abs().max().item() for p in hf.parameters()),
    }
