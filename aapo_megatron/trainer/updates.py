"""The train phase: a step's optimizer updates over its batch, the guard against non-finite steps, and the
step's update metrics."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from aapo_megatron.config import Config
from aapo_megatron.models.activation_memory import sequence_multiple
from aapo_megatron.distributed import ParallelLayout
from aapo_megatron.trainer.batch import RolloutBatch, shard_indices
from aapo_megatron.trainer.errors import TrainingError
from aapo_megatron.trainer.losses import build_loss_fn, update_loss_settings
from aapo_megatron.trainer.train_step import StepStats, micro_batcher, run_update

log = logging.getLogger("aapo_megatron.trainer")


def run_updates(batch: RolloutBatch, num_updates: int, loss_name: str, cfg: Config, layout: ParallelLayout,
                chunks: list, optimizer: Any, scheduler: Any, reference: Optional[Any] = None) -> list[StepStats]:
    """`num_updates` optimizer updates over consecutive mini-batches of `batch` (this DP rank's share); the
    frozen `reference` model, if any, fills the reference log-probs first (k3 KL, kl/reference)."""
    tcfg = cfg.trainer
    micro_batches = micro_batcher(batch, tcfg.micro_batch_tokens, tcfg.pack_sequences, tcfg.pack_factor,
                                  sequence_multiple(layout.tp_size, cfg.parallel.sequence_parallel))
    per_update = len(batch) // num_updates
    results = []
    for u in range(num_updates):
        mini = range(u * per_update, (u + 1) * per_update)
        mine = shard_indices(len(mini), layout.dp_rank, layout.dp_size)
        micro = micro_batches(range(mini.start + mine.start, mini.start + mine.stop))
        temperature, weights = update_loss_settings(cfg, batch, mini, loss_name)
        if reference is not None:
            reference.fill_ref_logprobs(micro, temperature)
        loss_fn = build_loss_fn(loss_name, cfg.algorithm, track_mismatch=(u == 0), on_policy=(u == 0),
                                temperature=temperature, sample_weights=weights)
        results.append(run_update(chunks, optimizer, scheduler, micro, loss_fn, cfg.optim.clip_grad))
    return results


def guard(state: Any, results: list[StepStats], max_bad_steps: int) -> bool:
    """Count non-finite steps in `state` (a LoopState); raise after `max_bad_steps` in a row. True if clean."""
    bad = any(not r.update.applied or not math.isfinite(r.loss) for r in results)
    if not bad:
        state.consecutive_bad = 0
        return True
    state.consecutive_bad += 1
    state.total_bad += 1
    log.warning("non-finite loss or gradient: update skipped (%d in a row)", state.consecutive_bad)
    if state.consecutive_bad >= max_bad_steps:
        raise TrainingError(f"{state.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                            f"(trainer.max_bad_steps={max_bad_steps}); stopping. Lower optim.lr or check the data.")
    return False


def update_metrics(results: list[StepStats]) -> dict[str, float]:
    """loss (mean over updates), grad_norm (max), lr (last), train/tokens, and the loss function's metrics."""
    out = {"loss": sum(r.loss for r in results) / len(results),
           "grad_norm": max(r.update.grad_norm for r in results),
           "lr": results[-1].update.lr,
           "train/tokens": float(sum(r.num_tokens for r in results))}
    for key in results[0].metrics:
        vals = [r.metrics[key] for r in results if key in r.metrics and math.isfinite(r.metrics[key])]
        if vals:
            out[key] = max(vals) if key.endswith("_max") else sum(vals) / len(vals)
    return out
