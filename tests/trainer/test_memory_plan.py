"""The memory plan (`aapo-train --plan`) against what a real Megatron train step holds.

The activation estimate is checked against the peak of the tensors autograd keeps for backward, measured with
saved-tensor hooks (tests/trainer/memory_meter.py) over a real `run_update` (Megatron's forward-backward
schedule, our fused log-prob loss), on every rank of TP=1, TP=2 (TP=3 for SmolLM2, whose 9 heads TP=2 cannot
split) and PP=2 jobs with several micro-batches, so the 1F1B in-flight count is exercised, and the quickstart
with sequence parallel and with full and selective recompute. The parameter
count is checked against the real model's own on every rank. SmolLM2-135M-Instruct is its real architecture
(configs/arch/smollm2-135m-instruct.json) built as a scratch model with random weights: what a step keeps does not depend on the weights' values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart_cpu.yaml")
SMOLLM2 = os.path.join(REPO, "configs", "arch", "smollm2-135m-instruct.json")
TOLERANCE = 0.25  # the bar for the activation model

# (model, seq_len, micro_batch_tokens, sequences): sequences / (micro_batch_tokens / seq_len) micro-batches.
CASES = {"quickstart": (128, 1024, 24), "smollm2": (128, 512, 12)}


def _config(model: str, tp: int, pp: int, extra: tuple = ()):
    from aapo_megatron.validation import load_config

    seq_len, mbt, _ = CASES[model]
    overrides = [*extra, f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                 f"trainer.micro_batch_tokens={mbt}", "trainer.pack_factor=1", "model.dtype=float32",
                 f"data.max_prompt_tokens={seq_len // 2}", f"rollout.max_new_tokens={seq_len // 2}"]
    if model == "smollm2":  # its real architecture as the scratch model (random weights)
        with open(SMOLLM2) as fh:
            hf = json.load(fh)
        overrides += [f"model.scratch.{ours}={hf[theirs]}" for ours, theirs in (
            ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"), ("ffn_hidden_size", "intermediate_size"),
            ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_key_value_heads"),
            ("vocab_size", "vocab_size"), ("max_position_embeddings", "max_position_embeddings"),
            ("rope_theta", "rope_theta"), ("tie_word_embeddings", "tie_word_embeddings"))]
    return load_config(QUICKSTART, overrides)


def _measure(model: str, tp: int, pp: int, extra: tuple = ()) -> dict:
    """One rank: the plan's figures for its stage and what a real update kept."""
    from megatron.core import parallel_state as ps

    from aapo_megatron.config import OptimConfig
    from aapo_megatron.models.activation_memory import model_config_overrides, sequence_multiple
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.trainer.batch import RolloutBatch
    from aapo_megatron.trainer.losses import build_loss_fn
    from aapo_megatron.trainer.memory_plan import activation_bytes, arch_for_plan, stage_layers, stage_parameters
    from aapo_megatron.trainer.optim import build_optimizer, build_scheduler, wrap_ddp
    from aapo_megatron.trainer.train_step import micro_batcher, run_update
    from tests.trainer.memory_meter import ActivationMeter

    cfg = _config(model, tp, pp, extra)
    init_distributed(cfg)
    seed_everything(0)
    spec = arch_for_plan(cfg)
    policy = build_policy(spec, dtype="float32", config_overrides=model_config_overrides(cfg.parallel, cfg.trainer))
    chunks = wrap_ddp([policy], use_distributed_optimizer=False)
    opt = build_optimizer(chunks, OptimConfig(lr=1e-4), bf16=False, use_distributed_optimizer=False)
    sched = build_scheduler(opt, OptimConfig(lr=1e-4), 10)
    seq_len, mbt, n = CASES[model]
    g = torch.Generator().manual_seed(0)
    ids = lambda k: [int(t) for t in torch.randint(4, spec.vocab_size - 1, (k,), generator=g)]  # noqa: E731
    batch = RolloutBatch([ids(seq_len // 2) for _ in range(n)], [ids(seq_len // 2) for _ in range(n)],
                         torch.randn(n, generator=g))
    micro = micro_batcher(batch, mbt, pack=True, pack_factor=1,
                          seq_multiple=sequence_multiple(tp, cfg.parallel.sequence_parallel))(range(n))
    meter = ActivationMeter(policy.parameters())
    with meter.measure():
        run_update(chunks, opt, sched, micro, build_loss_fn("aapo_ce", cfg.algorithm), 1.0)
    stage = ps.get_pipeline_model_parallel_rank()
    in_flight = min(pp - stage, len(micro))
    acts, logits = activation_bytes(cfg, spec, stage, stage_layers(spec.num_layers, pp)[stage], in_flight, 4, te=False)
    return {"measured": meter.peak, "planned": acts + logits, "micro": len(micro), "stage": stage,
            "params": sum(p.numel() for p in policy.parameters()), "planned_params": stage_parameters(spec, tp, pp, stage),
            "tokens": [tuple(m.tokens.shape) for m in micro]}


def _job(rank: int, world: int, cases: list) -> list:
    return [(name, tp, pp, _measure(model, tp, pp, extra)) for name, model, tp, pp, extra in cases]


@pytest.fixture(scope="module")
def measured() -> list:
    full = ("trainer.recompute=full", "trainer.recompute_num_layers=1")
    jobs = {1: [("quickstart", "quickstart", 1, 1, ()), ("smollm2", "smollm2", 1, 1, ()),
                ("quickstart recompute=full", "quickstart", 1, 1, full),
                ("quickstart recompute=selective mlp", "quickstart", 1, 1,
                 ("trainer.recompute=selective", "trainer.recompute_modules=[core_attn, mlp]"))],
            2: [("quickstart", "quickstart", 2, 1, ()), ("quickstart", "quickstart", 1, 2, ()),
                ("smollm2", "smollm2", 1, 2, ()),
                ("quickstart SP", "quickstart", 2, 1, ("parallel.sequence_parallel=true",)),
                ("quickstart SP recompute=full", "quickstart", 2, 1, ("parallel.sequence_parallel=true", *full))],
            3: [("smollm2", "smollm2", 3, 1, ())]}
    out = []
    for world, cases in jobs.items():
        for rank, results in enumerate(run_ranks(_job, world_size=world, args=(cases,), env={"OMP_NUM_THREADS": "1"},
                                                 timeout_s=600)):
            out += [(model, tp, pp, rank, r) for model, tp, pp, r in results]
    return out


def test_activation_estimate_within_25_percent_of_the_measured_peak(measured):
    seen = set()
    for model, tp, pp, rank, r in measured:
        seen.add((model, tp, pp))
        assert r["micro"] >= 3, r["tokens"]  # several micro-batches: the PP schedule keeps 2 in flight on stage 0
        ratio = r["planned"] / r["measured"]
        assert abs(ratio - 1) <= TOLERANCE, f"{model} TP={tp} PP={pp} rank {rank}: planned {r['planned']} B, " \
                                            f"measured {r['measured']} B (ratio {ratio:.3f})"
    assert len(seen) == 10


def test_parameter_count_matches_the_built_model_on_every_rank(measured):
    for model, tp, pp, rank, r in measured:
        assert r["planned_params"] == r["params"], (model, tp, pp, rank)


def _aapo_train(*args: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "aapo-train")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=180, cwd=REPO)


def test_plan_prints_the_table_and_refuses_what_does_not_fit(tmp_path):
    ok = _aapo_train("--config", QUICKSTART, "--plan")
    assert ok.returncode == 0, ok.stderr
    assert "activations" in ok.stdout and "fits" in ok.stdout
    tight = _aapo_train("--config", QUICKSTART, "--plan", "--set", "plan.device_memory_gb=0.05")
    assert tight.returncode == 2
    assert "DOES NOT FIT" in tight.stdout


def test_a_run_whose_plan_does_not_fit_refuses_to_start(tmp_path):
    proc = _aapo_train("--config", QUICKSTART, "--set", "plan.device_memory_gb=0.05", "--set",
                       f"trainer.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert "the memory plan does not fit" in proc.stderr
    assert "largest: activations 0.1 GiB" in proc.stderr  # the largest items are named
    assert not (tmp_path / "run").exists()  # refused before anything started


@pytest.mark.parametrize("config, arch, world", [
    ("deepseek_r1_distill_qwen_1.5b.yaml", "deepseek-r1-distill-qwen-1.5b.json", 8),
    ("qwen2.5_math_7b.yaml", "qwen2.5-math-7b.json", 8),
    ("llama3_70b.yaml", "llama-3.1-70b-instruct.json", 32),
])
def test_shipped_gpu_configs_fit_80_gb_by_their_own_plan(config, arch, world):
    proc = _aapo_train("--config", os.path.join(REPO, "configs", config), "--plan", "--world-size", str(world),
                       "--set", "plan.platform=gpu", "--set", f"plan.hf_config={os.path.join(REPO, 'configs', 'arch', arch)}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fits" in proc.stdout


COLOCATED_70B = ["rollout.placement=colocated", "rollout.tensor_parallel_size=8", "rollout.memory_fraction=0.23"]
"""The colocated 70B variant's overrides (docs/cluster.md, slurm/aapo_70b.sh): rollout TP=8 on rank 0's node."""


def test_colocated_70b_variant_fits_with_rollout_tp8_and_tp1_is_refused_naming_the_key():
    from aapo_megatron.config import ConfigError, load_config
    from aapo_megatron.rollout.layout import gpu_groups
    from aapo_megatron.trainer.memory_plan import check_plan

    config = os.path.join(REPO, "configs", "llama3_70b.yaml")
    plan_for_gpu = ["plan.platform=gpu", f"plan.hf_config={os.path.join(REPO, 'configs', 'arch', 'llama-3.1-70b-instruct.json')}"]
    cfg = load_config(config, plan_for_gpu + COLOCATED_70B)  # validation: TP=8 divides the 64 heads and 8 KV heads
    assert gpu_groups([str(g) for g in range(8)], 8, 1) == ["0,1,2,3,4,5,6,7"]  # rank 0's node holds the engines
    plan = check_plan(cfg, world_size=32)  # what aapo-train runs before any work (exit 2 if it raises)
    assert plan.fits and plan.problem is None
    device0 = plan.stages[0]
    assert device0.phase == "generation" and device0.other_phase_total < device0.total
    engines = {i.name: i.bytes for i in device0.items}["vLLM engines x2 (colocated)"]
    assert engines == int(2 * 0.23 * plan.capacity)  # policy + reference awake together, asleep while training
    with pytest.raises(ConfigError, match=r"'rollout.tensor_parallel_size' = 1: each colocated vLLM engine holds "
                                          r"[\d.]+ GiB of weights per device .* raise rollout.tensor_parallel_size"):
        check_plan(load_config(config, plan_for_gpu + ["rollout.placement=colocated"]), world_size=32)
    with pytest.raises(ConfigError, match=r"'rollout.tensor_parallel_size' = 4"):  # 4 is not enough either
        check_plan(load_config(config, plan_for_gpu + COLOCATED_70B + ["rollout.tensor_parallel_size=4"]), world_size=32)
