"""Tiny random HF models (Llama with llama3 rope scaling, Qwen2 tied/untied, Qwen3) and shared Megatron test steps."""

from __future__ import annotations

from typing import Optional

import torch

# GQA with 4 query heads per KV head; 2 layers so PP=2 puts one layer on each stage.
_COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
)

KINDS = ("llama", "qwen2_untied", "qwen2_tied", "qwen3")
# Vocab 97: Megatron pads the vocab-parallel embedding/output to 98 rows at TP=2.
ODD_VOCAB_KIND = "qwen2_tied_vocab97"


def tiny_hf_config(kind: str):
    """A transformers config for one of KINDS."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if kind == "llama":
        cfg = LlamaConfig(
            **_COMMON,
            tie_word_embeddings=False,
            # Small original context so that the llama3 scaling changes all three frequency bands.
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            rope_theta=10000.0,
        )
        cfg.architectures = ["LlamaForCausalLM"]
    elif kind == ODD_VOCAB_KIND:
        cfg = Qwen2Config(**{**_COMMON, "vocab_size": 97}, tie_word_embeddings=True, rope_theta=1000000.0)
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif kind.startswith("qwen2"):
        cfg = Qwen2Config(**_COMMON, tie_word_embeddings=kind == "qwen2_tied", rope_theta=1000000.0)
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif kind == "qwen3":
        # head_dim 16 != hidden / heads = 8, as in real Qwen3 configs.
        cfg = Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=False, rope_theta=1000000.0)
        cfg.architectures = ["Qwen3ForCausalLM"]
    else:
        raise ValueError(kind)
    return cfg


def tiny_hf_model(kind: str, seed: int = 0):
    """A random fp32 HF causal LM (eager attention) whose norms and biases are randomised too."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """HF state dict without the tied lm_head copy (what a tied safetensors checkpoint holds)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def padded_batch(vocab_size: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [3, 10] and padding mask [3, 10]: one full row, one right-padded, one left-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def pipeline_forward(model, input_ids, position_ids, attention_mask, loss_fn=None, forward_only=True):
    """Run Megatron's forward(-backward) schedule on one micro-batch; returns (logits [B, S, V/tp], loss).

    `loss_fn(logits) -> scalar` is the loss (backward when forward_only=False); the logits are copied before
    it runs (Megatron's vocab_parallel_cross_entropy works in place). Stages other than the last get (None, None).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = {"tokens": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    captured = {}

    def loss_func(output_tensor):
        captured["logits"] = output_tensor.detach().clone()
        loss = loss_fn(output_tensor) if loss_fn is not None else output_tensor.sum() * 0.0
        captured["loss"] = loss.detach().clone()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], b["attention_mask"])
        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0],
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage():
        return None, None
    return captured["logits"], captured["loss"]


def gather_vocab(logits: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """All-gather vocab-parallel logits [B, S, V/tp] -> [B, S, V] over the TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    full = torch.cat(parts, dim=-1)
    return full[..., :vocab_size] if vocab_size is not None else full
