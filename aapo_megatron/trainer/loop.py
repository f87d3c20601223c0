"""The training job: bring-up, optional SFT, the RL loop of named phases, evaluation, checkpoints, shutdown.

One RL step, each phase timed into `time/<phase>`:
  generate    rank 0: prompts -> policy engine (G samples) and reference engine or cache (G samples)
  reward      rank 0: the reward pool scores both
  advantage   rank 0: the advantage estimator -> RolloutBatch, sent to every rank (token ids only)
  train       all: `updates_per_step` Megatron updates (the frozen reference model's log-probs first, if any)
  sync        all: gather the weights; rank 0 pushes them to the policy engine (weight version +1)
  then metrics, eval (every trainer.eval_every) and checkpoint (every checkpoint.save_every).

Rank 0 owns the rollout side (`rollout_side.RolloutSide`; vLLM engines run in their own spawned processes);
every rank owns its TP/PP shard of the policy (`build`), its weights leave through `weights_out`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from aapo_megatron.checkpoint.errors import CheckpointError, CheckpointSaveError
from aapo_megatron.checkpoint.manager import CheckpointManager
from aapo_megatron.config import Config, ConfigError, dump_yaml
from aapo_megatron.errors import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, EXIT_SAVE_FAILED, EXIT_STOPPED, AapoError
from aapo_megatron.distributed import (current_layout, init_distributed, read_dist_env, seed_everything,
                                      teardown_distributed)
from aapo_megatron.trainer.reference import build_run_reference
from aapo_megatron.trainer import build, reference_identity, sft, timeshare, weights_out
from aapo_megatron.trainer.batch import RolloutBatch
from aapo_megatron.trainer.errors import TrainingError  # noqa: F401 - part of this module's public names
from aapo_megatron.trainer.losses import loss_name_for
from aapo_megatron.trainer.metrics import MetricsLogger
from aapo_megatron.trainer.rank_zero import broadcast_object
from aapo_megatron.trainer.report import Progress, phase_timer, print_summary
from aapo_megatron.trainer.rollout_side import RolloutSide
from aapo_megatron.trainer.signals import StopRequest
from aapo_megatron.trainer.updates import guard, run_updates, update_metrics
from aapo_megatron.validation import validate

log = logging.getLogger("aapo_megatron.trainer")

HF_INIT_DIR = "hf_init"


def _broadcast_object(obj):
    """Rank 0's `obj` on every rank of the job's default process group."""
    return broadcast_object(obj, dist.group.WORLD)


@dataclass
class LoopState:
    """Counters that go into every checkpoint."""

    step: int = 0
    """RL steps completed."""
    sft_step: int = 0
    """SFT warm-start steps completed."""
    consecutive_bad: int = 0
    """Steps in a row skipped for a non-finite loss or gradient."""
    total_bad: int = 0
    """Skipped steps over the run."""
    engine_restarts: int = 0
    """Rollout engines restarted after a failure (generation or weight sync)."""
    sampler: dict = field(default_factory=dict)
    """RL prompt sampler state."""
    sft_sampler: dict = field(default_factory=dict)
    """SFT sampler state."""
    reference_cache: Optional[dict] = None
    """Cached reference rollouts (reference_rollouts=cached)."""
    reference_sha256: Optional[str] = None
    """Identity of the frozen reference, `hf_init` (trainer.reference_identity), checked on resume."""


def setup_logging(rank: int) -> None:
    """Our loggers: INFO on rank 0, warnings elsewhere; third-party libraries (Megatron, vLLM) stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("aapo_megatron").setLevel(logging.INFO if rank == 0 else logging.WARNING)


