"""Rank 0's services: the rollout engines, the reward pool, the prompt data, and the one restart policy.

Every method is a collective over the job's process group: rank 0 does the work (vLLM engines run in their own
spawned processes), `rank_zero.on_rank0` gives every rank its outcome, so a failure on rank 0 stops every rank
with rank 0's message instead of leaving them at the next collective. Attributes are None on the other ranks.

Restart policy: a failed engine (generation or weight sync) restarts both engines once from the run's starting
checkpoint (placement=server: connects again) and the action is repeated; a second failure stops the run. With
rollout.data_parallel_size > 1, when replicas are dead only those restart (`ReplicaSet.restart_dead`), the others
keep running; the repeat's resync then gives every replica the current weights.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS
from aapo_megatron.algorithms.temperature import engine_logprobs_mode
from aapo_megatron.config import Config, ConfigError
from aapo_megatron.data.dataset import PromptDataset
from aapo_megatron.data.sampler import ResumableSampler
from aapo_megatron.rewards.pool import RewardPool
from aapo_megatron.rollout.engine import RolloutError
from aapo_megatron.rollout.reference_cache import ReferenceCache
from aapo_megatron.rollout.replicas import ReplicaSet
from aapo_megatron.trainer import timeshare
from aapo_megatron.trainer.batch import RolloutBatch
from aapo_megatron.trainer.errors import EngineFailure, TrainingError
from aapo_megatron.trainer.rank_zero import on_rank0
from aapo_megatron.trainer.rollout import RolloutCollector, Rollouts, evaluate

log = logging.getLogger("aapo_megatron.trainer")

T = TypeVar("T")
PREFETCH_CLOSE_TIMEOUT_S = 120.0  # close() and a restart wait this long for a running reference prefetch


@contextlib.contextmanager
def usr1_blocked_in_children():
    """Start helper processes with SIGUSR1 blocked: Slurm sends its warning signal to every process of the job
    step, and vLLM's engine or a reward worker would die of it (its default action). The trainer's own handler
    runs once the mask is restored here; a signal that arrived meanwhile is delivered then."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RolloutSide:
    """Engines, rewards and data of one run (rank 0's; None elsewhere), and the phases that use them."""

    def __init__(self, cfg: Config, group: Optional[dist.ProcessGroup], is_rank0: bool):
        self.cfg = cfg
        self.group = group
        self.is_rank0 = is_rank0
        self.hf_init: Optional[str] = None  # the starting checkpoint a colocated engine (re)starts from
        self.vocab_size: Optional[int] = None
        self.tokenizer: Any = None
        self.policy_engine: Any = None
        self.reference_engine: Any = None
        self.reward_pool: Optional[RewardPool] = None
        self.train_set: Optional[PromptDataset] = None
        self.eval_set: Optional[PromptDataset] = None
        self.sampler: Optional[ResumableSampler] = None
        self.reference_cache: Optional[ReferenceCache] = None
        self.collector: Optional[RolloutCollector] = None

    # ------------------------------------------------------------------ start, restart, close
    def start(self, hf_init: str, tokenizer: Any, vocab_size: int, sampler_state: dict,
              cache_state: Optional[dict]) -> None:
        """Collective: rank 0 loads the datasets, starts the reward pool and the engines (from `hf_init`)."""
        self.hf_init, self.tokenizer, self.vocab_size = hf_init, tokenizer, vocab_size
        on_rank0(lambda: self._start_rank0(sampler_state, cache_state), self.group, share=False)
        dist.barrier(self.group)

    def _start_rank0(self, sampler_state: dict, cache_state: Optional[dict]) -> None:
        try:
            with usr1_blocked_in_children():
                self._open_services(sampler_state, cache_state)
        except ConfigError:
            raise
        except RolloutError as exc:
            raise TrainingError(f"starting the rollout side: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - every rank must stop with its message
            log.exception("starting the engines, reward workers and datasets failed")
            raise TrainingError(f"starting the rollout side failed: {type(exc).__name__}: {exc}") from exc

    def _open_services(self, sampler_state: dict, cache_state: Optional[dict]) -> None:
        cfg = self.cfg
        log.info("loading prompts (%s)", cfg.data.source)
        self.train_set = PromptDataset.from_config(cfg.data, self.tokenizer, "train")
        has_eval = cfg.data.eval_size > 0 if cfg.data.source == "reasoning_gym" else cfg.data.eval_path is not None
        self.eval_set = PromptDataset.from_config(cfg.data, self.tokenizer, "eval") if has_eval else None
        self.sampler = ResumableSampler(len(self.train_set), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        if sampler_state:
            self.sampler.load_state_dict(sampler_state)
        self.reward_pool = RewardPool(cfg.reward)
        needs_reference = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.name).uses_reference
        self.policy_engine, self.reference_engine = self._open_engines(needs_reference)
        if cfg.algorithm.reference_rollouts == "cached":
            self.reference_cache = ReferenceCache()
            if cache_state:
                self.reference_cache.load_state_dict(cache_state)
        self.collector = RolloutCollector(cfg, self.tokenizer, self.policy_engine, self.reference_engine,
                                          self.reward_pool, self.tokenizer.eos_token_id, self.reference_cache)

    def _open_engines(self, reference: bool) -> tuple:
        """The policy and (if `reference`) reference engines: started here from hf_init (colocated) or connected
        to the run's `aapo-rollout-server`s (placement=server, checked by `connect_servers`)."""
        cfg = self.cfg
        if cfg.rollout.placement == "server":
            from aapo_megatron.rollout.client import connect_servers  # the HTTP client stack, server runs only

            # A warm start (trainer.sft_steps > 0) with a reference server is refused in validation
            # (validation.check_server_with_sft).
            log.info("connecting to the rollout servers: policy %s%s", cfg.rollout.server_url,
                     f", reference {cfg.rollout.reference_server_url}" if reference else "")
            return connect_servers(cfg.rollout, reference=reference, vocab_size=self.vocab_size,
                                   logprobs_mode=engine_logprobs_mode(cfg))
        from aapo_megatron.rollout.backends import backend_opener  # the backend's engines, colocated runs only

        log.info("starting %s engines from %s (policy%s)", cfg.rollout.backend, self.hf_init,
                 " + reference" if reference else "")
        open_engines = backend_opener(cfg.rollout.backend)
        return open_engines(self.hf_init, cfg.rollout, reference=reference,
                            max_prompt_tokens=cfg.data.max_prompt_tokens, logprobs_mode=engine_logprobs_mode(cfg))

    def restart(self) -> None:
        """Collective: rank 0 closes both engines and opens them again (a failure here stops every rank)."""
        on_rank0(self._reopen, self.group, share=False)

    def _reopen(self) -> None:
        self.collector.discard_prefetch(timeout=PREFETCH_CLOSE_TIMEOUT_S)  # it may be running on an engine closed here
        if self._restart_dead_replicas():
            return
        for engine in (self.policy_engine, self.reference_engine):
            if engine is not None:
                try:
                    engine.close()
                except Exception as exc:  # noqa: BLE001 - it is already broken
                    log.warning("closing the failed engine: %s", exc)
        with usr1_blocked_in_children():
            self.policy_engine, self.reference_engine = self._open_engines(self.reference_engine is not None)
        self.collector.policy, self.collector.reference = self.policy_engine, self.reference_engine

    def _restart_dead_replicas(self) -> bool:
        """DP replica sets with dead replicas restart only those; False (restart everything) when no replica
        is dead (a hang, a refusal) or the engines are single engines or servers."""
        sets = [e for e in (self.policy_engine, self.reference_engine) if isinstance(e, ReplicaSet)]
        if not any(s.dead() for s in sets):
            return False
        with usr1_blocked_in_children():
            for s in sets:
                for i in s.restart_dead():
                    log.warning("restarted %s replica %d/%d alone (its engine process was dead)", s.role, i,
                                len(s.replicas))
        return True

    def with_restart(self, action: Callable[[], T], what: str, after_restart: Callable[[], None]) -> T:
        """Collective: action(); on an EngineFailure (raised on every rank) restart the engines once, call
        `after_restart()` and repeat the action; a second failure is a TrainingError."""
        try:
            return action()
        except EngineFailure as exc:
            log.warning("%s: %s; restarting the rollout engines once", what, exc)
        self.restart()
        try:
            after_restart()
            return action()
        except EngineFailure as exc:
            raise TrainingError(f"{what}: {exc} (again, after one restart); giving up. Check the engine log above "
                                f"(out of memory? rollout.memory_fraction={self.cfg.rollout.memory_fraction})") from exc

    def close(self) -> None:
        """Stop the engines and reward workers (safe after errors, on every rank)."""
        if self.collector is not None and not self.collector.wait_prefetch(timeout=PREFETCH_CLOSE_TIMEOUT_S):
            log.warning("shutdown: the reference prefetch did not finish within %.0f s; closing its engine anyway",
                        PREFETCH_CLOSE_TIMEOUT_S)
        for obj in (self.policy_engine, self.reference_engine, self.reward_pool):
            if obj is not None:
                try:
                    obj.close()
                except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                    log.warning("shutdown: %s", exc)

    # ------------------------------------------------------------------ the phases of a step
    @property
    def prefetch_reference(self) -> bool:
        """Whether the next step's reference samples are drawn while this step trains (rollout.prefetch_reference)."""
        mode = self.cfg.rollout.prefetch_reference
        return mode == "always" or (mode == "auto" and self.cfg.rollout.placement == "server")

    def generate(self, step: int, metrics: dict, after_restart: Callable[[], None]) -> Optional[Rollouts]:
        """Collective: step `step`'s prompts and their policy (and reference) samples, rank 0's (None elsewhere);
        then the next step's reference prefetch starts (rollout.prefetch_reference)."""
        timeshare.before_generate([self.policy_engine, self.reference_engine])
        prompts = None
        if self.is_rank0:
            prompts = [self.train_set[i] for i in self.sampler.next_batch(self.cfg.data.prompts_per_step)]
        rollouts = self.with_restart(
            lambda: on_rank0(lambda: self.collector.generate(prompts, step, metrics), self.group, share=False),
            "generation", after_restart)
        if self.is_rank0 and self.prefetch_reference and step < self.cfg.trainer.steps:
            nxt = self.sampler.peek_batch(self.cfg.data.prompts_per_step)
            self.collector.prefetch_reference([self.train_set[i] for i in nxt], step + 1)
        return rollouts

    def score(self, rollouts: Optional[Rollouts], metrics: dict) -> Any:
        """Collective: rank 0's reward-pool scores of the rollouts (None elsewhere)."""
        return on_rank0(lambda: self.collector.score(rollouts, metrics), self.group, share=False)

    def advantages(self, rollouts: Optional[Rollouts], scored: Any, metrics: dict) -> RolloutBatch:
        """Collective: the step's advantages and RolloutBatch, computed on rank 0 and sent to every rank."""
        return on_rank0(lambda: self.collector.advantages(rollouts, scored, metrics), self.group)

    def evaluate(self) -> Optional[dict]:
        """Collective: greedy held-out metrics of the policy engine (rank 0's; None elsewhere or without eval set)."""
        def run() -> Optional[dict]:
            if self.eval_set is None:
                return None
            timeshare.before_generate([self.policy_engine])
            return evaluate(self.policy_engine, self.tokenizer, list(self.eval_set), self.reward_pool, self.cfg,
                            self.tokenizer.eos_token_id)

        return on_rank0(run, self.group, share=False)
