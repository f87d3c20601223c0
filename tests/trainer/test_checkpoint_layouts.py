"""Trainer checkpoints load at another TP/PP and continue: save after step 1 at TP1 (resp. PP2), resume at TP2
(resp. PP1) through the trainer's own path (TrainingJob._resume: state.py's dist checkpoint of policy + Adam, LR
schedule, sampler, RNG), and step 2's loss, per-parameter gradients and Adam update equal a straight TP1 run's."""

import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.trainer.test_e2e import CONFIG, TINY

LR = 1e-3


def _cfg(run_dir, ckpt_dir, tp, pp, *extra):
    from aapo_megatron.validation import load_config

    return load_config(CONFIG, TINY + [
        f"trainer.run_dir={run_dir}", f"checkpoint.dir={ckpt_dir}", "trainer.sft_steps=0", "trainer.steps=2",
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        "model.scratch.hidden_size=32", "model.scratch.ffn_hidden_size=64", "model.scratch.num_layers=2",
        "model.scratch.num_attention_heads=4", "model.scratch.num_key_value_heads=2", f"optim.lr={LR}",
        "optim.clip_grad=0", "optim.lr_schedule=cosine", "optim.min_lr=1e-4", *extra])


def _batch(indices):
    """A deterministic rollout batch from the sampler's prompt indices (both steps' batches differ)."""
    from aapo_megatron.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(sum(indices) + 7)
    prompts = [[int(t) for t in torch.randint(4, 60, (3 + i % 3,), generator=g)] for i in indices]
    completions = [[int(t) for t in torch.randint(4, 60, (2 + i % 4,), generator=g)] for i in indices]
    return RolloutBatch(prompts, completions, torch.randn(len(indices), generator=g))


def _job(cfg, resume):
    from aapo_megatron.data.sampler import ResumableSampler
    from aapo_megatron.trainer.loop import TrainingJob

    job = TrainingJob(cfg)
    job.tokenizer = job._tokenizer()
    job._build_models()
    job._build_optimizer(total_updates=2)
    step = job._resume() if resume else None
    job.sampler, job.reference_cache = ResumableSampler(64, seed=3), None
    if job.is_rank0 and job.state.sampler:
        job.sampler.load_state_dict(job.state.sampler)
    return job, step


def _step(job):
    """One trainer update on the sampler's next batch; rank 0's record of loss, grad norm, grads, weights, RNG."""
    from aapo_megatron.models.weights import gather_hf_state_dict
    from aapo_megatron.trainer.loop import _broadcast_object

    idx = _broadcast_object(job.sampler.next_batch(4) if job.is_rank0 else None)
    result = job._updates(_batch(idx), 1, "aapo_ce")[0]
    params = [p for p in job.model.parameters()]
    data = [p.data for p in params]
    for p in params:  # reuse the weight gather for gradients
        p.data = p.main_grad
    grads = gather_hf_state_dict(job.model, job.mapping)
    for p, d in zip(params, data):
        p.data = d
    weights = gather_hf_state_dict(job.model, job.mapping)
    job.state.step += 1
    return {"idx": idx, "loss": result.loss, "grad_norm": result.update.grad_norm, "lr": result.update.lr,
            "grads": grads, "weights": weights}


def _straight(rank, world, root):
    """TP1: steps 1 and 2, a checkpoint after step 1; also the initial weights as an HF dir (model.path of PP2)."""
    cfg = _cfg(os.path.join(root, "run"), os.path.join(root, "ckpt_tp1"), 1, 1)
    job, _ = _job(cfg, resume=False)
    job.export_hf(os.path.join(root, "init"))
    out = {"step1": _step(job)}
    job.save_checkpoint()
    out["rand"] = torch.rand(4)  # what the RNG gives right after the checkpoint
    out["step2"] = _step(job)
    job.close()
    return out


def _init_args(root):
    return [f"model.path={os.path.join(root, 'init')}", f"model.tokenizer={os.path.join(root, 'init')}"]


def _fresh_pp2(rank, world, root):
    """PP2 from the straight run's start: step 1, then a checkpoint."""
    job, _ = _job(_cfg(os.path.join(root, "run"), os.path.join(root, "ckpt_pp2"), 1, 2, *_init_args(root)), False)
    out = _step(job)
    job.save_checkpoint()
    out["rand"] = torch.rand(4)
    job.close()
    return out


def _resumed(rank, world, root, tp, pp, ckpt):
    """Resume `ckpt` at TP=tp, PP=pp (one job per process: Megatron's globals do not survive a second) and take
    step 2."""
    cfg = _cfg(os.path.join(root, "run"), os.path.join(root, ckpt), tp, pp, "checkpoint.resume=auto", *_init_args(root))
    job, step = _job(cfg, resume=True)
    out = {"resumed_step": step, "rand": torch.rand(4)}
    out["step2"] = _step(job)
    job.close()
    return out


def _assert_same_step(got, want, tol):
    assert got["idx"] == want["idx"]  # the sampler carried over
    assert abs(got["loss"] - want["loss"]) <= tol * abs(want["loss"]), (got["loss"], want["loss"])
    assert abs(got["grad_norm"] - want["grad_norm"]) <= tol * want["grad_norm"]
    assert got["lr"] == want["lr"]  # the LR schedule carried over (cosine: step 2's lr is not step 1's)
    for name, g in want["grads"].items():
        scale = g.abs().max().item()
        assert (got["grads"][name] - g).abs().max().item() <= tol * scale + 1e-7, name


def _assert_same_update(got, want, before, tol):
    """The Adam update of step 2 (weights after minus before) matches: the moments carried over."""
    for name, w in want["weights"].items():
        delta_want, delta_got = w - before[name], got["weights"][name] - before[name]
        assert (delta_got - delta_want).abs().max().item() <= tol * delta_want.abs().max().item(), name


@pytest.mark.slow
def test_trainer_checkpoint_resumes_at_another_layout(tmp_path):
    root = str(tmp_path)
    env = {"OMP_NUM_THREADS": "1"}
    straight = run_ranks(_straight, 1, args=(root,), env=env, timeout_s=120)[0]
    pp2_step1 = run_ranks(_fresh_pp2, 2, args=(root,), env=env, timeout_s=120)[0]
    tp2 = run_ranks(_resumed, 2, args=(root, 2, 1, "ckpt_tp1"), env=env, timeout_s=120)[0]
    pp1 = run_ranks(_resumed, 1, args=(root, 1, 1, "ckpt_pp2"), env=env, timeout_s=120)[0]
    s1, s2 = straight["step1"], straight["step2"]
    assert s2["lr"] != s1["lr"]
    assert tp2["resumed_step"] == pp1["resumed_step"] == 1
    # TP1 -> TP2: same step 2 (fp32; TP=2 reduces in a different order).
    _assert_same_step(tp2["step2"], s2, 1e-4)
    _assert_same_update(tp2["step2"], s2, s1["weights"], 1e-3)
    # PP2's step 1 is the TP1 step 1 (same start, same batch), and PP2 -> PP1 continues like the straight run.
    _assert_same_step(pp2_step1, s1, 1e-4)
    _assert_same_step(pp1["step2"], s2, 1e-4)
    _assert_same_update(pp1["step2"], s2, s1["weights"], 1e-3)
    # RNG: rank 0's torch generator after the resume continues where the saving run's was.
    assert torch.equal(tp2["rand"], straight["rand"]) and torch.equal(pp1["rand"], pp2_step1["rand"])
