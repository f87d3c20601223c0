"""Every aapo-convert input error, by its message; none of them leaves anything at --out."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from aapo_megatron.convert.cli import main


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_nothing_written(out) -> None:
    parent = os.path.dirname(str(out))
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(str(out))}.")]


def _shard_of(hf_dir: str, tensor: str) -> str:
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][tensor]


def test_unsupported_architecture_is_named_with_the_supported_list(tiny_hf_dirs, tmp_path, capsys):
    hf = _copy(tiny_hf_dirs["llama"][0], tmp_path / "hf")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["architectures"] = ["MistralForCausalLM"]
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    out = tmp_path / "out"
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", str(out)])
    assert code == 1
    assert ("aapo-convert: error: unsupported architecture 'MistralForCausalLM'; supported architectures: "
            "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM") in err
    _assert_nothing_written(out)


def test_missing_tensor_is_named(tiny_hf_dirs, tmp_path, capsys):
    hf = _copy(tiny_hf_dirs["qwen2_untied"][0], tmp_path / "hf")
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = os.path.join(hf, _shard_of(hf, victim))
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = os.path.join(hf, "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"][victim]
    json.dump(index, open(index_path, "w"))
    out = tmp_path / "out"
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", str(out)])
    assert code == 1
    assert f"aapo-convert: error: tensor '{victim}' is missing from the checkpoint {hf}" in err
    _assert_nothing_written(out)


def test_tensor_missing_from_its_indexed_shard_is_named(tiny_hf_dirs, tmp_path, capsys):
    hf = _copy(tiny_hf_dirs["qwen2_untied"][0], tmp_path / "hf")
    victim = "model.layers.0.self_attn.k_proj.bias"
    fname = _shard_of(hf, victim)
    tensors = load_file(os.path.join(hf, fname))
    del tensors[victim]
    save_file(tensors, os.path.join(hf, fname), metadata={"format": "pt"})
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", str(tmp_path / "out")])
    assert code == 1
    assert f"tensor '{victim}' is listed in model.safetensors.index.json under {fname} but that shard does not" in err


def test_mismatched_shape_names_tensor_and_both_shapes(tiny_hf_dirs, tmp_path, capsys):
    hf = _copy(tiny_hf_dirs["qwen3"][0], tmp_path / "hf")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["intermediate_size"] = 128  # the weights have 96
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    out = tmp_path / "out"
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", str(out)])
    assert code == 1
    fname = _shard_of(hf, "model.layers.0.mlp.gate_proj.weight")
    assert (f"aapo-convert: error: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64] in {fname} "
            "but the architecture needs [128, 64]") in err
    _assert_nothing_written(out)


def test_corrupt_shard_is_named(tiny_hf_dirs, tmp_path, capsys):
    hf = _copy(tiny_hf_dirs["llama"][0], tmp_path / "hf")
    fname = _shard_of(hf, "model.layers.1.self_attn.o_proj.weight")
    path = os.path.join(hf, fname)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated copy
    out = tmp_path / "out"
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", str(out)])
    assert code == 1
    assert f"aapo-convert: error: corrupt safetensors shard {path}: tensor '" in err
    assert "(truncated)" in err
    _assert_nothing_written(out)


def test_existing_output_needs_force(tiny_hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", tiny_hf_dirs["llama"][0], "--out", str(out)])
    assert code == 1
    assert f"aapo-convert: error: output directory {out} already exists; pass --force to overwrite it" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, err = _run(capsys, ["mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(out)])
    assert code == 1 and f"{tmp_path} is not a Megatron dist_checkpointing checkpoint (no metadata.json)" in err


def test_workers_must_divide_layers(tiny_hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", tiny_hf_dirs["llama"][0], "--out", str(out),
                              "--workers", "3"])
    assert code == 1
    assert "aapo-convert: error: --workers 3 must be a positive divisor of the number of layers (2)" in err
    _assert_nothing_written(out)


def test_missing_hf_dir_and_config(tmp_path, capsys):
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 1 and f"HF checkpoint directory {tmp_path / 'nope'} does not exist" in err
    code, err = _run(capsys, ["hf-to-mcore", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1 and f"{tmp_path / 'config.json'} not found: an HF checkpoint directory needs a config.json" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["hf-to-mcore", "--out", "x"])
    assert exc.value.code == 2
    assert "the following arguments are required: --hf-dir" in capsys.readouterr().err