class TrainingJob:
    """Everything one `aapo-train` process holds; rank 0's rollout side holds engines, rewards and data."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        validate(cfg, read_dist_env().world_size)  # ConfigError names the key (incl. the world size), before any group
        self.env = init_distributed(cfg)
        self.rank = self.env.rank
        self.is_rank0 = self.rank == 0
        self.group = dist.group.WORLD  # every rank: the group rank 0's outcomes are broadcast over
        setup_logging(self.rank)
        seed_everything(cfg.trainer.seed)
        self.layout = current_layout()
        self.run_dir = os.path.abspath(cfg.trainer.run_dir)
        self.ckpt_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints"))
        self.hf_init = os.path.join(self.run_dir, HF_INIT_DIR)
        if self.is_rank0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(cfg))
        dist.barrier(self.group)
        self.state = LoopState()
        self.tokenizer = self.spec = self.dtype = self.model = self.mapping = None  # set by bring-up
        self.chunks = self.optimizer = self.scheduler = None  # DDP-wrapped policy, optimizer, LR schedule
        self.reference = None  # trainer.reference.ReferenceModel, every rank, when the run needs one
        self.rollout = RolloutSide(cfg, self.group, self.is_rank0)
        self.sampler = self.reference_cache = None  # rank 0's RL sampler and reference cache, once RL starts
        self.metrics: Optional[MetricsLogger] = None
        self.ckpt = CheckpointManager(self.ckpt_dir, cfg.checkpoint.keep_last, is_writer=self.is_rank0,
                                      barrier=lambda: dist.barrier(self.group))

    # ================================================================== bring-up (trainer/build.py)
    def _tokenizer(self):
        return build.load_tokenizer(self.cfg, self.run_dir, self.group)

    def _build_models(self) -> None:
        self.spec = build.arch_spec(self.cfg, len(self.tokenizer))
        self.dtype, self.model, self.mapping = build.build_model(self.cfg, self.spec)

    def _build_optimizer(self, lr: Optional[float] = None, total_updates: int = 1, constant: bool = False) -> None:
        """(Re)build the DDP wrappers (once), a fresh optimizer and LR schedule (fresh Adam state)."""
        self.chunks, self.optimizer, self.scheduler = build.build_optimizer(
            self.chunks, self.model, self.cfg.optim, self.dtype, total_updates, lr=lr, constant=constant)

    def _rl_total_updates(self) -> int:
        return max(1, self.cfg.trainer.steps * self.cfg.trainer.updates_per_step)

    def _resume(self) -> Optional[int]:
        """Load the checkpoint `checkpoint.resume` selects; return its step or None for a fresh start."""
        info = build.find_checkpoint(self.ckpt, self.cfg.checkpoint.resume, self.group)
        if info is None:
            return None
        log.info("resuming from %s", info.path)
        trainer_state = build.read_trainer_state(info)
        if trainer_state["loop"]["step"] == 0:  # taken during the SFT warm start: it holds the SFT optimizer
            sft.build_sft_optimizer(self)
        build.load_checkpoint(info, trainer_state, self.chunks, self.optimizer, self.scheduler)
        self.state = LoopState(**trainer_state["loop"])
        return info.step

    def _start_components(self, hf_init: str) -> None:
        """Collective: rank 0 starts the engines, reward pool and datasets (a failure there stops every rank)."""
        self.rollout.start(hf_init, self.tokenizer, self.spec.vocab_size, self.state.sampler, self.state.reference_cache)
        self.sampler, self.reference_cache = self.rollout.sampler, self.rollout.reference_cache

    # ================================================================== weights out (trainer/weights_out.py)
    def export_hf(self, out_dir: str) -> None:
        """Collective: write the policy as an HF directory (safetensors + config.json + tokenizer), atomically."""
        weights_out.export_hf(out_dir, self.model, self.mapping, self.spec, self.tokenizer,
                              gathers=self.layout.dp_rank == 0, group=self.group)

    def _push_weights(self) -> None:
        weights_out.sync_to_engine(self.rollout.policy_engine, self.model, self.mapping, self.chunks,
                                   gathers=self.layout.dp_rank == 0, group=self.group)

    def _restarted(self, resync: bool) -> None:
        """After the rollout engines restarted: count it; give the new policy engine the current weights."""
        self.state.engine_restarts += 1
        if resync:
            self._push_weights()

    def sync_policy_engine(self) -> float:
        """Collective: stream the current weights to the policy engine (one restart on failure); returns seconds."""
        t0 = time.perf_counter()
        self.rollout.with_restart(self._push_weights, "weight sync to the policy engine",
                                  lambda: self._restarted(resync=False))
        return time.perf_counter() - t0

    # ================================================================== train phase (trainer/updates.py)
    def _updates(self, batch: RolloutBatch, num_updates: int, loss_name: str) -> list:
        """`num_updates` optimizer updates over consecutive mini-batches of `batch` (this DP rank's share)."""
        return run_updates(batch, num_updates, loss_name, self.cfg, self.layout, self.chunks, self.optimizer,
                           self.scheduler, self.reference)

    # ================================================================== checkpoint phase (trainer/build.py)
    def save_checkpoint(self) -> None:
        """Collective: policy + optimizer (dist checkpoint), trainer state (rank 0), RNG (every rank)."""
        t0 = time.perf_counter()
        if self.is_rank0 and self.sampler is not None:  # None during the SFT warm start
            self.state.sampler = self.sampler.state_dict()
            if self.reference_cache is not None:
                self.rollout.collector.wait_prefetch()  # a prefetch may be adding to the cache
                self.state.reference_cache = self.reference_cache.state_dict()
        trainer_state = {"loop": self.state.__dict__, "scheduler": self.scheduler.state_dict(),
                         "config": self.cfg.to_dict(), "world_size": self.env.world_size} if self.is_rank0 else None
        info = build.save_checkpoint(self.ckpt, self.state.step, self.chunks, self.optimizer, trainer_state)
        log.info("checkpoint step %d -> %s (%.1fs)", self.state.step, info.path, time.perf_counter() - t0)

    # ================================================================== the job
    def run(self) -> int:
        """Set up, (SFT), RL steps, final eval and summary. Returns the exit code."""
        cfg, hf_init = self.cfg, self.hf_init
        with StopRequest() as stop:
            self.tokenizer = self._tokenizer()
            self._build_models()
            resumed_step, rebuilt = None, False
            if cfg.checkpoint.resume is not None:
                rebuilt = reference_identity.rebuild_if_missing(self, hf_init)  # while the weights are initial
                self._build_optimizer(total_updates=self._rl_total_updates())
                resumed_step = self._resume()
            in_sft = resumed_step == 0  # resumed from a checkpoint of the SFT warm start (RL checkpoints are >= 1)
            self.metrics = MetricsLogger(self.run_dir, cfg.logging, is_writer=self.is_rank0, run_config=cfg.to_dict(),
                                         resume_step=self.state.sft_step - cfg.trainer.sft_steps if in_sft else resumed_step)
            if resumed_step is None or in_sft:
                if sft.wants_sft(cfg) and sft.run_sft(self, stop) == EXIT_STOPPED:
                    return EXIT_STOPPED
                self._build_optimizer(total_updates=self._rl_total_updates())
                resumed_step = None  # from here on, as a fresh run
            if sft.sft_only(cfg):
                self.export_hf(os.path.join(self.run_dir, "hf_final"))
                log.info("SFT finished; HF export in %s", os.path.join(self.run_dir, "hf_final"))
                return EXIT_OK
            # The frozen reference (and the policy engine's initial weights) = the starting point of RL.
            if resumed_step is None:
                self.export_hf(hf_init)  # a fresh run always starts from its own weights, never a stale export
            reference_identity.settle(self, hf_init, resumed_step, rebuilt)  # never the resumed policy
            self.reference = build_run_reference(cfg, self.spec, self.model, hf_init)
            self._start_components(hf_init)
            start = self.state.step
            if resumed_step is not None or cfg.rollout.placement == "server":
                # A colocated engine starts from hf_init, a server from whatever it was started with: bring it
                # to the current weights.
                log.info("policy engine synced to step %d (%.1fs)", start, self.sync_policy_engine())
            if start == 0 and cfg.trainer.eval_every > 0:
                self._log_eval(0)
            code = self._rl_loop(start, stop)
            if code == EXIT_OK:
                if cfg.trainer.eval_every > 0 and self.state.step % cfg.trainer.eval_every != 0:
                    self._log_eval(self.state.step)
                self.export_hf(os.path.join(self.run_dir, "hf_final"))
                if self.is_rank0:
                    print_summary(self.run_dir, self.metrics.history, cfg.logging.plots, self.state.step)
            return code

    def _log_eval(self, step: int) -> None:
        m: dict[str, float] = {}
        with phase_timer("eval", m):
            result = self.rollout.evaluate()
        if result is not None:
            log.info("eval @ step %d: %s", step, "  ".join(f"{k}={v:.4f}" for k, v in result.items()))
            self.metrics.log(step, {**result, **m})

    def _rl_step(self, step: int) -> dict[str, float]:
        """One RL step, phase by phase; its metrics (complete on rank 0)."""
        m: dict[str, float] = {}
        with phase_timer("step", m):
            with phase_timer("generate", m):
                rollouts = self.rollout.generate(step, m, lambda: self._restarted(resync=True))
            with phase_timer("reward", m):
                scored = self.rollout.score(rollouts, m)
            with phase_timer("advantage", m):
                batch = self.rollout.advantages(rollouts, scored, m)
            # generate -> sleep -> train (the reference stays awake while it prefetches the next step)
            timeshare.after_generate([self.rollout.policy_engine,
                                      None if self.rollout.prefetch_reference else self.rollout.reference_engine],
                                     self.chunks)
            with phase_timer("train", m):
                results = self._updates(batch, self.cfg.trainer.updates_per_step, loss_name_for(self.cfg.algorithm))
            guard(self.state, results, self.cfg.trainer.max_bad_steps)
            m.update(update_metrics(results))
            with phase_timer("sync", m):
                self.sync_policy_engine()
        self.state.step = step
        m["tokens_per_s"] = m.get("rollout/tokens", 0.0) / m["time/step"]
        m["bad_steps"] = float(self.state.total_bad)
        m["rollout/engine_restarts"] = float(self.state.engine_restarts)
        return m

    def _rl_loop(self, start: int, stop: StopRequest) -> int:
        cfg = self.cfg
        total = cfg.trainer.steps
        progress = Progress(total, start, enabled=self.is_rank0, bar=cfg.logging.progress_bar)
        for step in range(start + 1, total + 1):
            m = self._rl_step(step)
            self.metrics.log(step, m)
            progress.update(step, m)
            if cfg.trainer.eval_every > 0 and step % cfg.trainer.eval_every == 0:
                self._log_eval(step)
            stopping = broadcast_object(stop.requested, self.group) or stop.requested
            if (cfg.checkpoint.save_every > 0 and step % cfg.checkpoint.save_every == 0) or stopping or step == total:
                self.save_checkpoint()
            if stopping:
                log.warning("stop signal received: checkpoint at step %d saved, exiting (code %d)", step, EXIT_STOPPED)
                return EXIT_STOPPED
        progress.close()
        return EXIT_OK

    def close(self) -> None:
        """Stop engines and workers, close writers, tear down process groups (safe after errors)."""
        self.rollout.close()
        if self.metrics is not None:
            try:
                self.metrics.close()
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                log.warning("shutdown: %s", exc)
        teardown_distributed()


def run_training(cfg: Config) -> int:
    """Entry point of aapo-train: returns the process exit code (errors.py's table)."""
    job = None
    try:
        job = TrainingJob(cfg)
        return job.run()
    except ConfigError as exc:
        print(f"aapo-train: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointSaveError as exc:
        print(f"aapo-train: {exc}", file=sys.stderr)
        return EXIT_SAVE_FAILED
    except (AapoError, CheckpointError) as exc:  # TrainingError, EngineFailure, RankZeroError, ...: their exit_code
        print(f"aapo-train: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_ERROR)
    finally:
        if job is not None:
            job.close()
