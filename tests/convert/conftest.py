"""Tiny random HF checkpoints on disk (several safetensors shards each), shared by the conversion tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

# A tokenizer-side file that conversions must carry along unchanged.
TOKENIZER_CONFIG = {"model_max_length": 128, "chat_template": "{{ messages }}", "note": "carried verbatim"}


def save_tiny_hf(kind: str, path: str, dtype: torch.dtype = torch.float32, max_shard_size: str = "40KB") -> dict:
    """Save one of tests.models.tiny_hf.KINDS to `path` as sharded safetensors; return its HF state dict."""
    from tests.models.tiny_hf import hf_state_dict, tiny_hf_model

    model = tiny_hf_model(kind).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    return hf_state_dict(model)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict:
    """{kind: (hf_dir, HF state dict, input_ids [3, 10], padding mask [3, 10], HF logits [3, 10, V])} for every kind."""
    from tests.models.tiny_hf import KINDS, padded_batch, tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for kind in KINDS:
        path = str(root / kind)
        sd = save_tiny_hf(kind, path)
        model = tiny_hf_model(kind)
        ids, pad = padded_batch(model.config.vocab_size)
        pos = (pad.long().cumsum(dim=1) - 1).clamp(min=0)  # positions count real tokens (left padding)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=pad, position_ids=pos).logits
        out[kind] = (path, sd, ids, pad, logits)
    return out
