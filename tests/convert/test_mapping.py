"""HF <-> Megatron mapping: names, interleaved GQA qkv, [gate; up], TP shard/unshard, PP placement, errors."""

from __future__ import annotations

import pytest
import torch

from aapo_megatron.models.arch import ArchSpec
from aapo_megatron.models.mapping import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    MappingError,
    WeightMapping,
    detect_naming,
    shard_tensor,
    stage_layer_range,
    unshard_tensor,
)
from tests.models.tiny_hf import KINDS, hf_state_dict, tiny_hf_config, tiny_hf_model


def _spec(kind: str, **changes) -> ArchSpec:
    spec = ArchSpec.from_hf_config(tiny_hf_config(kind).to_dict())
    return spec.replace(**changes) if changes else spec


def _random_hf(mapping: WeightMapping, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(mapping.hf_shape(n), generator=gen) for n in mapping.hf_names()}


@pytest.fixture(scope="module")
def hf_models():
    return {kind: tiny_hf_model(kind) for kind in KINDS}


@pytest.mark.parametrize("naming", ["local", "te"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise(hf_models, kind, naming):
    model = hf_models[kind]
    sd = hf_state_dict(model)
    mapping = WeightMapping(ArchSpec.from_hf_config(model.config.to_dict()), naming=naming)
    assert sorted(mapping.hf_names()) == sorted(sd)  # the mapping covers the checkpoint exactly
    mc = mapping.hf_to_megatron(sd)
    assert sorted(mc) == sorted(mapping.megatron_names())
    back = mapping.megatron_to_hf(mc)
    assert back.keys() == sd.keys()
    for name in sd:
        assert back[name].dtype == sd[name].dtype and torch.equal(back[name], sd[name]), name


def test_names_local_te_tied_bias_qknorm():
    local = WeightMapping(_spec("qwen3"), naming="local").megatron_names()
    te = WeightMapping(_spec("qwen3"), naming="te").megatron_names()
    assert "decoder.layers.1.input_layernorm.weight" in local
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in local
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in te
    assert "decoder.layers.0.self_attention.k_layernorm.weight" in local
    assert detect_naming(local) == "local" and detect_naming(te) == "te"
    assert OUTPUT_LAYER in local
    tied = WeightMapping(_spec("qwen2_tied"))
    assert OUTPUT_LAYER not in tied.megatron_names() and "lm_head.weight" not in tied.hf_names()
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in tied.megatron_names()
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in WeightMapping(_spec("llama")).megatron_names()


@pytest.mark.parametrize("kind", ["llama", "qwen2_untied", "qwen3"])
def test_qkv_is_interleaved_per_query_group(kind):
    """Rows of linear_qkv: for each KV group g, its q heads, then k head g, then v head g."""
    spec = _spec(kind)
    mapping = WeightMapping(spec)
    hf = _random_hf(mapping)
    d, hpg = spec.head_dim, spec.heads_per_group
    for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
        q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.{suffix}"] for p in "qkv")
        expected = []
        for g in range(spec.num_key_value_heads):
            for h in range(g * hpg, (g + 1) * hpg):
                expected.append(q[h * d:(h + 1) * d])
            expected.append(k[g * d:(g + 1) * d])
            expected.append(v[g * d:(g + 1) * d])
        got = mapping.hf_to_megatron_layer(0, hf)[f"decoder.layers.0.self_attention.linear_qkv.{suffix}"]
        assert torch.equal(got, torch.cat(expected))


def test_fc1_is_gate_then_up_and_tp_shard_keeps_pairs():
    spec = _spec("llama")
    mapping = WeightMapping(spec)
    hf = _random_hf(mapping)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    full = mapping.hf_to_megatron_layer(1, hf)[name]
    assert torch.equal(full, torch.cat([gate, up]))
    f = spec.ffn_hidden_size // 2
    for r in range(2):
        shard = mapping.shard(name, full, r, 2)  # Megatron's SwiGLU chunks each rank's output in two halves
        assert torch.equal(shard, torch.cat([gate[r * f:(r + 1) * f], up[r * f:(r + 1) * f]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_tp_shard_unshard_round_trip(kind, tp):
    spec = _spec(kind, num_key_value_heads=4)  # 4 KV groups so TP=4 holds whole groups
    mapping = WeightMapping(spec)
    mc = mapping.hf_to_megatron(_random_hf(mapping))
    for name, full in mc.items():
        shards = [mapping.shard(name, full, r, tp) for r in range(tp)]
        for s in shards:
            assert tuple(s.shape) == mapping.megatron_shape(name, tp), name
        assert torch.equal(mapping.unshard(name, shards), full), name


def test_tp_layouts():
    spec = _spec("qwen2_untied", num_key_value_heads=4)
    mapping = WeightMapping(spec)
    mc = mapping.hf_to_megatron(_random_hf(mapping))
    qkv = mc["decoder.layers.0.self_attention.linear_qkv.weight"]
    rows_per_group = (spec.heads_per_group + 2) * spec.head_dim
    # Column parallel: rank 1 of 2 holds query groups 2 and 3.
    assert torch.equal(mapping.shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 1, 2),
                       qkv[2 * rows_per_group:4 * rows_per_group])
    # Row parallel: linear_proj splits its input columns.
    proj = mc["decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.equal(mapping.shard("decoder.layers.0.self_attention.linear_proj.weight", proj, 1, 4),
                       proj[:, spec.q_size // 4:2 * spec.q_size // 4])
    # Replicated: norms are the same on every rank.
    norm = mc[FINAL_NORM]
    assert mapping.shard(FINAL_NORM, norm, 3, 4) is norm


def test_vocab_padding_when_tp_does_not_divide_vocab():
    spec = _spec("llama", vocab_size=97)
    mapping = WeightMapping(spec)
    emb = torch.randn(97, spec.hidden_size)
    shards = [mapping.shard(EMBEDDING, emb, r, 2) for r in range(2)]
    assert [tuple(s.shape) for s in shards] == [(49, spec.hidden_size)] * 2
    assert torch.equal(shards[0], emb[:49])
    assert torch.equal(shards[1][:48], emb[49:]) and torch.count_nonzero(shards[1][48]) == 0  # one zero pad row
    assert torch.equal(mapping.unshard(EMBEDDING, shards), emb)
    assert mapping.megatron_shape(OUTPUT_LAYER, 4) == (25, spec.hidden_size)
    # to_hf drops padding rows of a padded full tensor too.
    padded = torch.cat([emb, torch.zeros(3, spec.hidden_size)])
    assert torch.equal(mapping.to_hf(mapping.group(EMBEDDING), padded)["model.embed_tokens.weight"], emb)


def test_layer_by_layer_requests_only_that_layer():
    mapping = WeightMapping(_spec("qwen3"))
    hf = _random_hf(mapping)
    requested = []

    def getter(name):
        requested.append(name)
        return hf[name]

    mc = mapping.hf_to_megatron_layer(1, getter)
    assert sorted(requested) == sorted(mapping.layer_hf_names(1))
    assert all(n.startswith("model.layers.1.") for n in requested)
    assert all(n.startswith("decoder.layers.1.") for n in mc)
    back = mapping.megatron_to_hf_layer(1, mc)
    assert all(torch.equal(back[n], hf[n]) for n in requested)


def test_pipeline_placement():
    spec = _spec("llama", num_layers=6)
    mapping = WeightMapping(spec)
    assert [list(mapping.layer_range(r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    name = "decoder.layers.3.mlp.linear_fc2.weight"
    assert mapping.local_name(name, 1, 3) == "decoder.layers.1.mlp.linear_fc2.weight"
    assert mapping.local_name(name, 0, 3) is None and mapping.local_name(name, 2, 3) is None
    assert mapping.global_name("decoder.layers.1.mlp.linear_fc2.weight", 1, 3) == name
    assert mapping.stage_of(name, 3) == [1]
    assert mapping.local_name(EMBEDDING, 0, 3) == EMBEDDING and mapping.local_name(EMBEDDING, 2, 3) is None
    assert mapping.local_name(OUTPUT_LAYER, 2, 3) == OUTPUT_LAYER and mapping.local_name(FINAL_NORM, 0, 3) is None
    # Every group lives on exactly one stage.
    placed = [g.megatron_name for r in range(3) for g in mapping.stage_groups(r, 3)]
    assert sorted(placed) == sorted(mapping.megatron_names())
    with pytest.raises(MappingError, match=r"pipeline size 4 must divide the number of layers \(6\)"):
        stage_layer_range(6, 0, 4)


def test_missing_and_mismatched_tensors_are_named():
    mapping = WeightMapping(_spec("qwen2_untied"))
    hf = _random_hf(mapping)
    del hf["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(MappingError, match=r"missing HF tensor 'model.layers.0.self_attn.k_proj.bias' "
                                           r"\(expected shape \(16,\)\)"):
        mapping.hf_to_megatron_layer(0, hf)
    hf = _random_hf(mapping)
    hf["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(MappingError, match=r"HF tensor 'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\), "
                                           r"expected \(96, 64\)"):
        mapping.hf_to_megatron(hf)
    with pytest.raises(MappingError, match=r"unknown Megatron tensor 'decoder.layers.0.mlp.router.weight'"):
        mapping.group("decoder.layers.0.mlp.router.weight")
    with pytest.raises(MappingError, match=r"Megatron tensor 'decoder.final_layernorm.weight' has shape \(3,\), "
                                           r"expected \(64,\)"):
        mapping.shard(FINAL_NORM, torch.zeros(3), 0, 2)
    mc = mapping.hf_to_megatron(_random_hf(mapping))
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    with pytest.raises(MappingError, match=r"tp=4 must divide num_key_value_heads=2"):
        mapping.shard(qkv, mc[qkv], 0, 4)
    with pytest.raises(MappingError, match=r"TP shard 1 of '.*linear_qkv.weight' has shape"):
        mapping.unshard(qkv, [mapping.shard(qkv, mc[qkv], 0, 2), torch.zeros(3, 64)])


def test_free_functions_match_layout_names():
    full = torch.arange(24.0).view(6, 4)
    assert torch.equal(unshard_tensor([shard_tensor(full, "gated_column", r, 3) for r in range(3)], "gated_column"),
                       full)
    assert torch.equal(unshard_tensor([shard_tensor(full, "row", r, 2) for r in range(2)], "row"), full)
    with pytest.raises(MappingError, match=r"tensor-parallel rank 2 out of range \[0, 2\)"):
        shard_tensor(full, "column", 2, 2)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS + ("llama_vocab97",))
def test_shard_to_hf_gives_contiguous_hf_slices(kind, tp):
    """Per-rank HF slices (for a TP-matched inference engine) concatenate back to the HF tensors."""
    spec = _spec("llama", vocab_size=97, num_key_value_heads=4) if kind == "llama_vocab97" else _spec(kind, num_key_value_heads=4)
    mapping = WeightMapping(spec)
    hf = _random_hf(mapping)
    mc = mapping.hf_to_megatron(hf)
    pieces: dict[str, list] = {}
    for name, full in mc.items():
        for r in range(tp):
            for hf_name, t in mapping.shard_to_hf(name, mapping.shard(name, full, r, tp), r, tp).items():
                pieces.setdefault(hf_name, []).append(t)
    assert sorted(pieces) == sorted(hf)
    for hf_name, parts in pieces.items():
        dim = mapping.hf_split_dim(hf_name)
        got = parts[0] if dim is None else torch.cat(parts, dim=dim)
        assert torch.equal(got, hf[hf_name]), hf_name
