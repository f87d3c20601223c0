"""The training job: set-up, optional SFT warm start, the RL loop, evaluation, checkpoints, shutdown.

One RL step (DESIGN.md section 2):
  rank 0: prompts -> policy engine (G samples) and reference engine or cache (G samples)
          -> reward pool -> grouped-advantage op -> RolloutBatch
  all:    broadcast the batch -> `updates_per_step` Megatron updates -> gather weights
  rank 0: push them to the policy engine (weight version +1) -> metrics, eval, checkpoint

Rank 0 owns the rollout side (vLLM engines run in their own spawned processes); every
rank owns its TP/PP shard of the policy. Only token ids cross the broadcast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from aapo_megatron.config import Config, ConfigError, dump_yaml
from aapo_megatron.trainer import reference_identity, timeshare
from aapo_megatron.trainer.batch import RolloutBatch, shard_indices
from aapo_megatron.trainer.checkpoint import CheckpointError, CheckpointManager, CheckpointSaveError
from aapo_megatron.trainer.metrics import MetricsLogger, summary_table, write_plots
from aapo_megatron.trainer.signals import StopRequest

log = logging.getLogger("aapo_megatron.trainer")

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_SAVE_FAILED = 0, 1, 2, 3, 4
HF_INIT_DIR = "hf_init"
TOKENIZER_DIR = "tokenizer"
EXPORT_SHARD_BYTES = 2 * 1024**3  # HF export shard size
PREFETCH_CLOSE_TIMEOUT_S = 120.0  # close() waits this long for a running reference prefetch
SUMMARY_KEYS = ("reward/mean", "reward/ref_mean", "train/accuracy", "eval/accuracy", "loss",
                "adv/mean_abs_advantage", "adv/mean_abs_advantage_no_margin", "adv/zero_variance_group_fraction",
                "response/len_mean", "mismatch/mean", "kl/reference", "grad_norm", "time/step", "tokens_per_s")


class TrainingError(RuntimeError):
    """The run cannot continue (the message says why and what to do)."""


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def _usr1_blocked_in_children():
    """Start helper processes with SIGUSR1 blocked: Slurm sends its warning signal to every process of the job
    step, and vLLM's engine or a reward worker would die of it (its default action). The trainer's own handler
    runs once the mask is restored here; a signal that arrived meanwhile is delivered then."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def setup_logging(rank: int) -> None:
    """Our loggers: INFO on rank 0, warnings elsewhere; third-party libraries (Megatron, vLLM) stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("aapo_megatron").setLevel(logging.INFO if rank == 0 else logging.WARNING)



class TrainingJob:
    """Everything one `aapo-train` process holds; rank 0 additionally owns engines, rewards and data."""

    def __init__(self, cfg: Config):
        from aapo_megatron.models.parallel import current_layout, init_distributed, seed_everything

        self.cfg = cfg
        self.env = init_distributed(cfg)
        self.rank = self.env.rank
        self.is_rank0 = self.rank == 0
        setup_logging(self.rank)
        seed_everything(cfg.trainer.seed)
        self.layout = current_layout()
        self.run_dir = os.path.abspath(cfg.trainer.run_dir)
        self.ckpt_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints"))
        if self.is_rank0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(cfg))
        _barrier()
        self.state = LoopState()
        self.policy_engine = self.reference_engine = self.reward_pool = None
        self.collector = None  # RolloutCollector, rank 0
        self.sampler = self.reference_cache = None  # RL prompt sampler, reference cache (rank 0, set by the RL start)
        self.reference = None  # models.reference.ReferenceModel, every rank, when the run needs one
        self.metrics: Optional[MetricsLogger] = None
        self.ckpt = CheckpointManager(self.ckpt_dir, cfg.checkpoint.keep_last, is_writer=self.is_rank0,
                                      barrier=_barrier)

    # ================================================================== set-up
    def _tokenizer(self):
        """model.tokenizer, else one trained once into <run_dir>/tokenizer (data.train_tokenizer), else model.path."""
        from aapo_megatron.data.tokenizer import tokenizer_for_config

        cfg = self.cfg
        if cfg.model.tokenizer is None and not cfg.data.train_tokenizer and cfg.model.path is None:
            raise ConfigError("no tokenizer: set model.tokenizer, model.path, or data.train_tokenizer=true")
        out_dir = os.path.join(self.run_dir, TOKENIZER_DIR)
        if self.is_rank0:
            tokenizer_for_config(cfg, out_dir)  # trains (or reuses) on rank 0 only
        _barrier()
        return tokenizer_for_config(cfg, out_dir)

    def _arch(self):
        from aapo_megatron.models.arch import ArchSpec

        if self.cfg.model.path is None:
            return ArchSpec.from_scratch(self.cfg.model.scratch).replace(vocab_size=len(self.tokenizer))
        from aapo_megatron.convert.mcore_io import is_mcore_checkpoint, read_arch

        if is_mcore_checkpoint(self.cfg.model.path):
            return read_arch(self.cfg.model.path)
        return ArchSpec.from_hf_dir(self.cfg.model.path)

    def _load_initial_weights(self) -> None:
        """Starting weights of the policy: model.path (HF or Megatron), else Megatron's random init."""
        path = self.cfg.model.path
        if path is None:
            return
        from aapo_megatron.convert.mcore_io import is_mcore_checkpoint, load_mcore_checkpoint

        if is_mcore_checkpoint(path):
            load_mcore_checkpoint(self.model, path)
        else:
            self._load_hf_dir(path)

    def _load_hf_dir(self, path: str) -> None:
        from aapo_megatron.convert.hf_io import HFCheckpointReader
        from aapo_megatron.models.weights import load_hf_weights

        reader = HFCheckpointReader(path)
        load_hf_weights(self.model, self.mapping, lambda name: reader.load([name])[name])

    def _build_models(self) -> None:
        from aapo_megatron.convert.mapping import WeightMapping
        from aapo_megatron.models.gpt import build_policy, resolve_dtype
        from aapo_megatron.models.weights import model_naming

        self.spec = self._arch()
        self.dtype = resolve_dtype(self.cfg.model.dtype)
        from aapo_megatron.models.activation_memory import model_config_overrides

        self.model = build_policy(self.spec, dtype=self.dtype,
                                  config_overrides=model_config_overrides(self.cfg.parallel, self.cfg.trainer))
        self.mapping = WeightMapping(self.spec, naming=model_naming(self.model))
        self._load_initial_weights()
        self.chunks = None  # DDP-wrapped, built by _build_optimizer

    def _build_optimizer(self, lr: Optional[float] = None, total_updates: int = 1, constant: bool = False) -> None:
        """(Re)build DDP wrappers, a fresh optimizer and LR schedule (fresh Adam state)."""
        import dataclasses

        from aapo_megatron.trainer.optim import build_optimizer, build_scheduler, wrap_ddp

        use_dist_opt = torch.cuda.is_available()  # Megatron's DistributedOptimizer refuses CPU tensors
        if self.chunks is None:
            self.chunks = wrap_ddp([self.model], use_distributed_optimizer=use_dist_opt)
        ocfg = self.cfg.optim
        if lr is not None:
            ocfg = dataclasses.replace(ocfg, lr=lr, min_lr=min(ocfg.min_lr, lr), warmup_steps=0 if constant else ocfg.warmup_steps,
                                       lr_schedule="constant" if constant else ocfg.lr_schedule)
        self.optimizer = build_optimizer(self.chunks, ocfg, bf16=self.dtype == torch.bfloat16,
                                         use_distributed_optimizer=use_dist_opt)
        self.scheduler = build_scheduler(self.optimizer, ocfg, total_updates)

    def _start_components(self, hf_init: str) -> None:
        """Collective: rank 0 starts the engines, reward pool and datasets; a failure there stops every rank
        with its message (instead of leaving the others waiting at the next collective)."""
        from aapo_megatron.rollout.engine import RolloutError

        error: Optional[tuple[str, str]] = None  # (kind, message)
        if self.is_rank0:
            try:
                with _usr1_blocked_in_children():
                    self._start_rank0_components(hf_init)
            except ConfigError as exc:
                error = ("config", str(exc))
            except RolloutError as exc:
                error = ("error", f"starting the rollout side: {exc}")
            except Exception as exc:  # noqa: BLE001 - every rank must stop, not only this one
                log.exception("starting the engines, reward workers and datasets failed")
                error = ("error", f"starting the rollout side failed: {type(exc).__name__}: {exc}")
        error = _broadcast_object(error)
        if error is not None:
            raise (ConfigError if error[0] == "config" else TrainingError)(error[1])
        _barrier()

    def _start_rank0_components(self, hf_init: str) -> None:
        from aapo_megatron.data.dataset import PromptDataset
        from aapo_megatron.data.sampler import ResumableSampler
        from aapo_megatron.rewards.pool import RewardPool

        cfg = self.cfg
        log.info("loading prompts (%s)", cfg.data.source)
        self.train_set = PromptDataset.from_config(cfg.data, self.tokenizer, "train")
        has_eval = cfg.data.eval_size > 0 if cfg.data.source == "reasoning_gym" else cfg.data.eval_path is not None
        self.eval_set = PromptDataset.from_config(cfg.data, self.tokenizer, "eval") if has_eval else None
        self.sampler = ResumableSampler(len(self.train_set), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        if self.state.sampler:
            self.sampler.load_state_dict(self.state.sampler)
        self.reward_pool = RewardPool(cfg.reward)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's per-request INFO lines drown the progress
        from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS

        needs_reference = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.name).uses_reference
        self.policy_engine, self.reference_engine = self._open_engines(hf_init, needs_reference)
        self.reference_cache = None
        if cfg.algorithm.reference_rollouts == "cached":
            from aapo_megatron.rollout.reference_cache import ReferenceCache

            self.reference_cache = ReferenceCache()
            if self.state.reference_cache:
                self.reference_cache.load_state_dict(self.state.reference_cache)
        from aapo_megatron.trainer.rollout import RolloutCollector

        self.collector = RolloutCollector(cfg, self.tokenizer, self.policy_engine, self.reference_engine,
                                          self.reward_pool, self.tokenizer.eos_token_id, self.reference_cache)

    def _open_engines(self, hf_init: str, reference: bool) -> tuple:
        """Rank 0: the policy and (if `reference`) reference engines: started here from `hf_init` (colocated) or
        connected to the run's `aapo-rollout-server`s (placement=server, checked by `connect_servers`)."""
        cfg = self.cfg
        if cfg.rollout.placement == "server":
            from aapo_megatron.rollout.client import connect_servers

            # A warm start (trainer.sft_steps > 0) with a reference server is refused in validation
            # (config_checks.check_server_with_sft).
            log.info("connecting to the rollout servers: policy %s%s", cfg.rollout.server_url,
                     f", reference {cfg.rollout.reference_server_url}" if reference else "")
            return connect_servers(cfg.rollout, reference=reference, vocab_size=self.spec.vocab_size)
        from aapo_megatron.rollout.vllm_engine import build_engines

        log.info("starting vLLM engines from %s (policy%s)", hf_init, " + reference" if reference else "")
        return build_engines(hf_init, cfg.rollout, reference=reference, max_prompt_tokens=cfg.data.max_prompt_tokens)

    @property
    def _prefetch_reference(self) -> bool:
        """Whether the next step's reference samples are drawn while this step trains (rollout.prefetch_reference)."""
        mode = self.cfg.rollout.prefetch_reference
        return mode == "always" or (mode == "auto" and self.cfg.rollout.placement == "server")

    # ================================================================== weights out
    def _iter_hf(self):
        from aapo_megatron.models.weights import iter_hf_tensors
        from megatron.core import parallel_state as ps

        return iter_hf_tensors(self.model, self.mapping, ps.get_tensor_model_parallel_group(),
                               ps.get_pipeline_model_parallel_group())

    def _model_parallel_rank0(self) -> bool:
        """True on the ranks that must take part in gathering weights (data-parallel rank 0's model-parallel group)."""
        return self.layout.dp_rank == 0

    def export_hf(self, out_dir: str) -> None:
        """Collective: write the policy as an HF directory (safetensors + config.json + tokenizer), atomically."""
        from aapo_megatron.convert.hf_io import SafetensorsShardWriter, copy_files, finalize_shards, write_config
        from aapo_megatron.models.arch import to_hf_config

        tmp = out_dir + ".tmp"
        writer = None
        if self.is_rank0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            writer = SafetensorsShardWriter(tmp, max_shard_bytes=EXPORT_SHARD_BYTES)
        if self._model_parallel_rank0():
            for name, tensor in self._iter_hf():
                if writer is not None:
                    writer.add(name, tensor.detach().to("cpu").clone())
        if self.is_rank0:
            finalize_shards(tmp, writer.close())
            write_config(tmp, to_hf_config(self.spec))
            self.tokenizer.save_pretrained(tmp)
            if os.path.exists(out_dir):
                import shutil

                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        _barrier()

    def sync_policy_engine(self) -> float:
        """Collective: stream the current weights to the policy engine; returns seconds.

        If the engine fails during the sync (its process died, a stage timed out), rank 0 restarts both
        engines once and the sync is repeated; a second failure stops the run.
        """
        t0 = time.perf_counter()
        timeshare.before_sync(self.policy_engine, self.chunks)
        for attempt in (1, 2):
            error = self._sync_once()
            error = _broadcast_object(error)
            if error is None:
                break
            if attempt == 2:
                raise TrainingError(f"weight sync to the policy engine failed again after a restart: {error}")
            log.warning("weight sync failed (%s); restarting the rollout engines once", error)
            if self.is_rank0:
                self._restart_engines()
                self.state.engine_restarts += 1
        timeshare.after_sync(self.policy_engine)
        _barrier()
        return time.perf_counter() - t0

    def _sync_once(self) -> Optional[str]:
        """One pass of the weight stream; rank 0 returns the failure text, if any (the stream is always drained
        so the TP/PP gathers stay aligned across ranks)."""
        if not self._model_parallel_rank0():
            return None
        tensors = self._iter_hf()
        error = None
        if self.is_rank0:
            try:
                self.policy_engine.update_weights(tensors)
            except Exception as exc:  # noqa: BLE001 - reported, then one restart
                error = f"{type(exc).__name__}: {exc}"
        for _ in tensors:  # take part in the remaining collectives
            pass
        return error

    # ================================================================== updates
    def _updates(self, batch: RolloutBatch, num_updates: int, loss_name: str) -> list:
        """`num_updates` optimizer updates over consecutive mini-batches of `batch` (this DP rank's share)."""
        from aapo_megatron.trainer.losses import build_loss_fn
        from aapo_megatron.trainer.train_step import micro_batcher, run_update

        tcfg = self.cfg.trainer
        from aapo_megatron.models.activation_memory import sequence_multiple

        micro_batches = micro_batcher(batch, tcfg.micro_batch_tokens, tcfg.pack_sequences, tcfg.pack_factor,
                                      sequence_multiple(self.layout.tp_size, self.cfg.parallel.sequence_parallel))
        per_update = len(batch) // num_updates
        results = []
        for u in range(num_updates):
            mini = range(u * per_update, (u + 1) * per_update)
            mine = shard_indices(len(mini), self.layout.dp_rank, self.layout.dp_size)
            indices = range(mini.start + mine.start, mini.start + mine.stop)
            micro = micro_batches(indices)
            if self.reference is not None:
                self.reference.fill_ref_logprobs(micro)  # the k3 KL and kl/reference
            loss_fn = build_loss_fn(loss_name, self.cfg.algorithm, track_mismatch=(u == 0), on_policy=(u == 0))
            results.append(run_update(self.chunks, self.optimizer, self.scheduler, micro, loss_fn,
                                      self.cfg.optim.clip_grad))
        return results

    def _guard(self, results: list) -> bool:
        """Count non-finite steps; raise after `trainer.max_bad_steps` in a row. True if the step was clean."""
        import math

        bad = any(not r.update.applied or not math.isfinite(r.loss) for r in results)
        if bad:
            self.state.consecutive_bad += 1
            self.state.total_bad += 1
            log.warning("non-finite loss or gradient: update skipped (%d in a row)", self.state.consecutive_bad)
            if self.state.consecutive_bad >= self.cfg.trainer.max_bad_steps:
                raise TrainingError(f"{self.state.consecutive_bad} consecutive steps had a non-finite loss or "
                                    f"gradient (trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping. "
                                    f"Lower optim.lr or check the data.")
        else:
            self.state.consecutive_bad = 0
        return not bad

    @staticmethod
    def _update_metrics(results: list) -> dict[str, float]:
        import math

        out = {"loss": sum(r.loss for r in results) / len(results),
               "grad_norm": max(r.update.grad_norm for r in results),
               "lr": results[-1].update.lr,
               "train/tokens": float(sum(r.num_tokens for r in results))}
        for key in results[0].metrics:
            vals = [r.metrics[key] for r in results if key in r.metrics and math.isfinite(r.metrics[key])]
            if vals:
                out[key] = max(vals) if key.endswith("_max") else sum(vals) / len(vals)
        return out

    # ================================================================== SFT warm start
    def _sft_batch(self, sampler, prompts) -> RolloutBatch:
        eos = self.tokenizer.eos_token_id
        idx = sampler.next_batch(self.cfg.trainer.sft_batch_size)
        chosen = [prompts[i] for i in idx]
        target = self.cfg.trainer.sft_target
        answers = [self.tokenizer.encode(target.replace("{answer}", p.answer), add_special_tokens=False) + [eos]
                   for p in chosen]
        return RolloutBatch(prompt_ids=[list(p.input_ids) for p in chosen], completion_ids=answers,
                            advantages=torch.ones(len(chosen)))

    def _build_sft_optimizer(self) -> None:
        self._build_optimizer(lr=self.cfg.trainer.sft_lr, total_updates=self.cfg.trainer.sft_steps, constant=True)

    def run_sft(self, stop: StopRequest) -> int:
        """Supervised warm start on (prompt, answer) pairs from `state.sft_step` on; every rank builds the same
        batches. A stop signal saves a checkpoint (RL step 0: an SFT checkpoint) and returns EXIT_STOPPED."""
        from aapo_megatron.data.dataset import PromptDataset
        from aapo_megatron.data.sampler import ResumableSampler

        steps = self.cfg.trainer.sft_steps
        prompts = PromptDataset.from_config(self.cfg.data, self.tokenizer, "train")
        sampler = ResumableSampler(len(prompts), seed=self.cfg.data.seed + 1, shuffle=self.cfg.data.shuffle)
        start = self.state.sft_step
        if start > 0:  # resumed from an SFT checkpoint: `_resume` built and loaded the SFT optimizer
            sampler.load_state_dict(self.state.sft_sampler)
        else:
            self._build_sft_optimizer()
        log.info("SFT warm start: %d steps of %d pairs, lr %g%s", steps, self.cfg.trainer.sft_batch_size,
                 self.cfg.trainer.sft_lr, f", resumed after step {start}" if start else "")
        t0 = time.perf_counter()
        for step in range(start + 1, steps + 1):
            results = self._updates(self._sft_batch(sampler, prompts), 1, "sft_ce")
            self._guard(results)
            m = self._update_metrics(results)
            self.state.sft_step, self.state.sft_sampler = step, sampler.state_dict()
            if self.metrics is not None:
                self.metrics.log(-steps + step, {"phase": "sft", "sft/loss": m["loss"], "grad_norm": m["grad_norm"],
                                                 "bad_steps": float(self.state.total_bad)})
            if step % max(1, steps // 10) == 0 or step == steps:
                log.info("sft %d/%d  loss %.4f  (%.1fs)", step, steps, m["loss"], time.perf_counter() - t0)
            if _broadcast_object(stop.requested if self.is_rank0 else None) or stop.requested:
                self.save_checkpoint()
                log.warning("stop signal received during the SFT warm start: checkpoint at SFT step %d/%d saved, "
                            "exiting (code %d)", step, steps, EXIT_STOPPED)
                return EXIT_STOPPED
        self.state.sft_step = steps
        return EXIT_OK

    # ================================================================== checkpoints
    def save_checkpoint(self) -> None:
        """Collective: policy + optimizer (dist checkpoint), trainer state (rank 0), RNG (every rank)."""
        from aapo_megatron.trainer.state import MODEL_DIR, save_model_and_optimizer, save_rng, save_trainer_state

        step = self.state.step
        t0 = time.perf_counter()
        if self.is_rank0 and self.sampler is not None:  # None during the SFT warm start
            self.state.sampler = self.sampler.state_dict()
            if self.reference_cache is not None:
                self.collector.wait_prefetch()  # a prefetch may be adding to the cache
                self.state.reference_cache = self.reference_cache.state_dict()

        def write(tmp_dir: str) -> None:
            save_model_and_optimizer(os.path.join(tmp_dir, MODEL_DIR), self.chunks, self.optimizer)
            save_rng(tmp_dir)
            if self.is_rank0:
                save_trainer_state(tmp_dir, {
                    "loop": self.state.__dict__, "scheduler": self.scheduler.state_dict(),
                    "config": self.cfg.to_dict(), "world_size": self.env.world_size,
                })

        info = self.ckpt.save(step, write)
        log.info("checkpoint step %d -> %s (%.1fs)", step, info.path, time.perf_counter() - t0)

    def _resume(self) -> Optional[int]:
        """Load the checkpoint `checkpoint.resume` selects; return its step or None for a fresh start."""
        from aapo_megatron.trainer.state import MODEL_DIR, load_model_and_optimizer, load_rng, load_trainer_state

        info = _broadcast_object(self.ckpt.resolve(self.cfg.checkpoint.resume) if self.is_rank0 else None)
        if info is None:
            if self.cfg.checkpoint.resume not in (None, "auto"):
                raise CheckpointError(f"no checkpoint at {self.cfg.checkpoint.resume}")
            return None
        log.info("resuming from %s", info.path)
        trainer_state = load_trainer_state(info.path)
        if trainer_state is None:
            raise CheckpointError(f"checkpoint {info.path} has no trainer state")
        if trainer_state["loop"]["step"] == 0:  # taken during the SFT warm start: it holds the SFT optimizer
            self._build_sft_optimizer()
        load_model_and_optimizer(os.path.join(info.path, MODEL_DIR), self.chunks, self.optimizer)
        self.state = LoopState(**trainer_state["loop"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        load_rng(info.path)
        return info.step

    # ================================================================== the job
    def _rl_total_updates(self) -> int:
        return max(1, self.cfg.trainer.steps * self.cfg.trainer.updates_per_step)

    def run(self) -> int:
        """Set up, (SFT), RL steps, final eval and summary. Returns the exit code."""
        cfg = self.cfg
        with StopRequest() as stop:
            self.tokenizer = self._tokenizer()
            self._build_models()
            hf_init = os.path.join(self.run_dir, HF_INIT_DIR)
            resumed_step, rebuilt = None, False
            if self.cfg.checkpoint.resume is not None:
                rebuilt = reference_identity.rebuild_if_missing(self, hf_init)  # while the weights are initial
                self._build_optimizer(total_updates=self._rl_total_updates())
                resumed_step = self._resume()
            in_sft = resumed_step == 0  # resumed from a checkpoint of the SFT warm start (RL checkpoints are >= 1)
            self.metrics = MetricsLogger(self.run_dir, cfg.logging, is_writer=self.is_rank0, run_config=cfg.to_dict(),
                                         resume_step=self.state.sft_step - cfg.trainer.sft_steps if in_sft else resumed_step)
            if resumed_step is None or in_sft:
                if cfg.trainer.sft_steps > 0:
                    if self.run_sft(stop) == EXIT_STOPPED:
                        return EXIT_STOPPED
                self._build_optimizer(total_updates=self._rl_total_updates())
                resumed_step = None  # from here on, as a fresh run
            if cfg.trainer.mode == "sft":
                self.export_hf(os.path.join(self.run_dir, "hf_final"))
                log.info("SFT finished; HF export in %s", os.path.join(self.run_dir, "hf_final"))
                return EXIT_OK
            # The frozen reference (and the policy engine's initial weights) = the starting point of RL.
            from aapo_megatron.models.reference import build_run_reference

            if resumed_step is None:
                self.export_hf(hf_init)  # a fresh run always starts from its own weights, never a stale export
            reference_identity.settle(self, hf_init, resumed_step, rebuilt)  # never the resumed policy
            self.reference = build_run_reference(cfg, self.spec, self.model, hf_init)
            self._start_components(hf_init)
            start = self.state.step
            if resumed_step is not None or cfg.rollout.placement == "server":
                # A colocated engine starts from hf_init, a server from whatever it was started with: bring it
                # to the current weights.
                sync_s = self.sync_policy_engine()
                log.info("policy engine synced to step %d (%.1fs)", start, sync_s)
            if start == 0 and cfg.trainer.eval_every > 0:
                self._log_eval(0)
            code = self._rl_loop(start, stop)
            if code == EXIT_OK:
                if cfg.trainer.eval_every > 0 and self.state.step % cfg.trainer.eval_every != 0:
                    self._log_eval(self.state.step)
                self.export_hf(os.path.join(self.run_dir, "hf_final"))
                self._finish()
            return code

    def _log_eval(self, step: int) -> None:
        from aapo_megatron.trainer.rollout import evaluate

        if self.is_rank0 and self.eval_set is not None:
            timeshare.before_generate([self.policy_engine])
            m = evaluate(self.policy_engine, self.tokenizer, list(self.eval_set), self.reward_pool, self.cfg,
                         self.tokenizer.eos_token_id)
            log.info("eval @ step %d: %s", step, "  ".join(f"{k}={v:.4f}" for k, v in m.items()))
            self.metrics.log(step, m)
        _barrier()

    def _rl_loop(self, start: int, stop: StopRequest) -> int:
        cfg = self.cfg
        total = cfg.trainer.steps
        bar = None
        if self.is_rank0 and cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc="aapo", unit="step")
        for step in range(start + 1, total + 1):
            t_step = time.perf_counter()
            m: dict[str, float] = {}
            timeshare.before_generate([self.policy_engine, self.reference_engine])
            batch, m = self._collect_with_restart(step)
            if self.is_rank0 and self._prefetch_reference and step < total:
                nxt = self.sampler.peek_batch(cfg.data.prompts_per_step)
                self.collector.prefetch_reference([self.train_set[i] for i in nxt], step + 1)
            # generate -> sleep -> train (the reference stays awake while it prefetches the next step)
            timeshare.after_generate([self.policy_engine, None if self._prefetch_reference else self.reference_engine],
                                     self.chunks)
            t0 = time.perf_counter()
            loss_name = self._loss_name()
            results = self._updates(batch, cfg.trainer.updates_per_step, loss_name)
            m["time/train"] = time.perf_counter() - t0
            self._guard(results)
            m.update(self._update_metrics(results))
            m["time/sync"] = self.sync_policy_engine()
            self.state.step = step
            m["time/step"] = time.perf_counter() - t_step
            m["tokens_per_s"] = m.get("rollout/tokens", 0.0) / m["time/step"] if self.is_rank0 else 0.0
            m["bad_steps"] = float(self.state.total_bad)
            m["rollout/engine_restarts"] = float(self.state.engine_restarts)
            if self.is_rank0:
                self.metrics.log(step, m)
                self._progress(bar, step, m)
            if cfg.trainer.eval_every > 0 and step % cfg.trainer.eval_every == 0:
                self._log_eval(step)
            stopping = _broadcast_object(stop.requested if self.is_rank0 else None) or stop.requested
            if (cfg.checkpoint.save_every > 0 and step % cfg.checkpoint.save_every == 0) or stopping or step == total:
                self.save_checkpoint()
            if stopping:
                log.warning("stop signal received: checkpoint at step %d saved, exiting (code %d)", step, EXIT_STOPPED)
                return EXIT_STOPPED
        if bar is not None:
            bar.close()
        return EXIT_OK

    def _collect_with_restart(self, step: int) -> tuple[RolloutBatch, dict]:
        """Collective: rank 0 collects the step's rollouts; a failed engine is restarted once, then the run stops."""
        from aapo_megatron.trainer.rollout import EngineFailure

        prompts = None
        if self.is_rank0:
            idx = self.sampler.next_batch(self.cfg.data.prompts_per_step)
            prompts = [self.train_set[i] for i in idx]
        for attempt in (1, 2):
            message: Any = None
            metrics: dict = {}
            if self.is_rank0:
                try:
                    message, metrics = self.collector.collect(prompts, step)
                except EngineFailure as exc:
                    message = ("restart", str(exc)) if attempt == 1 else ("fail", str(exc))
            message = _broadcast_object(message)
            if isinstance(message, RolloutBatch):
                return message, metrics
            kind, text = message
            if kind == "fail":
                raise TrainingError(f"{text} (again, after one restart); giving up. Check the engine log above "
                                    f"(out of memory? rollout.memory_fraction={self.cfg.rollout.memory_fraction})")
            log.warning("%s; restarting the rollout engines once", text)
            if self.is_rank0:
                self._restart_engines()
                self.state.engine_restarts += 1
            self.sync_policy_engine()  # the new policy engine starts from hf_init: give it the current weights
        raise AssertionError("unreachable")

    def _restart_engines(self) -> None:
        """Rank 0: close both engines and start them again from the run's starting checkpoint (placement=server:
        connect again, which checks that the servers answer)."""
        self.collector.discard_prefetch(timeout=PREFETCH_CLOSE_TIMEOUT_S)  # it may be running on an engine closed here
        for engine in (self.policy_engine, self.reference_engine):
            if engine is not None:
                try:
                    engine.close()
                except Exception as exc:  # noqa: BLE001 - it is already broken
                    log.warning("closing the failed engine: %s", exc)
        hf_init = os.path.join(self.run_dir, HF_INIT_DIR)
        with _usr1_blocked_in_children():
            self.policy_engine, self.reference_engine = self._open_engines(hf_init, self.reference_engine is not None)
        self.collector.policy, self.collector.reference = self.policy_engine, self.reference_engine

    def _loss_name(self) -> str:
        from aapo_megatron.trainer.losses import loss_name_for

        return loss_name_for(self.cfg.algorithm)

    def _progress(self, bar, step: int, m: dict) -> None:
        text = (f"reward {m.get('reward/mean', float('nan')):.3f}  loss {m.get('loss', float('nan')):.4f}  "
                f"|A| {m.get('adv/mean_abs_advantage', float('nan')):.3f}  {m['time/step']:.1f}s/step")
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update(1)
        else:
            done = step / self.cfg.trainer.steps
            log.info("step %d/%d (%.0f%%)  %s", step, self.cfg.trainer.steps, 100 * done, text)

    def _finish(self) -> None:
        if not self.is_rank0:
            return
        hist = [r for r in self.metrics.history if r.get("step", 0) >= 0]
        print("\n" + summary_table(hist, SUMMARY_KEYS), file=sys.stderr)
        if self.cfg.logging.plots:
            path = write_plots(self.run_dir, hist, ["reward/mean", "reward/ref_mean", "train/accuracy", "eval/accuracy",
                                                    "adv/zero_variance_group_fraction", "loss"])
            if path:
                log.info("plots: %s", path)
        evals = [r["eval/accuracy"] for r in hist if "eval/accuracy" in r]
        if len(evals) >= 2:
            log.info("held-out accuracy: %.4f before RL -> %.4f after", evals[0], evals[-1])
            with open(os.path.join(self.run_dir, "summary.json"), "w") as fh:
                json.dump({"eval_accuracy_before": evals[0], "eval_accuracy_after": evals[-1],
                           "steps": self.state.step}, fh, indent=1)

    def close(self) -> None:
        """Stop engines and workers, close writers, tear down process groups (safe after errors)."""
        from aapo_megatron.models.parallel import teardown_distributed

        if self.collector is not None and not self.collector.wait_prefetch(timeout=PREFETCH_CLOSE_TIMEOUT_S):
            log.warning("shutdown: the reference prefetch did not finish within %.0f s; closing its engine anyway",
                        PREFETCH_CLOSE_TIMEOUT_S)
        for obj in (self.policy_engine, self.reference_engine, self.reward_pool, self.metrics):
            if obj is not None:
                try:
                    obj.close()
                except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                    log.warning("shutdown: %s", exc)
        teardown_distributed()


def run_training(cfg: Config) -> int:
    """Entry point of aapo-train: returns the process exit code."""
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
    except (TrainingError, CheckpointError) as exc:
        print(f"aapo-train: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if job is not None:
            job.close()
