"""Sequence parallelism and activation recompute change memory, not math: same loss and same per-parameter gradients.

One TP=2 gloo job trains a tiny Qwen3-style model (q/k norms) through the real train step (Megatron schedule, DDP,
finalize_model_grads, fused log-prob loss) with each of: no SP, SP, SP + full recompute, and the recompute modes
without SP, on packed and padded micro-batches. Gradients are read from Megatron's grad buffers after the step and
gathered to full HF tensors. Forward hooks show that each option reached the model (a recomputed module runs twice,
an SP norm sees S/tp tokens).
"""

import pytest
import torch

from tests.distributed import run_ranks

# name -> (sequence_parallel, recompute overrides)
VARIANTS = {
    "base": (False, []),
    "sp": (True, []),
    "sp_full": (True, ["trainer.recompute=full", "trainer.recompute_num_layers=2"]),
    "selective": (False, ["trainer.recompute=selective", "trainer.recompute_modules=[core_attn,mlp]"]),
    "full_uniform": (False, ["trainer.recompute=full", "trainer.recompute_method=uniform",
                             "trainer.recompute_num_layers=1"]),
    "full_block": (False, ["trainer.recompute=full", "trainer.recompute_method=block",
                           "trainer.recompute_num_layers=1"]),
}


def _batch():
    from aapo_megatron.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(1)
    prompts = [[int(t) for t in torch.randint(4, 60, (n,), generator=g)] for n in (3, 5, 2, 4, 6, 3)]
    # long completions put loss tokens in both TP halves of the padded rows (S = 24)
    completions = [[int(t) for t in torch.randint(4, 60, (n,), generator=g)] for n in (9, 2, 12, 3, 1, 14)]
    return RolloutBatch(prompts, completions, torch.randn(6, generator=g))


def _count_calls(model, sp: bool) -> tuple[dict, list]:
    """Forward-call counters for the modules recompute re-runs, and the sequence lengths the first norm sees."""
    calls: dict[str, int] = {}
    norm_seq: list[int] = []
    layers = model.decoder.layers
    for i, layer in enumerate(layers):
        for name, mod in (("layer", layer), ("core_attn", layer.self_attention.core_attention),
                          ("mlp", layer.mlp)):
            key = f"{name}{i}"
            mod.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
    layers[0].input_layernorm.register_forward_hook(lambda m, inp, out: norm_seq.append(int(inp[0].shape[0])))
    return calls, norm_seq


def _one(variant: str, pack: bool) -> dict:
    from megatron.core import parallel_state as ps

    from aapo_megatron.config import OptimConfig
    from aapo_megatron.validation import load_config
    from aapo_megatron.models.activation_memory import model_config_overrides, sequence_multiple
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.models.weights import gather_hf_state_dict, load_hf_weights, model_naming
    from aapo_megatron.trainer.losses import build_loss_fn
    from aapo_megatron.trainer.optim import build_optimizer, wrap_ddp
    from aapo_megatron.trainer.train_step import micro_batcher, run_update

    sp, recompute = VARIANTS[variant]
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", f"parallel.sequence_parallel={sp}",
                             "model.scratch.architecture=qwen3", "model.scratch.vocab_size=64",
                             "model.scratch.num_layers=2", "model.scratch.hidden_size=64",
                             "model.scratch.ffn_hidden_size=96", *recompute])
    spec = ArchSpec.from_scratch(cfg.model.scratch)
    model = build_policy(spec, dtype="float32", config_overrides=model_config_overrides(cfg.parallel, cfg.trainer))
    mapping = WeightMapping(spec, naming=model_naming(model))
    gen = torch.Generator().manual_seed(123)
    init = {n: (1.0 if n.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(mapping.hf_shape(n), generator=gen)
            for n in mapping.hf_names()}
    load_hf_weights(model, mapping, init)
    calls, norm_seq = _count_calls(model, sp)
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    optim = OptimConfig(lr=1e-3, clip_grad=0.0)
    opt = build_optimizer(chunks, optim, bf16=False, use_distributed_optimizer=False)
    multiple = sequence_multiple(ps.get_tensor_model_parallel_world_size(), sp)
    micro = micro_batcher(_batch(), 48, pack=pack, seq_multiple=multiple)(range(6))
    stats = run_update(chunks, opt, None, micro, build_loss_fn("aapo_ce", cfg.algorithm), optim.clip_grad)
    params = dict(model.named_parameters())
    for p in params.values():  # gather the gradients with the weight gather: each parameter's data := its grad
        p.data = p.main_grad
    grads = gather_hf_state_dict(model, mapping)
    return {"loss": stats.loss, "grads": grads, "calls": calls, "norm_seq": norm_seq, "micro": len(micro),
            "seq": int(micro[0].tokens.shape[1])}


def _body(rank: int, world: int) -> dict:
    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.distributed import init_distributed, seed_everything, teardown_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    seed_everything(0)
    out = {(v, pack): _one(v, pack) for v in VARIANTS for pack in ((True, False) if v in ("base", "sp") else (True,))}
    teardown_distributed()
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_body, 2, env={"OMP_NUM_THREADS": "1"})[0]


