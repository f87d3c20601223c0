"""The memory plan: bytes per device for a run, before anything is built (`aapo-train --plan`).

For each pipeline stage it counts, on one device of that stage:
- weights, gradients (Megatron's DDP buffer, fp32) and Adam state (fp32 moments, plus fp32 main weights
  for bf16 parameters; sharded over DP by the distributed optimizer on GPU);
- activations kept for backward, times the micro-batches the 1F1B schedule keeps in flight on that stage
  (min(PP - stage, micro-batches)), with sequence parallel and activation recompute;
- the logits (the fused log-prob op keeps them and computes their gradient in place);
- the frozen Megatron reference model's weights, when the run builds one (none when offloaded to the host);
- colocated vLLM engines: each takes `rollout.memory_fraction` of the device (vLLM's budget for its
  weights and KV cache); on GPU they sleep while Megatron trains, so the device is planned twice: training
  (engines asleep) and generation (engines awake, Megatron's weights, gradients and optimizer resident).
  An engine's own weights on one of its GPUs (all parameters / `rollout.tensor_parallel_size`, in the
  rollout dtype) must fit inside that budget, or the plan does not fit (`engine_weights_problem`);
- on GPU, a fixed reserve for the CUDA context, communicator buffers and allocator slack (`plan.reserve_gb`).

The activation model counts, per token and layer, the tensors autograd saves in our layer specs (measured
with saved-tensor hooks, tests/trainer/test_memory_plan.py). Local spec (CPU): RMSNorm keeps its input and
its normalised output (2H each norm), each linear its input (H, or F for fc2), attention the roped q and k,
the qkv buffer (v is a view of it), its output and a float mask row per token (S elements); SwiGLU keeps
fc1's output (2F), silu(gate) and the product (F each). Transformer Engine (GPU) fuses the norm into the
next linear and the activation, so it keeps less; its figures follow TE's saved tensors by reading, not by
measurement. Units: bytes; T tokens per micro-batch; H hidden; q, kv the query and key/value widths; F ffn.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from aapo_megatron.config import Config, ConfigError
from aapo_megatron.distributed import current_platform
from aapo_megatron.dtypes import DTYPE_BYTES
from aapo_megatron.models.arch import ArchSpec

GIB = 1024**3


@dataclass(frozen=True)
class PlanItem:
    """One line of the plan: what it is, its bytes on one device, how it was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class StagePlan:
    """The items on one device of one pipeline stage, in the phase where the device is fullest."""

    stage: int
    items: list[PlanItem] = field(default_factory=list)
    phase: str = "training"
    other_phase_total: Optional[int] = None  # the other phase's total, when colocated engines make two

    @property
    def total(self) -> int:
        """Sum of the items, bytes."""
        return sum(i.bytes for i in self.items)


@dataclass
class MemoryPlan:
    """Per-stage plans against the device capacity."""

    capacity: int
    capacity_source: str
    stages: list[StagePlan]
    layout: str
    problem: Optional[str] = None
    """Why the plan cannot work whatever the totals (a colocated engine's weights over its budget), or None."""

    @property
    def worst(self) -> StagePlan:
        """The stage whose device holds the most."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        """Whether every device's total is within its capacity (and there is no `problem`)."""
        return self.problem is None and self.worst.total <= self.capacity

    def largest(self, n: int = 3) -> list[PlanItem]:
        """The n largest items of the fullest device."""
        return sorted(self.worst.items, key=lambda i: -i.bytes)[:n]

    def table(self) -> str:
        """The plan as a printable table (the fullest stage itemised, one total per stage)."""
        worst = self.worst
        lines = [f"memory plan ({self.layout}); device capacity {self.capacity / GIB:.1f} GiB ({self.capacity_source})",
                 f"  stage {worst.stage} (the fullest device), {worst.phase} phase:",
                 f"    {'item':<34}{'GiB':>9}  how"]
        for item in worst.items:
            lines.append(f"    {item.name:<34}{item.bytes / GIB:>9.2f}  {item.note}")
        lines.append(f"    {'total':<34}{worst.total / GIB:>9.2f}  {100 * worst.total / self.capacity:.0f}% of the device")
        if worst.other_phase_total is not None:
            other = "training" if worst.phase == "generation" else "generation"
            lines.append(f"    ({other} phase: {worst.other_phase_total / GIB:.2f} GiB)")
        if len(self.stages) > 1:
            lines.append("  per stage: " + ", ".join(f"{s.stage}: {s.total / GIB:.2f} GiB" for s in self.stages))
        if self.problem is not None:
            lines.append(f"  DOES NOT FIT: {self.problem}")
        else:
            lines.append("  fits" if self.fits else
                         f"  DOES NOT FIT: {worst.total / GIB:.2f} GiB > {self.capacity / GIB:.2f} GiB")
        return "\n".join(lines)


