"""Conversion planning in the parent process: worker count, dtype choice, input validation (no workers spawned)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from aapo_megatron.checkpoint.errors import ConversionError
from aapo_megatron.checkpoint.hf import HFCheckpointReader
from aapo_megatron.checkpoint.conversion.hf_to_mcore import choose_workers, resolve_dtype_name, validate_hf_checkpoint
from aapo_megatron.models.arch import ArchSpec

GiB = 2**30


def test_choose_workers():
    # enough workers that each converts <= 2 GiB, but no more than the cores; always a divisor of the layers
    assert choose_workers(80, 140 * GiB, None, cores=2) == 2  # 70B bf16 on this machine: not 80 processes
    assert choose_workers(80, 140 * GiB, None, cores=64) == 40
    assert choose_workers(80, 140 * GiB, None, cores=128) == 80  # 70 needed -> 80
    assert choose_workers(80, 140 * GiB, None, cores=64, bytes_per_worker=4 * GiB) == 40
    assert choose_workers(28, 3 * GiB, None, cores=64) == 2
    assert choose_workers(28, 14 * GiB, None, cores=6) == 4  # 7 needed, 6 cores: the largest divisor under 6
    assert choose_workers(2, 10**6, None, cores=64) == 1  # a small model: one worker, whatever the cores
    assert choose_workers(3, 100 * GiB, None, cores=64, bytes_per_worker=GiB) == 3  # one layer per worker at most
    assert choose_workers(7, 100 * GiB, None, cores=6) == 1  # a prime layer count: nothing between 1 and 7
    assert 1 <= choose_workers(80, 140 * GiB, None) <= len(os.sched_getaffinity(0))  # default: this process's cores
    assert choose_workers(8, GiB, 4) == 4
    with pytest.raises(ConversionError, match=r"--workers 0 must be a positive divisor of the number of layers \(8\)"):
        choose_workers(8, GiB, 0)


def test_dtype_defaults_to_the_checkpoints_own():
    spec = ArchSpec(family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=4, ffn_hidden_size=8, torch_dtype="bfloat16")
    assert resolve_dtype_name(None, spec) == "bfloat16"
    assert resolve_dtype_name("float32", spec) == "float32"
    assert resolve_dtype_name(None, spec.replace(torch_dtype="float64")) == "float32"
    with pytest.raises(ConversionError, match=r"unsupported dtype 'int8'; choose one of float32, bfloat16, float16"):
        resolve_dtype_name("int8", spec)


def test_validation_lists_unused_tensors(tiny_hf_dirs, tmp_path):
    src = tiny_hf_dirs["qwen2_tied"][0]
    spec, unused = validate_hf_checkpoint(HFCheckpointReader(src))
    assert spec.tie_word_embeddings and unused == []
    # the same weights as one model.safetensors plus an old-style rotary buffer: reported, not fatal
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(os.path.join(src, "config.json"), hf / "config.json")
    reader = HFCheckpointReader(src)
    tensors = reader.load(reader.names())
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    spec2, unused = validate_hf_checkpoint(HFCheckpointReader(str(hf)))
    assert spec2 == spec and unused == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
