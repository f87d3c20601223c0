"""The Megatron train step: global token-mean loss and identical updates for any TP / PP / DP / micro-batching.

Every layout trains the same tiny Llama (same seed, same samples) with the real fused log-prob op and the
aapo_ce loss through Megatron's forward-backward schedule and DDP; losses, gradient norms, every parameter's
gradient (gathered to full HF-named tensors) and the updated weights must agree with a single-process,
single-micro-batch run, whose loss is checked against a pure-torch computation of -sum(A * log p * m) / sum(m).
That baseline run first gets a poisoned update (an infinite advantage): it must be skipped and leave no trace.
"""

import math

import pytest
import torch

from tests.distributed import run_ranks


def _batch():
    from aapo_megatron.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(4, 60, (n,), generator=g)] for n in (3, 5, 2, 4, 6, 3)]
    completions = [[int(t) for t in torch.randint(4, 60, (n,), generator=g)] for n in (4, 2, 5, 3, 1, 6)]
    return RolloutBatch(prompts, completions, torch.randn(6, generator=g))


def _poisoned_batch():
    batch = _batch()
    batch.advantages[0] = float("inf")  # -A * log p = inf: a non-finite loss and gradient
    return batch


def _gathered_grads(model, mapping) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the last update (Megatron DDP's fp32 main_grad, after the DP all-reduce),
    gathered over TP/PP into full HF-named tensors, by swapping each parameter's data for it during the gather."""
    from aapo_megatron.models.weights import gather_hf_state_dict

    params = list(model.parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad
        return gather_hf_state_dict(model, mapping)
    finally:
        for p, data in zip(params, saved):
            p.data = data


def _train(rank, world, tp, pp, token_budget, loss_name, updates, pack=False, fused_adam=True, poison=False):
    from megatron.core import parallel_state as ps

    from aapo_megatron.config import OptimConfig
    from aapo_megatron.validation import load_config
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.models.weights import gather_hf_state_dict, model_naming
    from aapo_megatron.trainer.batch import shard_indices
    from aapo_megatron.trainer.losses import build_loss_fn
    from aapo_megatron.trainer.optim import build_optimizer, build_scheduler, wrap_ddp
    from aapo_megatron.trainer.train_step import micro_batcher, run_update

    cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                             "model.scratch.vocab_size=64", "model.scratch.num_layers=2"])
    init_distributed(cfg)
    seed_everything(0)
    spec = ArchSpec.from_scratch(cfg.model.scratch)
    model = build_policy(spec, dtype="float32")
    mapping = WeightMapping(spec, naming=model_naming(model))
    # Same starting weights in every layout: load the TP=1 init that rank 0 of a 1-process run would make.
    torch.manual_seed(123)
    init = {n: torch.randn(mapping.hf_shape(n)) * 0.05 for n in mapping.hf_names()}
    from aapo_megatron.models.weights import load_hf_weights

    load_hf_weights(model, mapping, init)
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    optim = OptimConfig(lr=1e-2, clip_grad=0.5)
    opt = build_optimizer(chunks, optim, bf16=False, use_distributed_optimizer=False)
    sched = build_scheduler(opt, optim, 10)
    from aapo_megatron.trainer.optim import torch_optimizers

    groups = [g for o in torch_optimizers(opt) for g in o.param_groups]
    if not fused_adam:  # torch's default single-tensor Adam, the reference for the fused CPU kernel
        for g in groups:
            g["fused"] = None
    batch = _batch()
    idx = shard_indices(len(batch), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    micro = micro_batcher(batch, token_budget, pack=pack)(idx)
    poisoned = None
    if poison:  # one update on a poisoned copy of the batch first: the guard must skip it
        s = run_update(chunks, opt, sched, micro_batcher(_poisoned_batch(), token_budget, pack=pack)(idx),
                       build_loss_fn(loss_name, cfg.algorithm), optim.clip_grad)
        after = gather_hf_state_dict(model, mapping)
        poisoned = {"loss": s.loss, "grad_norm": s.update.grad_norm, "applied": s.update.applied,
                    "weights_unchanged": all(torch.equal(after[n], init[n]) for n in after),
                    "lr_steps": sched.num_steps}
    stats, grads = [], []
    for u in range(updates):
        loss_fn = build_loss_fn(loss_name, cfg.algorithm)
        s = run_update(chunks, opt, sched, micro, loss_fn, optim.clip_grad)
        stats.append((s.loss, s.update.grad_norm, s.num_tokens, s.update.applied, s.metrics.get("entropy")))
        grads.append(_gathered_grads(model, mapping))
    weights = gather_hf_state_dict(model, mapping)
    return {"stats": stats, "weights": weights if rank == 0 else None, "grads": grads if rank == 0 else None,
            "micro": len(micro), "poisoned": poisoned, "fused": [g["fused"] for g in groups],
            "samples_per_row": max(int(m.segment_ids.max()) if m.segment_ids is not None else 1 for m in micro)}


def assert_grads_close(got: torch.Tensor, want: torch.Tensor, rtol: float, big: float, floor: float, msg: str) -> None:
    """Relative agreement (rtol) of every element with |want| > big x max|want|; the rest within floor x max|want|."""
    scale = want.abs().max().item()
    large = want.abs() > big * scale
    err = (got - want).abs()
    worst = (err[large] / want[large].abs()).max().item() if large.any() else 0.0
    assert worst <= rtol, f"{msg}: relative gradient error {worst:.3g} > {rtol} (max |grad| {scale:.3g})"
    small = err[~large].max().item() if (~large).any() else 0.0
    assert small <= floor * scale, f"{msg}: gradient error {small:.3g} > {floor} x {scale:.3g} on the small entries"


def _assert_same_grads(got_run, want_run):
    # Summation order differs between layouts; the second update's gradient is taken at weights that Adam moved by
    # an amount following the gradient's rounding where |grad| ~ its eps. Measured: relative error <= 1.1e-4 on
    # entries above 1% of a tensor's largest, absolute <= 4.2e-6 of the largest elsewhere. A layout bug (a missing
    # or doubled reduction, a wrong token count) is off by O(1) relative.
    for u, (got, want) in enumerate(zip(got_run["grads"], want_run["grads"])):
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert_grads_close(got[name], g, rtol=1e-3, big=1e-2, floor=1e-5, msg=f"update {u}, {name}")


def _reference_loss():
    """-sum(A * log p * m) / sum(m) for the initial weights, with HF transformers + log_softmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aapo_megatron.validation import load_config
    from aapo_megatron.models.arch import ArchSpec, to_hf_config
    from aapo_megatron.models.mapping import WeightMapping

    cfg = load_config(None, ["model.scratch.vocab_size=64", "model.scratch.num_layers=2"])
    spec = ArchSpec.from_scratch(cfg.model.scratch)
    mapping = WeightMapping(spec)
    torch.manual_seed(123)
    init = {n: torch.randn(mapping.hf_shape(n)) * 0.05 for n in mapping.hf_names()}
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in to_hf_config(spec).items() if k != "architectures"}))
    hf.load_state_dict(init, strict=False)
    if spec.tie_word_embeddings:
        hf.tie_weights()
    batch = _batch()
    num, den = 0.0, 0
    for p, c, a in zip(batch.prompt_ids, batch.completion_ids, batch.advantages):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)  # [S, V]
        tok = logp[len(p) - 1 : len(p) - 1 + len(c)].gather(-1, torch.tensor(c)[:, None])[:, 0]
        num += float(-(a * tok).sum().detach())
        den += len(c)
    return num / den


@pytest.fixture(scope="module")
def baseline():
    return run_ranks(_train, 1, args=(1, 1, 4096, "aapo_ce", 2, False, True, True), env={"OMP_NUM_THREADS": "1"})[0]


def test_non_finite_update_is_skipped_and_leaves_no_trace(baseline):
    """The baseline's first update had an infinite advantage: not applied, weights and LR schedule untouched. Every
    other run here has no poisoned update and must still match the baseline's later updates, so the skipped one
    left nothing behind in the weights, Adam's moments or its step count either."""
    p = baseline["poisoned"]
    assert not p["applied"] and not math.isfinite(p["grad_norm"]) and not math.isfinite(p["loss"])
    assert p["weights_unchanged"] and p["lr_steps"] == 0


def test_single_process_loss_matches_pure_torch(baseline):
    loss0 = baseline["stats"][0][0]
    assert loss0 == pytest.approx(_reference_loss(), abs=1e-5)
    assert baseline["stats"][0][2] == sum(len(c) for c in _batch().completion_ids) == 21
    assert all(s[3] for s in baseline["stats"])  # updates applied
    assert baseline["stats"][1][0] != loss0  # the first update changed the model


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, tp, pp, budget",
    [
        (1, 1, 1, 16),  # many micro-batches: the token-mean must not change
        (2, 1, 1, 32),  # DP=2
        (2, 2, 1, 4096),  # TP=2
        (2, 1, 2, 32),  # PP=2 with several micro-batches
    ],
)
def test_layouts_agree(baseline, world, tp, pp, budget):
    out = run_ranks(_train, world, args=(tp, pp, budget, "aapo_ce", 2), env={"OMP_NUM_THREADS": "1"})
    if budget < 4096:
        assert max(o["micro"] for o in out) > 1
    for got, want in zip(out[0]["stats"], baseline["stats"]):
        assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)  # loss
        assert got[1] == pytest.approx(want[1], rel=1e-4)  # grad norm (pre-clip)
        assert got[2] == want[2]  # token count of the step
    # Every parameter's gradient, both updates (the second is taken at the weights the first update made). Adam's
    # first step is lr x sign(grad), so the weights below cannot see a gradient that is wrong only in size.
    _assert_same_grads(out[0], baseline)
    # Adam divides by sqrt(v) + 1e-8, so an element whose gradient is near 1e-8 moves by an amount that follows
    # the gradient's rounding, and TP sums the gradient in another order: on an Intel Xeon (AMX) one v_proj
    # element of 8192 differed by 2.1e-5 after two updates. atol is 1% of lr (1e-2); a layout bug moves
    # weights by about lr.
    for name, w in baseline["weights"].items():
        torch.testing.assert_close(out[0]["weights"][name], w, rtol=1e-4, atol=1e-4, msg=name)