def _assert_same(got: dict, want: dict) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_sequence_parallel_same_loss_and_gradients(runs, pack):
    base, sp = runs[("base", pack)], runs[("sp", pack)]
    assert base["micro"] > 1  # several micro-batches through the schedule
    # SP reached the model: the first layer's norm sees half of each micro-batch's tokens.
    assert set(sp["norm_seq"]) == {sp["seq"] // 2} and set(base["norm_seq"]) == {base["seq"]}
    _assert_same(sp, base)


@pytest.mark.parametrize("variant", ["selective", "full_uniform", "full_block", "sp_full"])
def test_recompute_same_gradients(runs, variant):
    base, got = runs[("base", True)], runs[(variant, True)]
    n = got["micro"]
    assert all(v == n for v in base["calls"].values())  # no recompute: one forward per micro-batch
    rerun = {"selective": ["core_attn0", "core_attn1", "mlp0", "mlp1"],
             "full_uniform": ["layer0", "layer1"], "full_block": ["layer0"], "sp_full": ["layer0", "layer1"]}[variant]
    assert {k for k, v in got["calls"].items() if v == 2 * n} >= set(rerun)
    if variant == "full_block":
        assert got["calls"]["layer1"] == n  # block: only the first recompute_num_layers layers
    _assert_same(got, base)


def test_sequence_parallel_pads_rows_to_a_multiple_of_tp():
    from aapo_megatron.models.activation_memory import sequence_multiple
    from aapo_megatron.trainer.train_step import micro_batcher

    assert sequence_multiple(3, False) == 8 and sequence_multiple(2, True) == 8 and sequence_multiple(16, True) == 16
    multiple = sequence_multiple(3, True)
    assert multiple == 24
    for pack in (True, False):
        micro = micro_batcher(_batch(), 96, pack=pack, seq_multiple=multiple)(range(6))
        assert {m.tokens.shape[1] % 24 for m in micro} == {0}, pack


@pytest.mark.parametrize("overrides, key", [
    (["trainer.recompute=selective", "trainer.recompute_modules=[layernorm]"], "trainer.recompute_modules"),
    (["trainer.recompute=selective", "trainer.recompute_modules=[]"], "trainer.recompute_modules"),
    (["trainer.recompute=full", "trainer.recompute_num_layers=3"], "trainer.recompute_num_layers"),
    (["trainer.recompute=full", "trainer.recompute_num_layers=2", "parallel.pipeline_model_parallel_size=2"],
     "trainer.recompute_num_layers"),
    (["trainer.recompute=full", "trainer.recompute_num_layers=0"], "trainer.recompute_num_layers"),
])
def test_recompute_config_errors_name_the_key(overrides, key):
    from aapo_megatron.config import ConfigError
    from aapo_megatron.validation import load_config

    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["model.scratch.num_layers=2", *overrides])
