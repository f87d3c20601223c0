"""Tiny random HF checkpoints on disk (several safetensors shards each), shared by the conversion tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

# A tokenizer-side file that conversions must carry along unchanged.
TOKENIZER_CONFIG = {"model_max_length": 128, "chat_template": "{{ messages }}", "note": "carried verbatim"}


# An odd vocabulary (97 rows): Megatron pads it to 98 at TP=2, so checkpoints differ in rows between layouts.
ODD_VOCAB = "qwen2_vocab97"


def make_tiny_hf(kind: str):
    """tests.models.tiny_hf.tiny_hf_model(kind), or for ODD_VOCAB an untied Qwen2 with 97 vocab rows, randomised alike."""
    from tests.models.tiny_hf import tiny_hf_config, tiny_hf_model

    if kind != ODD_VOCAB:
        return tiny_hf_model(kind)
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("qwen2_untied")
    cfg.vocab_size = 97
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + (0.2 if base else 0.08) * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_tiny_hf(kind: str, path: str, dtype: torch.dtype = torch.float32, max_shard_size: str = "40KB") -> dict:
    """Save one of tests.models.tiny_hf.KINDS (or ODD_VOCAB) to `path` as sharded safetensors; return its state dict."""
    from tests.models.tiny_hf import hf_state_dict

    model = make_tiny_hf(kind).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    return hf_state_dict(model)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict:
    """{kind: (hf_dir, HF state dict, input_ids [3, 10], padding mask [3, 10], HF logits [3, 10, V])}, KINDS + ODD_VOCAB."""
    from tests.models.tiny_hf import KINDS, padded_batch

    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for kind in (*KINDS, ODD_VOCAB):
        path = str(root / kind)
        sd = save_tiny_hf(kind, path)
        model = make_tiny_hf(kind)
        ids, pad = padded_batch(model.config.vocab_size)
        pos = (pad.long().cumsum(dim=1) - 1).clamp(min=0)  # positions count real tokens (left padding)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=pad, position_ids=pos).logits
        out[kind] = (path, sd, ids, pad, logits)
    return out
