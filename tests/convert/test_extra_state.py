"""Checkpoints written without Transformer Engine load into a model whose modules carry extra state (TE's case).

The loading model's core attention implements get_extra_state/set_extra_state and puts its `_extra_state` into
Megatron's sharded state dict, as TE's TEDotProductAttention does. A checkpoint saved by the local-spec model has no
such entry: Megatron's default load fails on it (the error TE users saw); `load_mcore_checkpoint` and the trainer's
`load_model_and_optimizer` load every weight and leave the extra state as initialised. A missing entry that is not
extra state (a qkv bias the checkpoint never had) still fails, naming the key.
"""

import pytest
import torch

from tests.distributed import run_ranks

QKV_BIAS_KEY = "decoder.layers.self_attention.linear_qkv.bias"


def _spec(qkv_bias: bool = False):
    from aapo_megatron.config import ScratchModelConfig
    from aapo_megatron.models.arch import ArchSpec

    spec = ArchSpec.from_scratch(ScratchModelConfig(hidden_size=64, num_layers=2, ffn_hidden_size=96, vocab_size=64,
                                                    tie_word_embeddings=False))
    return spec.replace(qkv_bias=qkv_bias) if qkv_bias else spec


def _extra_state_model(spec):
    """The local-spec GPTModel with a core attention that carries extra state (stands in for TE's)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from aapo_megatron.models.attention import SDPADotProductAttention
    from aapo_megatron.models.gpt import layer_spec, transformer_config

    class ExtraStateAttention(SDPADotProductAttention):
        """SDPA core attention with extra state (like TE's FP8 metadata) in its state dicts."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.meta = torch.tensor([7.0])
            self.set_calls = 0

        def get_extra_state(self):
            return {"meta": self.meta.clone()}

        def set_extra_state(self, state):
            self.set_calls += 1
            self.meta = state["meta"]

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                       sharded_offsets)

    layer = layer_spec(spec, use_te=False)
    layer.submodules.self_attention.submodules.core_attention = ExtraStateAttention
    return GPTModel(config=transformer_config(spec, dtype="float32"), transformer_layer_spec=layer,
                    vocab_size=spec.padded_vocab_size(1), max_sequence_length=spec.max_position_embeddings,
                    share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="rope",
                    rotary_base=spec.rope_theta)


def _attentions(model):
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def _body(rank: int, world: int, tmp: str) -> dict:
    from megatron.core import dist_checkpointing

    from aapo_megatron.checkpoint.errors import MissingTensorError
    from aapo_megatron.checkpoint.mcore import load_mcore_checkpoint, save_mcore_checkpoint
    from aapo_megatron.config import OptimConfig, ParallelConfig
    from aapo_megatron.models.gpt import build_gpt_model
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.trainer.optim import build_optimizer, guarded_update, wrap_ddp
    from aapo_megatron.trainer.state import load_model_and_optimizer, save_model_and_optimizer

    init_distributed(ParallelConfig())
    seed_everything(0)
    out = {}
    saved = build_gpt_model(_spec(), dtype="float32")
    want = {k: v.detach().clone() for k, v in saved.state_dict().items() if not k.endswith("_extra_state")}
    save_mcore_checkpoint(saved, f"{tmp}/converted")

    seed_everything(1)  # other random weights, so that a load that skips a tensor shows
    model = _extra_state_model(_spec())
    try:  # what Megatron's default strictness does (and TE models hit)
        dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/converted")
        out["default_error"] = None
    except BaseException as exc:  # noqa: BLE001 - torch DCP raises CheckpointException, a BaseException
        out["default_error"] = str(exc)
    out["differs_before"] = any(not torch.equal(v, want[k]) for k, v in model.state_dict().items() if k in want)
    load_mcore_checkpoint(model, f"{tmp}/converted")
    got = model.state_dict()
    out["mismatched"] = [k for k, v in want.items() if not torch.equal(got[k], v)]
    out["extra_kept"] = [(a.set_calls, float(a.meta)) for a in _attentions(model)]

    biased = _extra_state_model(_spec(qkv_bias=True))
    try:
        load_mcore_checkpoint(biased, f"{tmp}/converted")
        out["bias_error"] = None
    except MissingTensorError as exc:
        out["bias_error"] = str(exc)

    # Trainer checkpoints (policy + optimizer): saved without extra state, resumed into the extra-state model.
    optim = OptimConfig(lr=1e-3)
    plain = wrap_ddp([build_gpt_model(_spec(), dtype="float32")], use_distributed_optimizer=False)
    plain_opt = build_optimizer(plain, optim, False, False)
    guarded_update(plain_opt, None, 0.0)  # one (zero-gradient) step creates the Adam state a trainer checkpoint has
    save_model_and_optimizer(f"{tmp}/trainer", plain, plain_opt)
    want = {k: v.detach().clone() for k, v in plain[0].module.state_dict().items() if not k.endswith("_extra_state")}
    seed_everything(2)
    chunks = wrap_ddp([_extra_state_model(_spec())], use_distributed_optimizer=False)
    load_model_and_optimizer(f"{tmp}/trainer", chunks, build_optimizer(chunks, optim, False, False))
    got = chunks[0].module.state_dict()
    out["trainer_mismatched"] = [k for k, v in want.items() if not torch.equal(got[k], v)]
    out["trainer_extra_kept"] = [(a.set_calls, float(a.meta)) for a in _attentions(chunks[0].module)]
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_ranks(_body, 1, args=(str(tmp_path_factory.mktemp("extra_state")),), env={"OMP_NUM_THREADS": "1"})[0]


def test_default_megatron_load_fails_on_missing_extra_state(result):
    assert result["default_error"] is not None and "core_attention._extra_state" in result["default_error"]


def test_converted_checkpoint_loads_into_a_model_with_extra_state(result):
    assert result["differs_before"]
    assert result["mismatched"] == []
    assert result["extra_kept"] == [(0, 7.0), (0, 7.0)]  # not in the checkpoint: left as initialised


def test_trainer_checkpoint_loads_into_a_model_with_extra_state(result):
    assert result["trainer_mismatched"] == []
    assert result["trainer_extra_kept"] == [(0, 7.0), (0, 7.0)]


def test_other_missing_keys_still_fail_with_their_name(result):
    assert result["bias_error"] is not None
    assert QKV_BIAS_KEY in result["bias_error"] and "_extra_state'" in result["bias_error"]
    assert "core_attention._extra_state" not in result["bias_error"]
