"""ArchSpec from HF configs (Llama + llama3 rope, Qwen2, Qwen3), from ScratchModelConfig, and back to HF."""

from __future__ import annotations

import json

import pytest

from aapo_megatron.config import ScratchModelConfig
from aapo_megatron.models.arch import ArchSpec, RopeScaling, UnsupportedArchitectureError, to_hf_config
from tests.models.tiny_hf import KINDS, tiny_hf_config


def test_llama_with_llama3_rope_scaling():
    spec = ArchSpec.from_hf_config(tiny_hf_config("llama").to_dict())
    assert spec.family == "llama" and spec.hf_architecture == "LlamaForCausalLM"
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.heads_per_group) == (8, 2, 8, 4)
    assert spec.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=64)
    assert not spec.qkv_bias and not spec.qk_norm and not spec.tie_word_embeddings


def test_llama_legacy_rope_keys():
    """transformers 4.x config.json files: rope_theta at top level and rope_scaling with 'rope_type'."""
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192,
          "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    spec = ArchSpec.from_hf_config(hf)
    assert spec.rope_theta == 500000.0 and spec.rope_scaling.factor == 8.0
    assert spec.head_dim == 128 and spec.norm_eps == 1e-5 and spec.torch_dtype == "bfloat16"
    assert spec.eos_token_id == [128001, 128008, 128009]


def test_qwen2_tied_and_untied():
    tied = ArchSpec.from_hf_config(tiny_hf_config("qwen2_tied").to_dict())
    untied = ArchSpec.from_hf_config(tiny_hf_config("qwen2_untied").to_dict())
    assert tied.qkv_bias and untied.qkv_bias and not tied.qk_norm
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert tied.rope_theta == 1000000.0 and tied.rope_scaling is None


def test_qwen3_qk_norm_and_head_dim():
    spec = ArchSpec.from_hf_config(tiny_hf_config("qwen3").to_dict())
    assert spec.qk_norm and not spec.qkv_bias
    assert spec.head_dim == 16 and spec.hidden_size // spec.num_attention_heads == 8
    assert spec.q_size == 128 and spec.kv_size == 32


def test_unsupported_architecture_names_it_and_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchSpec.from_hf_config({"architectures": ["MistralForCausalLM"], "vocab_size": 10})
    msg = str(err.value)
    assert "'MistralForCausalLM'" in msg
    assert "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'gemma'.*supported architectures: Llama"):
        ArchSpec.from_hf_config({"model_type": "gemma"})


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, r"LlamaForCausalLM with attention_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"rope type 'yarn' is not supported"),
])
def test_unsupported_features(change, message):
    hf = tiny_hf_config("llama").to_dict()
    hf.update(change)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        ArchSpec.from_hf_config(hf)


def test_missing_key_is_named():
    hf = tiny_hf_config("qwen2_tied").to_dict()
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="HF config for Qwen2ForCausalLM is missing required key 'intermediate_size'"):
        ArchSpec.from_hf_config(hf)


def test_from_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("qwen3").to_dict()))
    assert ArchSpec.from_hf_dir(str(tmp_path)).family == "qwen3"
    with pytest.raises(FileNotFoundError, match="no HF config.json at"):
        ArchSpec.from_hf_dir(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ArchSpec.from_hf_dir(str(tmp_path / "bad"))


@pytest.mark.parametrize("kind", KINDS)
def test_to_hf_config_round_trips_through_transformers(kind):
    from transformers import AutoConfig

    spec = ArchSpec.from_hf_config(tiny_hf_config(kind).to_dict())
    hf = to_hf_config(spec)
    assert ArchSpec.from_hf_config(hf) == spec
    # transformers reads the exported dict back as the same architecture.
    cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    assert ArchSpec.from_hf_config(cfg.to_dict()) == spec


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_from_scratch(arch):
    sc = ScratchModelConfig(architecture=arch, hidden_size=64, num_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, ffn_hidden_size=160, vocab_size=300, tie_word_embeddings=True)
    spec = ArchSpec.from_scratch(sc)
    assert (spec.hidden_size, spec.num_layers, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size) == (64, 2, 16, 160, 300)
    assert spec.qkv_bias == (arch == "qwen2") and spec.qk_norm == (arch == "qwen3")
    assert spec.tie_word_embeddings
    assert ArchSpec.from_hf_config(to_hf_config(spec)) == spec


def test_padded_vocab_size():
    spec = ArchSpec.from_hf_config(tiny_hf_config("llama").to_dict()).replace(vocab_size=97)
    assert [spec.padded_vocab_size(tp) for tp in (1, 2, 4)] == [97, 98, 100]
    assert spec.replace(vocab_pad_multiple=64).padded_vocab_size(2) == 128


def test_validate_names_field():
    spec = ArchSpec.from_hf_config(tiny_hf_config("llama").to_dict())
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 must divide num_attention_heads=8"):
        spec.replace(num_key_value_heads=3)
