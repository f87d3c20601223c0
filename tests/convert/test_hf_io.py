"""Streaming safetensors reader/writer and the atomic output directory, on real files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from aapo_megatron.checkpoint.errors import ConversionError, CorruptShardError, MissingTensorError, ShapeMismatchError
from aapo_megatron.checkpoint.hf import INDEX_NAME, HFCheckpointReader, parse_size
from aapo_megatron.checkpoint.hf_writer import SafetensorsShardWriter, finalize_shards, write_config
from aapo_megatron.checkpoint.conversion.outdir import OutputExistsError
from aapo_megatron.checkpoint.conversion.outdir import atomic_output_dir


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(4, 4, 4, generator=g),
        "d.bias": torch.arange(10, dtype=torch.int64),
    }


def _write_sharded(d, tensors, max_bytes):
    os.makedirs(d, exist_ok=True)
    w = SafetensorsShardWriter(str(d), max_bytes)
    for k, v in tensors.items():
        w.add(k, v)
    finalize_shards(str(d), w.close())
    write_config(str(d), {"architectures": ["LlamaForCausalLM"]})


def test_writer_caps_shards_and_reader_round_trips(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors, max_bytes=600)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert [sorted(k for k, f in index["weight_map"].items() if f == name) for name in files] == [
        ["a.weight", "b.weight"], ["c.weight", "d.bias"]]  # 512 + 64 B | 256 + 80 B
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    r = HFCheckpointReader(str(tmp_path))
    assert sorted(r.names()) == sorted(tensors)
    assert r.check("c.weight", (4, 4, 4)).dtype == torch.float32
    got = r.load(["d.bias", "a.weight"])
    assert set(got) == {"d.bias", "a.weight"}
    for k, v in got.items():
        assert v.dtype == tensors[k].dtype and torch.equal(v, tensors[k])
    streamed = {}
    for path, shard in r.iter_shards():
        assert os.path.basename(path) in files
        streamed.update(shard)
    assert all(torch.equal(streamed[k], tensors[k]) for k in tensors)


def test_single_shard_is_model_safetensors(tmp_path):
    _write_sharded(tmp_path, _tensors(), max_bytes=10**9)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert HFCheckpointReader(str(tmp_path)).total_bytes == 512 + 64 + 256 + 80


def test_reads_transformers_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    r = HFCheckpointReader(str(tmp_path))
    assert len(r.files) > 2
    sd = model.state_dict()
    got = r.load(list(sd))
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert "generation_config.json" in r.carried_files()


def test_truncated_shard_names_file(tmp_path):
    _write_sharded(tmp_path, _tensors(), max_bytes=600)
    victim = tmp_path / "model-00002-of-00002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-7])
    with pytest.raises(CorruptShardError, match=r"corrupt safetensors shard .*model-00002-of-00002\.safetensors: "
                                               r"tensor '.*' ends at byte \d+ but the file holds only \d+ data bytes"):
        HFCheckpointReader(str(tmp_path))


def test_bad_header_names_file(tmp_path):
    _write_sharded(tmp_path, _tensors(), max_bytes=10**9)
    victim = tmp_path / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[8] = ord("#")  # first byte of the JSON header
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"corrupt safetensors shard .*model\.safetensors: bad header"):
        HFCheckpointReader(str(tmp_path))
    victim.write_bytes(b"\xff" * 64)  # absurd header length
    with pytest.raises(CorruptShardError, match=r"model\.safetensors: header length \d+ exceeds the file size 64"):
        HFCheckpointReader(str(tmp_path))


def test_missing_and_mismatched_tensor_messages(tmp_path):
    _write_sharded(tmp_path, _tensors(), max_bytes=10**9)
    r = HFCheckpointReader(str(tmp_path))
    with pytest.raises(MissingTensorError, match=r"tensor 'lm_head\.weight' is missing from the checkpoint"):
        r.check("lm_head.weight", (4, 4))
    with pytest.raises(ShapeMismatchError,
                       match=r"tensor 'a\.weight' has shape \[8, 16\] in model\.safetensors "
                             r"but the architecture needs \[8, 32\]"):
        r.check("a.weight", (8, 32))


def test_index_pointing_to_missing_shard(tmp_path):
    _write_sharded(tmp_path, _tensors(), max_bytes=600)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match=r"shard model-00002-of-00002\.safetensors listed in .* is missing"):
        HFCheckpointReader(str(tmp_path))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size 'lots'"):
        parse_size("lots")


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(str(out), force=False) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not out.exists()
        (open(os.path.join(tmp, "x"), "w")).write("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(OutputExistsError, match=r"output directory .*out already exists; pass --force to overwrite it"):
        with atomic_output_dir(str(out), force=False):
            pass
    # a failure leaves the old output untouched and no temporary directory behind
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(str(out), force=True) as tmp:
            open(os.path.join(tmp, "y"), "w").write("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["x"]
    with atomic_output_dir(str(out), force=True) as tmp:
        open(os.path.join(tmp, "y"), "w").write("2")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["y"]
    with pytest.raises(ConversionError, match=r"would overwrite the input"):
        with atomic_output_dir(str(tmp_path), force=True, inputs=(str(out),)):
            pass