# --------------------------------------------------------------------------- counting


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Transformer layers per pipeline stage (Megatron splits them evenly; PP divides L)."""
    return [num_layers // pp] * pp


def stage_parameters(spec: ArchSpec, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one TP rank of `stage` (embedding on the first stage, output layer on the last)."""
    h, f, q, kv = spec.hidden_size, spec.ffn_hidden_size, spec.q_size, spec.kv_size
    per_layer = (h * (q + 2 * kv) + q * h + h * 2 * f + f * h) // tp + 2 * h
    if spec.qkv_bias:
        per_layer += (q + 2 * kv) // tp
    if spec.qk_norm:
        per_layer += 2 * spec.head_dim
    n = per_layer * stage_layers(spec.num_layers, pp)[stage]
    vocab_rows = spec.padded_vocab_size(tp) // tp
    if stage == 0:
        n += vocab_rows * h
    if stage == pp - 1:
        n += h  # final norm
        if not spec.tie_word_embeddings or pp > 1:  # tied with PP > 1: the last stage keeps its own copy
            n += vocab_rows * h
    return n


def layer_activation_elements(spec: ArchSpec, tokens: int, row_len: int, tp: int, sequence_parallel: bool,
                              te: bool, modules: tuple[str, ...] = ()) -> int:
    """Elements one transformer layer keeps for backward over `tokens` tokens (see the module docstring);
    `modules`: what selective recompute rebuilds in backward (core_attn, mlp)."""
    h, f, q, kv = spec.hidden_size, spec.ffn_hidden_size, spec.q_size, spec.kv_size
    h_share = h // tp if sequence_parallel else h  # norm outputs and linear inputs are sequence-sharded with SP
    if te:
        hidden, attn, mlp, mask = 4 * h_share, (3 * q + 3 * kv) // tp, 3 * f // tp, 0
    else:
        hidden, attn, mlp, mask = 6 * h_share, (3 * q + 3 * kv) // tp, 5 * f // tp, row_len
    if "core_attn" in modules:  # its mask and internals are rebuilt; q, k, v (its inputs) and its output stay
        mask = 0
    if "mlp" in modules:  # only the MLP's input (the norm output, counted in `hidden`) stays
        mlp = 0
    return tokens * (hidden + attn + mlp + mask)


def activation_bytes(cfg: Config, spec: ArchSpec, stage: int, layers: int, in_flight: int, act_bytes: int,
                     te: bool) -> tuple[int, int]:
    """(transformer activations, logits) bytes on one device of `stage` at the schedule's peak."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    t = cfg.trainer
    sp = bool(cfg.parallel.sequence_parallel) and tp > 1
    tokens = t.micro_batch_tokens
    row_len = min(tokens, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    h_share = spec.hidden_size // tp if sp else spec.hidden_size
    modules = tuple(t.recompute_modules) if t.recompute == "selective" else ()
    one_layer = layer_activation_elements(spec, tokens, row_len, tp, sp, te, modules)
    rebuilt = 0
    if t.recompute == "full":  # a recomputed unit keeps only its input; backward rebuilds one unit at a time
        unit = min(t.recompute_num_layers, layers)
        if t.recompute_method == "uniform":
            per_micro, rebuilt = math.ceil(layers / unit) * tokens * h_share, unit * one_layer
        else:  # block: the first `unit` layers are recomputed, the others keep everything
            per_micro, rebuilt = tokens * h_share + (layers - unit) * one_layer, unit * one_layer
    else:
        per_micro = layers * one_layer
    logits = 0
    if stage == pp - 1:
        per_micro += tokens * 3 * h_share  # final norm (input, output) and the output layer's input
        logits = tokens * (spec.padded_vocab_size(tp) // tp) * act_bytes
    return (per_micro * in_flight + rebuilt) * act_bytes, logits


def micro_batches_per_update(cfg: Config, dp: int) -> int:
    """Micro-batches one DP rank runs per optimizer update, at most (every sequence at full length)."""
    seqs = cfg.data.prompts_per_step * cfg.rollout.num_generations // max(1, cfg.trainer.updates_per_step)
    tokens = math.ceil(seqs / dp) * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    return max(1, math.ceil(tokens / cfg.trainer.micro_batch_tokens))


def colocated_engines(cfg: Config) -> int:
    """vLLM engines that share rank 0's device (0 with rollout servers)."""
    if cfg.rollout.placement != "colocated":
        return 0
    if cfg.trainer.mode == "sft":
        return 0
    from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS

    return 1 + int(ADVANTAGE_ESTIMATORS.get(cfg.algorithm.name).uses_reference)


