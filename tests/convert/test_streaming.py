"""The streamed conversion paths hold a few tensors at a time, never a whole stage.

- `SafetensorsStreamWriter` writes files safetensors reads back bitwise, and refuses a tensor out of order;
- `HFCheckpointReader.read` (plain file reads, no mmap) returns what safetensors returns;
- hf-to-mcore and mcore-to-hf on an 8-layer model with 75 tensors: the bytes of converted tensors alive at
  once (tracked by storage, so a writer keeping written tensors around counts) stay under twice the largest
  tensor, far below the stage size, and the round trip is bitwise exact;
- a conversion worker imports Megatron without pulling in torch._dynamo / torch._inductor.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from aapo_megatron.checkpoint.hf import HFCheckpointReader
from aapo_megatron.checkpoint.hf_writer import (
    SafetensorsShardWriter,
    SafetensorsStreamWriter,
    finalize_shards,
    plan_shards,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(4, 4, 4, generator=g).to(torch.float16),
        "d.bias": torch.arange(10, dtype=torch.int64),
        "e.weight": torch.randn(16, 8, generator=g).t(),  # not contiguous
    }


def test_stream_writer_round_trips_through_safetensors(tmp_path):
    tensors = _tensors()
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(str(tmp_path), 600, layout, tag="7")
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    parts = writer.close()
    # the same split as the buffering writer: a new shard when the next tensor would pass 600 bytes
    buffered = SafetensorsShardWriter(str(tmp_path / "buffered"), 600)
    os.makedirs(buffered.out_dir)
    for name, tensor in tensors.items():
        buffered.add(name, tensor)
    assert [p.names for p in parts] == [p.names for p in buffered.close()]
    assert [p.names for p in parts] == [[e[0] for e in shard] for shard in plan_shards(layout, 600)]
    assert [p.names for p in parts] == [["a.weight", "b.weight"], ["c.weight", "d.bias"], ["e.weight"]]
    for part in parts:
        with open(tmp_path / part.filename, "rb") as f:
            assert int.from_bytes(f.read(8), "little") % 8 == 0  # the data starts 8-byte aligned
        with safe_open(str(tmp_path / part.filename), framework="pt") as f:
            assert sorted(f.keys()) == sorted(part.names)
            for name in part.names:
                got = f.get_tensor(name)
                assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name
    finalize_shards(str(tmp_path), parts)  # HF names + index
    (tmp_path / "config.json").write_text("{}")
    reader = HFCheckpointReader(str(tmp_path))
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor), name


def test_stream_writer_refuses_out_of_order_wrong_shape_and_incomplete(tmp_path):
    tensors = _tensors()
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(str(tmp_path), 10_000, layout)
    with pytest.raises(ValueError, match="tensor 'b.weight' written out of order: the layout expects 'a.weight'"):
        writer.add("b.weight", tensors["b.weight"])
    with pytest.raises(ValueError, match=r"tensor 'a.weight' is torch.float32 \[16, 8\], the layout declares "
                                         r"torch.float32 \[8, 16\]"):
        writer.add("a.weight", tensors["a.weight"].t())
    writer.add("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match=r"tensor 'b.weight' was never written \(4 of 5 missing\)"):
        writer.close()


def test_reader_read_matches_safetensors_and_names_truncation(tmp_path):
    from safetensors.torch import save_file

    from aapo_megatron.checkpoint.errors import CorruptShardError

    tensors = {n: t.contiguous() for n, t in _tensors().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    reader = HFCheckpointReader(str(tmp_path))
    for name, tensor in tensors.items():
        got = reader.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert got.untyped_storage().nbytes() == tensor.nbytes  # its own storage, exactly the tensor
    # a shard cut short after the header was read: the read names the file and the tensor
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    last = max(reader.tensors.values(), key=lambda i: i.offset)
    path.write_bytes(data[: last.offset + 3])
    with pytest.raises(CorruptShardError, match=f"corrupt safetensors shard {path}: tensor '{last.name}' is "
                                                f"truncated \\(read 3 of {last.nbytes} bytes\\)"):
        reader.read(last.name)


def _many_tensor_llama(path: str) -> dict:
    """An 8-layer fp32 Llama (75 HF tensors, 1.6 MB; the largest, the embedding, 128 KiB), sharded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.models.tiny_hf import hf_state_dict

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(path, max_shard_size="300KB")
    return hf_state_dict(model)


@pytest.mark.slow
def test_conversions_hold_a_few_tensors_not_the_stage(tmp_path):
    from aapo_megatron.checkpoint.conversion.hf_to_mcore import convert_hf_to_mcore
    from aapo_megatron.checkpoint.conversion.mcore_to_hf import convert_mcore_to_hf

    hf = str(tmp_path / "hf")
    sd = _many_tensor_llama(hf)
    total = sum(t.nbytes for t in sd.values())
    largest = max(t.nbytes for t in sd.values())
    assert len(sd) == 75 and total > 12 * largest

    res = convert_hf_to_mcore(hf, str(tmp_path / "mcore"), workers=1, progress=False)
    # every tensor goes through the lazy path (the embedding at least), and at most ~2 are alive at once
    assert largest <= res.peak_live_bytes <= 2 * largest, (res.peak_live_bytes, largest, total)
    assert res.worker_base_rss > 100 * 2**20  # a real process with torch + Megatron, measured before any weight

    from aapo_megatron.checkpoint.errors import MissingTensorError
    from aapo_megatron.checkpoint.mcore import CheckpointTensorReader

    mc = str(tmp_path / "mcore")
    ckpt = CheckpointTensorReader(mc)
    down = ckpt.read("decoder.layers.mlp.linear_fc2.weight", (5, 0, 0), (1, 64, 160))  # one layer of the stack
    assert torch.equal(down[0], sd["model.layers.5.mlp.down_proj.weight"])
    with pytest.raises(MissingTensorError, match=f"tensor 'decoder.layers.nope' is missing from the Megatron "
                                                 f"checkpoint {mc}"):
        ckpt.read("decoder.layers.nope", (0,), (1,))

    back = str(tmp_path / "back")
    res = convert_mcore_to_hf(str(tmp_path / "mcore"), back, workers=1, max_shard_size="200KB", progress=False)
    assert largest <= res.peak_live_bytes <= 2 * largest, (res.peak_live_bytes, largest, total)
    reader = HFCheckpointReader(back)
    assert len(reader.files) > 5 and sorted(reader.names()) == sorted(sd)
    for name, tensor in sd.items():
        assert torch.equal(reader.read(name), tensor), name


def test_worker_imports_megatron_without_inductor():
    code = (
        "import sys, torch\n"
        "real = torch.compile\n"
        "from aapo_megatron.checkpoint.conversion.memory import import_megatron_without_compile\n"
        "import_megatron_without_compile()\n"
        "import megatron.core.jit as jit\n"
        "from aapo_megatron.models.gpt import build_gpt_model\n"
        "print(torch.compile is real, 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules,\n"
        "      jit.jit_fuser(len) is len)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "False", "False", "True"]
