"""`python -m aapo_megatron.convert.cli` as a real process: bf16 HF -> fp32 Megatron -> bf16 HF, bitwise.

Also: a fault inside the workers (a truncated .distcp) leaves nothing at --out, a config
that does not fit the checkpoint is refused with the tensor and both shapes, --force
replaces an existing output.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.convert.conftest import save_tiny_hf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "aapo_megatron.convert.cli", *argv, "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if f.startswith(".")]


@pytest.mark.slow
def test_cli_bf16_round_trip_and_failures(tmp_path):
    from aapo_megatron.checkpoint.hf import INDEX_NAME, HFCheckpointReader
    from aapo_megatron.checkpoint.mcore import METADATA_NAME, read_arch

    hf = str(tmp_path / "hf")
    sd = save_tiny_hf("qwen2_tied", hf, dtype=torch.bfloat16, max_shard_size="20KB")
    n_src_shards = len(HFCheckpointReader(hf).files)
    assert n_src_shards > 2

    mc = tmp_path / "mcore"
    res = _cli("hf-to-mcore", "--hf-dir", hf, "--out", str(mc), "--dtype", "float32", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert f"wrote Megatron checkpoint to {mc}" in res.stdout
    meta = json.load(open(mc / METADATA_NAME))
    assert meta["dtype"] == "float32" and meta["architecture"] == "Qwen2ForCausalLM"
    assert read_arch(str(mc)).tie_word_embeddings
    assert filecmp.cmp(mc / "hf" / "tokenizer_config.json", os.path.join(hf, "tokenizer_config.json"), shallow=False)
    assert _leftovers(tmp_path) == []

    # Megatron (fp32) -> HF in the source dtype (bf16): bitwise identical, config and tokenizer files too
    out = tmp_path / "hf_back"
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(out), "--max-shard-size", "20KB")
    assert res.returncode == 0, res.stderr
    back = HFCheckpointReader(str(out))
    assert len(back.files) > 2 and (out / INDEX_NAME).exists()
    got = back.load(back.names())
    assert sorted(got) == sorted(sd)
    for name, tensor in sd.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
    for f in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(out / f, os.path.join(hf, f), shallow=False), f

    # the output exists: refused without --force, replaced with it
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(out))
    assert res.returncode == 1 and f"output directory {out} already exists; pass --force" in res.stderr
    # (--hf-config given explicitly this time: the stored tokenizer files still travel along)
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(out), "--force", "--dtype", "float32",
               "--hf-config", os.path.join(hf, "config.json"))
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer_config.json"]
    assert json.load(open(out / "config.json"))["dtype"] == "float32"
    fp32 = HFCheckpointReader(str(out))
    assert all(fp32.info(n).dtype == torch.float32 for n in fp32.names())
    assert all(torch.equal(fp32.load([n])[n], sd[n].float()) for n in sd)

    # a config that does not fit the checkpoint: the tensor and both shapes are named
    bad_cfg = json.load(open(os.path.join(hf, "config.json")))
    bad_cfg["intermediate_size"] = 128
    json.dump(bad_cfg, open(tmp_path / "bad_config.json", "w"))
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(tmp_path / "bad"),
               "--hf-config", str(tmp_path / "bad_config.json"))
    assert res.returncode == 1
    assert (f"tensor 'decoder.layers.mlp.linear_fc1.weight' has shape [2, 192, 64] in the Megatron checkpoint "
            f"{mc} but the architecture needs [2, 256, 64]") in res.stderr
    untied = dict(bad_cfg, intermediate_size=96, tie_word_embeddings=False)
    json.dump(untied, open(tmp_path / "untied.json", "w"))
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(tmp_path / "bad"),
               "--hf-config", str(tmp_path / "untied.json"))
    assert res.returncode == 1
    assert f"tensor 'output_layer.weight' is missing from the Megatron checkpoint {mc}" in res.stderr

    # a fault inside the workers (truncated tensor data): nothing at --out, no temporary directory left
    shard = sorted(f for f in os.listdir(mc) if f.endswith(".distcp"))[-1]
    data = open(mc / shard, "rb").read()
    open(mc / shard, "wb").write(data[: len(data) // 3])
    res = _cli("mcore-to-hf", "--ckpt", str(mc), "--out", str(tmp_path / "broken"))
    assert res.returncode == 1
    assert "aapo-convert: error: conversion worker" in res.stderr and "failed" in res.stderr
    assert not (tmp_path / "broken").exists() and _leftovers(tmp_path) == []