def engine_weights_problem(cfg: Config, spec: ArchSpec, capacity: int, cuda: bool) -> Optional[str]:
    """None when one colocated engine's weights on one of its devices (every parameter / rollout TP, in the
    rollout dtype) fit in its `rollout.memory_fraction` x `capacity` bytes; else why, naming the keys."""
    if not colocated_engines(cfg):
        return None
    tp, fraction = cfg.rollout.tensor_parallel_size, cfg.rollout.memory_fraction
    name = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else ("bfloat16" if cuda else "float32")
    params = stage_parameters(spec, 1, 1, 0)
    need, budget = params * DTYPE_BYTES[name] // tp, int(fraction * capacity)
    if need < budget:
        return None
    least = math.ceil(params * DTYPE_BYTES[name] / budget)
    return (f"'rollout.tensor_parallel_size' = {tp}: each colocated vLLM engine holds {need / GIB:.1f} GiB of "
            f"weights per device ({params / 1e9:.1f}B params x {DTYPE_BYTES[name]} B ({name}) / {tp}), not less "
            f"than its budget of rollout.memory_fraction={fraction:g} x {capacity / GIB:.1f} GiB = "
            f"{budget / GIB:.1f} GiB (weights and KV cache): raise rollout.tensor_parallel_size (to at least "
            f"{least} at this memory_fraction) or rollout.memory_fraction (over {need / capacity:.2f} at this TP, "
            f"with room left for the KV cache)")