def _assert_same_updates(got_run, want_run):
    for got, want in zip(got_run["stats"], want_run["stats"]):
        assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)  # loss
        assert got[1] == pytest.approx(want[1], rel=1e-4)  # grad norm (pre-clip)
        assert got[2] == want[2]  # token count of the step
        assert got[4] == pytest.approx(want[4], rel=1e-5)  # entropy
    _assert_same_grads(got_run, want_run)
    for name, w in want_run["weights"].items():
        torch.testing.assert_close(got_run["weights"][name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_cpu_adam_matches_torch_default_adam(baseline):
    assert baseline["fused"] and all(baseline["fused"])
    out = run_ranks(_train, 1, args=(1, 1, 4096, "aapo_ce", 2, False, False), env={"OMP_NUM_THREADS": "1"})[0]
    assert not any(out["fused"])
    assert out["stats"][1][0] != pytest.approx(out["stats"][0][0], rel=1e-3)  # the first update moved the loss
    _assert_same_updates(out, baseline)


@pytest.mark.parametrize("budget", [16, 4096])
def test_packed_rows_match_padded_rows(baseline, budget):
    """Several samples per row (attention kept within each sample): same losses, gradients and updates."""
    out = run_ranks(_train, 1, args=(1, 1, budget, "aapo_ce", 2, True), env={"OMP_NUM_THREADS": "1"})[0]
    assert out["samples_per_row"] >= 2
    assert (out["micro"] > 1) == (budget == 16)
    _assert_same_updates(out, baseline)


@pytest.mark.slow
def test_packed_rows_pipeline_parallel(baseline):
    out = run_ranks(_train, 2, args=(1, 2, 16, "aapo_ce", 2, True), env={"OMP_NUM_THREADS": "1"})
    assert out[0]["micro"] > 1 and out[0]["samples_per_row"] >= 2
    _assert_same_updates(out[0], baseline)


def test_grpo_clip_on_policy_and_sft(baseline):
    out = run_ranks(_train, 1, args=(1, 1, 4096, "grpo_clip", 1), env={"OMP_NUM_THREADS": "1"})[0]
    # On-policy (ratio 1) with symmetric clipping: the clipped-ratio loss equals -A token-mean at ratio 1,
    # and its gradient equals aapo_ce's, so the update is identical.
    assert out["stats"][0][0] == pytest.approx(-float((_batch().advantages * torch.tensor(
        [len(c) for c in _batch().completion_ids])).sum()) / 21, rel=1e-5)
    assert out["stats"][0][1] == pytest.approx(baseline["stats"][0][1], rel=1e-5)  # same gradient as aapo_ce
    sft = run_ranks(_train, 1, args=(1, 1, 4096, "sft_ce", 1), env={"OMP_NUM_THREADS": "1"})[0]
    assert sft["stats"][0][0] > 0  # -mean log p of random-init model is positive (about log V)
    assert sft["stats"][0][0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.2)
