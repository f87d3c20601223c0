"""The supervised mode: a warm start before RL (trainer.sft_steps), or the whole run (SFT only).

Every rank builds the same batches of (prompt, target) pairs, the target being `trainer.sft_target` with the
prompt's answer filled in, and trains them with the token-mean cross-entropy (`sft_ce`) under its own optimizer
(constant `trainer.sft_lr`, fresh Adam state; RL builds a new one).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from aapo_megatron.config import Config
from aapo_megatron.data.dataset import PromptDataset
from aapo_megatron.data.sampler import ResumableSampler
from aapo_megatron.errors import EXIT_OK, EXIT_STOPPED
from aapo_megatron.trainer.batch import RolloutBatch
from aapo_megatron.trainer.rank_zero import broadcast_object
from aapo_megatron.trainer.signals import StopRequest
from aapo_megatron.trainer.updates import guard, update_metrics

log = logging.getLogger("aapo_megatron.trainer")


def sft_only(cfg: Config) -> bool:
    """Whether the run is supervised only (no RL after the SFT steps)."""
    return cfg.trainer.mode == "sft"


def wants_sft(cfg: Config) -> bool:
    """Whether the run starts with SFT steps (a warm start, or an SFT-only run)."""
    return cfg.trainer.sft_steps > 0 or sft_only(cfg)


def sft_batch(cfg: Config, tokenizer: Any, sampler: ResumableSampler, prompts: PromptDataset) -> RolloutBatch:
    """The sampler's next `trainer.sft_batch_size` (prompt, target + EOS) pairs; every advantage is 1."""
    eos = tokenizer.eos_token_id
    chosen = [prompts[i] for i in sampler.next_batch(cfg.trainer.sft_batch_size)]
    target = cfg.trainer.sft_target
    answers = [tokenizer.encode(target.replace("{answer}", p.answer), add_special_tokens=False) + [eos]
               for p in chosen]
    return RolloutBatch(prompt_ids=[list(p.input_ids) for p in chosen], completion_ids=answers,
                        advantages=torch.ones(len(chosen)))


def build_sft_optimizer(job: Any) -> None:
    """The SFT optimizer on `job` (a TrainingJob): constant trainer.sft_lr over trainer.sft_steps, fresh Adam."""
    job._build_optimizer(lr=job.cfg.trainer.sft_lr, total_updates=job.cfg.trainer.sft_steps, constant=True)


def run_sft(job: Any, stop: StopRequest) -> int:
    """Collective: SFT steps from `job.state.sft_step` on; a stop signal saves a checkpoint (RL step 0: an SFT
    checkpoint) and returns EXIT_STOPPED, else EXIT_OK."""
    cfg = job.cfg
    steps = cfg.trainer.sft_steps
    prompts = PromptDataset.from_config(cfg.data, job.tokenizer, "train")
    sampler = ResumableSampler(len(prompts), seed=cfg.data.seed + 1, shuffle=cfg.data.shuffle)
    start = job.state.sft_step
    if start > 0:  # resumed from an SFT checkpoint: the resume built and loaded the SFT optimizer
        sampler.load_state_dict(job.state.sft_sampler)
    else:
        build_sft_optimizer(job)
    log.info("SFT warm start: %d steps of %d pairs, lr %g%s", steps, cfg.trainer.sft_batch_size,
             cfg.trainer.sft_lr, f", resumed after step {start}" if start else "")
    t0 = time.perf_counter()
    for step in range(start + 1, steps + 1):
        results = job._updates(sft_batch(cfg, job.tokenizer, sampler, prompts), 1, "sft_ce")
        guard(job.state, results, cfg.trainer.max_bad_steps)
        m = update_metrics(results)
        job.state.sft_step, job.state.sft_sampler = step, sampler.state_dict()
        if job.metrics is not None:
            job.metrics.log(-steps + step, {"phase": "sft", "sft/loss": m["loss"], "grad_norm": m["grad_norm"],
                                            "bad_steps": float(job.state.total_bad)})
        if step % max(1, steps // 10) == 0 or step == steps:
            log.info("sft %d/%d  loss %.4f  (%.1fs)", step, steps, m["loss"], time.perf_counter() - t0)
        if broadcast_object(stop.requested, job.group) or stop.requested:
            job.save_checkpoint()
            log.warning("stop signal received during the SFT warm start: checkpoint at SFT step %d/%d saved, "
                        "exiting (code %d)", step, steps, EXIT_STOPPED)
            return EXIT_STOPPED
    job.state.sft_step = steps
    return EXIT_OK