def plan_memory(cfg: Config, spec: ArchSpec, world_size: Optional[int] = None, capacity: Optional[int] = None,
                cuda: Optional[bool] = None) -> MemoryPlan:
    """The memory plan of `cfg` for model `spec` on `world_size` ranks (default TP x PP, i.e. DP = 1)."""
    import torch

    if cuda is None:
        cuda = current_platform().cuda if cfg.plan.platform == "auto" else cfg.plan.platform == "gpu"
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = world_size or tp * pp
    dp = max(1, world // (tp * pp))
    source = "plan.device_memory_gb"
    if capacity is None:
        if cuda and current_platform().cuda:
            capacity, source = torch.cuda.get_device_properties(0).total_memory, "read from the device"
        else:
            capacity = int(cfg.plan.device_memory_gb * GIB)
    from aapo_megatron.models.gpt import resolve_dtype
    from aapo_megatron.trainer.reference import needs_reference

    dtype = resolve_dtype(cfg.model.dtype)
    pbytes = torch.finfo(dtype).bits // 8
    te = cuda  # Transformer Engine spec on GPU, the local spec on CPU
    dist_opt = cuda and dp > 1
    m = micro_batches_per_update(cfg, dp)
    engines = colocated_engines(cfg)
    sleeping = cuda  # colocated GPU engines sleep while Megatron trains (vLLM's sleep is a no-op on CPU)
    stages = []
    for stage in range(pp):
        n = stage_parameters(spec, tp, pp, stage)
        in_flight = min(pp - stage, m)
        acts, logits = activation_bytes(cfg, spec, stage, stage_layers(spec.num_layers, pp)[stage], in_flight,
                                        pbytes, te)
        opt_per_param = 8 + (4 if pbytes < 4 else 0)
        items = [
            PlanItem("weights", n * pbytes, f"{n / 1e6:.1f}M params x {pbytes} B"),
            PlanItem("gradients (DDP buffer, fp32)", n * 4, "grad_reduce_in_fp32"),
            PlanItem("optimizer (Adam)", n * opt_per_param // (dp if dist_opt else 1),
                     f"{opt_per_param} B/param" + (f" / DP={dp} (distributed optimizer)" if dist_opt else "")),
            PlanItem("activations", acts, f"{in_flight} micro-batch(es) in flight of {m}, "
                                          f"{cfg.trainer.micro_batch_tokens} tokens, {'TE' if te else 'local'} spec"
                                          + (", SP" if cfg.parallel.sequence_parallel and tp > 1 else "")
                                          + f", recompute {cfg.trainer.recompute}"),
        ]
        if logits:
            items.append(PlanItem("logits + log-prob buffers", logits, "[T, V/tp], gradient in place"))
        if needs_reference(cfg):
            offloaded = cuda and cfg.trainer.offload_reference
            items.append(PlanItem("Megatron reference model", 0 if offloaded else n * pbytes,
                                  "in host memory between forwards (trainer.offload_reference)" if offloaded
                                  else "frozen copy of the weights (kl_beta > 0 or reference_kl)"))
        if engines and stage == 0:
            share = int(engines * cfg.rollout.memory_fraction * capacity)
            items.append(PlanItem(f"vLLM engines x{engines} (colocated)", 0 if sleeping else share,
                                  "asleep while training (awake: " f"{share / GIB:.1f} GiB)" if sleeping
                                  else f"{engines} x rollout.memory_fraction={cfg.rollout.memory_fraction}"))
        if cuda and cfg.plan.reserve_gb:
            items.append(PlanItem("runtime reserve", int(cfg.plan.reserve_gb * GIB), "plan.reserve_gb"))
        stages.append(StagePlan(stage, items))
        if engines and stage == 0 and sleeping:  # generation: engines awake, Megatron keeps only its state
            awake = [i for i in items if i.name not in ("activations", "logits + log-prob buffers")]
            awake = [PlanItem(i.name, int(engines * cfg.rollout.memory_fraction * capacity), "awake, generating")
                     if i.name.startswith("vLLM") else i for i in awake]
            gen = StagePlan(stage, awake, phase="generation", other_phase_total=stages[-1].total)
            stages[-1].other_phase_total = gen.total
            if gen.total > stages[-1].total:
                stages[-1] = gen
    layout = f"TP={tp} PP={pp} DP={dp}, {dtype}".replace("torch.", "")
    return MemoryPlan(capacity=capacity, capacity_source=source, stages=stages, layout=layout,
                      problem=engine_weights_problem(cfg, spec, capacity, cuda))


def arch_for_plan(cfg: Config) -> ArchSpec:
    """The model's ArchSpec without loading weights: model.path's config, plan.hf_config while model.path does not
    exist yet, or the scratch model when model.path is unset."""
    path = cfg.model.path
    if path is None:
        return ArchSpec.from_scratch(cfg.model.scratch)
    if os.path.exists(path):
        from aapo_megatron.checkpoint.mcore import is_mcore_checkpoint, read_arch

        return read_arch(path) if is_mcore_checkpoint(path) else ArchSpec.from_hf_dir(path)
    if cfg.plan.hf_config is None:
        raise ConfigError(f"'model.path' {path} does not exist, so the memory plan cannot read the model's "
                          f"architecture; set plan.hf_config to its config.json to plan before it exists")
    try:
        with open(cfg.plan.hf_config) as fh:
            return ArchSpec.from_hf_config(json.load(fh))
    except OSError as exc:
        raise ConfigError(f"'plan.hf_config': cannot read {cfg.plan.hf_config}: {exc.strerror}") from exc


def launch_world_size() -> Optional[int]:
    """Ranks of this launch, from torchrun's or Slurm's environment (None when neither says)."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def check_plan(cfg: Config, world_size: Optional[int] = None) -> MemoryPlan:
    """The run's plan; raise ConfigError naming the largest items when it does not fit."""
    plan = plan_memory(cfg, arch_for_plan(cfg), world_size or launch_world_size())
    if plan.problem is not None:
        raise ConfigError(f"the memory plan does not fit: {plan.problem} (see `aapo-train --plan`)")
    if not plan.fits:
        worst = plan.worst
        big = ", ".join(f"{i.name} {i.bytes / GIB:.1f} GiB" for i in plan.largest())
        raise ConfigError(f"the memory plan does not fit: stage {worst.stage} needs {worst.total / GIB:.1f} GiB of "
                          f"{plan.capacity / GIB:.1f} GiB ({plan.capacity_source}); largest: {big}. Lower "
                          f"trainer.micro_batch_tokens, turn on parallel.sequence_parallel or trainer.recompute, "
                          f"raise TP/PP, or lower rollout.memory_fraction (see `aapo-train --plan`)")
    return plan
