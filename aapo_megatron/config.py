"""Run configuration: nested dataclasses, YAML loading, dotted overrides, validation.

Every field carries a docstring (the string literal under it), in the style of
torchtitan's job config. `describe()` reads them back for `aapo-train --help-config`.

    cfg = load_config("configs/quickstart_cpu.yaml", ["algorithm.delta_high=0.3"])

Errors are `ConfigError`s whose message names the offending key, e.g.
``unknown key 'algorithm.delta_hihg' (did you mean 'algorithm.delta_high'?)``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass
class ScratchModelConfig:
    """Architecture of a model trained from scratch (the CPU quickstart); ignored when `model.path` is set."""

    architecture: Literal["llama", "qwen2", "qwen3"] = "llama"
    """HF architecture family whose config is synthesised."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 2
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """KV heads (GQA); must divide num_attention_heads."""
    ffn_hidden_size: int = 352
    """SwiGLU inner width."""
    vocab_size: int = 512
    """Vocabulary size (the sentencepiece tokenizer is trained to this size)."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + completion) in tokens."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer."""


@dataclass
class ModelConfig:
    """Which model to train and how to build it."""

    path: Optional[str] = None
    """Starting checkpoint: an HF directory (config.json + safetensors) or a Megatron checkpoint from `aapo-convert`. None builds `scratch`."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or sentencepiece .model file; None uses `path`, or trains one when `data.train_tokenizer` is set."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter/compute dtype. auto = bfloat16 on GPU, float32 on CPU."""
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    """Architecture used when `path` is None."""


@dataclass
class ParallelConfig:
    """Megatron parallel layout. Data parallelism is world_size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP); must divide attention heads and KV heads."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP); must divide the number of layers."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1): norms, residuals and dropout hold S/tp tokens per TP rank."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    timeout_minutes: float = 30.0
    """Collective timeout, minutes."""


@dataclass
class AlgorithmConfig:
    """Advantage estimator and policy loss (DESIGN.md section 1)."""

    name: Literal["aapo", "grpo", "dr_grpo", "sft"] = "aapo"
    """Algorithm: aapo (paper), grpo / dr_grpo (baselines), sft (supervised warm start)."""
    loss: Optional[Literal["aapo_ce", "grpo_clip", "sft_ce"]] = None
    """Policy loss; None picks the algorithm's default (aapo -> aapo_ce, grpo/dr_grpo -> grpo_clip, sft -> sft_ce)."""
    scale_rewards: bool = True
    """Divide the group-centred reward by the group std (off for Dr. GRPO)."""
    eps: float = 1e-4
    """Added to the group std before dividing."""
    delta_low: float = 0.2
    """AAPO margin clamp below: margin >= -delta_low."""
    delta_high: float = 0.28
    """AAPO margin clamp above: margin <= +delta_high."""
    reference_pairing: Literal["paired", "group_mean"] = "paired"
    """Margin r_i - r'_i with the paired reference sample, or with the reference group mean."""
    reference_rollouts: Literal["fresh", "cached"] = "fresh"
    """Sample reference responses every step, or once per prompt and reuse them."""
    clip_eps_low: float = 0.2
    """grpo_clip: lower ratio clip (1 - eps_low)."""
    clip_eps_high: float = 0.2
    """grpo_clip: upper ratio clip (1 + eps_high); 0.28 is "clip-higher"."""
    kl_beta: float = 0.0
    """Weight of the k3 KL penalty to the frozen reference model's log-probs, in every policy loss (aapo_ce and
    grpo_clip). > 0 builds the Megatron reference (one more copy of the weights, one forward per step)."""
    reference_kl: bool = False
    """Build the frozen Megatron reference even with kl_beta = 0, only to log kl/reference (costs its memory)."""
    logprob_temperature: Literal["sampling", "raw"] = "sampling"
    """Log-probs of the loss, the KL and the mismatch metric: sampling = of softmax(logits / rollout.temperature), the distribution sampled from (TRL, the authors' code; vLLM returns processed logprobs); raw = of the logits as they are (T = 1)."""
    loss_aggregation: Optional[Literal["token_mean", "group_token_mean", "constant"]] = None
    """How token losses are averaged over an update: token_mean (over every token), group_token_mean (token mean inside each prompt group, then the mean over groups: the authors' code), constant (token sum / (rollout.max_new_tokens x sequences): Dr. GRPO). None = constant for dr_grpo, else token_mean (docs/algorithms.md)."""


@dataclass
class RolloutConfig:
    """Response generation with vLLM (policy: weight-synced; reference: frozen)."""

    num_generations: int = 6
    """Responses per prompt, G (the group size)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Top-k sampling; -1 disables."""
    max_new_tokens: int = 512
    """Longest completion, tokens."""
    seed: int = 0
    """Sampling seed (combined with the step so each step differs but resumes reproduce)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """vLLM dtype; auto follows model.dtype."""
    memory_fraction: float = 0.15
    """vLLM gpu_memory_utilization. On CPU this is the share of RAM for the KV cache."""
    placement: Literal["colocated", "server"] = "colocated"
    """Engines inside the job (colocated) or reached over HTTP (`aapo-rollout-server`)."""
    server_url: Optional[str] = None
    """Base URL of the policy rollout server when placement=server."""
    reference_server_url: Optional[str] = None
    """Base URL of the reference rollout server when placement=server."""
    token_env: str = "AAPO_ROLLOUT_TOKEN"
    """Environment variable holding the bearer token for the rollout server."""
    server_weight_dir: Optional[str] = None
    """placement=server: directory for weight-sync bucket files, inside the policy server's --weight-dir (the only directory it reads). None = the server's --weight-dir itself (/dev/shm by default), for servers on this host."""
    server_timeout_s: float = 600.0
    """placement=server: how long one HTTP request to a rollout server may take (a generate included), seconds."""
    weight_sync_bucket_mb: int = 512
    """Weight sync bucket size, MiB."""
    weight_sync_timeout_s: float = 600.0
    """A weight sync stage that takes longer than this fails with an error naming the stage, seconds."""
    weight_transport: str = "auto"
    """How weights reach the policy engine: auto, shm (this host's /dev/shm), ipc (CUDA IPC, colocated GPU engines), gloo (engines on other CPU hosts), nccl (engines on other GPUs/nodes). auto = shm on a CPU host, ipc for colocated GPU engines, nccl for servers on GPU, gloo for servers on other CPU hosts (docs/rollout.md)."""
    overlap_reference: bool = True
    """Generate the reference responses at the same time as the policy's (two engines). On CPU the colocated engines then get disjoint halves of the cores; false runs them one after the other on vLLM's default binding."""
    prefetch_reference: Literal["auto", "always", "never"] = "auto"
    """While a step trains, sample the next step's reference responses (AAPO). The reference is frozen and the next prompts and seed are known, so the samples are the ones the next step would draw. auto = when the reference engine has its own machine (placement=server); colocated on CPU it would take cores from the train step."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism of each colocated engine (policy and reference): ranks per engine, each on its own GPU (CPU: its own cores). Must divide the model's heads."""
    data_parallel_size: int = 1
    """Colocated engine replicas per role (policy and reference); the prompts of a batch are split across them and the samples equal one engine's. TP x DP must fit the job's GPUs on rank 0's node (CPU: its cores, x2 with overlap_reference). docs/rollout.md."""


@dataclass
class RewardConfig:
    """Reward functions and the worker pool that runs them."""

    functions: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    """Reward function name -> weight. Built in: accuracy, format, cosine_length, reasoning_gym; "pkg.module:fn" imports a custom one. Rewards combine as a NaN-ignoring weighted sum."""
    answer_tag: Optional[str] = None
    """Extract the answer from <tag>...</tag> instead of the last \\boxed{}."""
    answer_extractors: Optional[list[Literal["boxed", "tag", "last_number"]]] = None
    """Where the answer is read, tried in order, first hit wins: boxed = last \\boxed{}, tag = last <answer_tag> (default answer), last_number = the final number in the text (instruct models). None: tag when answer_tag is set, else boxed."""
    format_style: Literal["think_answer", "think_close", "marked_answer"] = "think_answer"
    """format: think_answer = the whole completion is <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer> (open-r1); think_close = exactly one "\\n</think>\\n" (open-rs, where the chat template opens <think>); marked_answer = the answer is marked by a boxed or tag extractor of answer_extractors (instruct models)."""
    num_workers: int = 2
    """Reward worker processes."""
    timeout_s: float = 10.0
    """Per-sample reward timeout, seconds. A worker still busy after it is killed and replaced."""
    on_failure: Literal["nan", "zero"] = "zero"
    """Reward given to a sample whose reward timed out or crashed."""
    cosine_min_value_wrong: float = 0.0
    """cosine_length: reward of a wrong answer at length 0 (open-rs default)."""
    cosine_max_value_wrong: float = -0.5
    """cosine_length: reward of a wrong answer at cosine_max_len (open-rs default)."""
    cosine_min_value_correct: float = 0.5
    """cosine_length: reward of a correct answer at cosine_max_len."""
    cosine_max_value_correct: float = 1.0
    """cosine_length: reward of a correct answer at length 0."""
    cosine_max_len: int = 1000
    """cosine_length: length where the curve ends, in cosine_length_unit."""
    cosine_length_unit: Literal["chars", "tokens"] = "chars"
    """cosine_length: measure completions in characters (open-rs) or completion tokens."""
    cosine_clip_length: bool = True
    """cosine_length: hold the reward at its cosine_max_len value beyond it; false reproduces open-rs, whose cosine keeps oscillating."""


@dataclass
class DataConfig:
    """Prompt data."""

    source: Literal["jsonl", "parquet", "reasoning_gym"] = "reasoning_gym"
    """Where prompts come from."""
    train_path: Optional[str] = None
    """Training prompts file (jsonl, gzip-compressed jsonl.gz / parquet)."""
    eval_path: Optional[str] = None
    """Held-out prompts file (jsonl, gzip-compressed jsonl.gz / parquet)."""
    prompt_key: str = "problem"
    """Column holding the question (problem / question / prompt); a dotted path reaches nested fields. Text or a list of chat messages."""
    answer_key: str = "answer"
    """Column holding the ground truth (answer / gt_answer / solution); \\boxed{} and GSM8K "#### x" forms are reduced to the answer."""
    reasoning_gym_task: str = "basic_arithmetic"
    """reasoning-gym generator name when source=reasoning_gym."""
    reasoning_gym_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reasoning-gym generator."""
    train_size: int = 2000
    """reasoning-gym: number of training problems generated."""
    eval_size: int = 200
    """reasoning-gym: number of held-out problems generated (none repeats a training question)."""
    prompts_per_step: int = 8
    """Prompts per RL step, B (each gets G responses)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (tokens) are skipped and counted."""
    system_prompt: Optional[str] = None
    """System prompt text, or a preset name (aapo_open_rs, aapo_open_r1: the paper's configs); None uses none."""
    chat_template: Optional[str] = None
    """None = the tokenizer's own template; "plain" joins system and user text; "raw" uses the prompt text as is (pre-templated data); else a Jinja template or a path to one."""
    train_tokenizer: bool = False
    """Train a sentencepiece tokenizer on the training prompts (tiny demo models)."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (a permutation fixed by seed and epoch)."""
    max_bad_row_reports: int = 5
    """Number of skipped rows reported individually (by row number) in the log."""
    seed: int = 1234
    """Shuffle / generation seed."""


@dataclass
class OptimConfig:
    """Optimizer and LR schedule."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Shape after warmup."""
    warmup_steps: int = 0
    """Linear warmup, optimizer updates."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class TrainerConfig:
    """The RL loop."""

    steps: int = 100
    """RL steps (each: rollouts, rewards, advantages, updates, weight sync)."""
    updates_per_step: int = 1
    """Optimizer updates per step (the rollouts are split into this many mini-batches)."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch (sequences are packed up to it)."""
    pack_sequences: bool = True
    """Pack several samples into each micro-batch row, attention kept within each sample, so padding costs
    no compute. Local layer spec (CPU) only: Transformer Engine's attention is causal-only, so TE runs pad."""
    pack_factor: int = 2
    """Longest packed row: this many times the step's longest sequence (at most micro_batch_tokens); the row
    length computing the fewest tokens among 1..pack_factor times is used."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (Megatron's recompute_granularity; see models/activation_memory.py)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """recompute=selective: what to recompute, of core_attn and mlp (Megatron's recompute_modules)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """recompute=full: uniform (every recompute_num_layers layers as a unit) or block (the first
    recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int = 1
    """recompute=full: layers per unit (uniform) or recomputed layers per stage (block)."""
    seed: int = 1234
    """Global seed."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps; 0 disables."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a NaN/inf loss or gradient."""
    sft_steps: int = 0
    """Supervised warm-start steps before RL (algorithm.name=sft runs only these)."""
    sft_lr: float = 1e-3
    """Learning rate of the SFT warm start (constant; RL uses optim.lr with a fresh optimizer)."""
    sft_batch_size: int = 32
    """Prompt/answer pairs per SFT step."""
    sft_target: str = "{answer}"
    """SFT completion text; {answer} is replaced by the ground truth (e.g. "<answer>{answer}</answer>")."""
    run_dir: str = "runs/default"
    """Output directory: metrics, plots, checkpoints."""
    offload_reference: bool = False
    """CUDA: keep the frozen reference model's weights in pinned host memory between its forwards (no-op on CPU)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    dir: Optional[str] = None
    """Checkpoint directory; None = <trainer.run_dir>/checkpoints."""
    save_every: int = 50
    """Save every N steps; 0 saves only at the end and on signals."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints."""
    resume: Optional[str] = None
    """None (fresh), "auto" (latest in dir if any) or a checkpoint path."""


@dataclass
class LoggingConfig:
    """Metrics outputs."""

    jsonl: bool = True
    """Write <run_dir>/metrics.jsonl."""
    tensorboard: bool = False
    """Write TensorBoard events to <run_dir>/tb."""
    wandb_project: Optional[str] = None
    """W&B project; None disables W&B."""
    plots: bool = True
    """Write reward/accuracy PNG plots to the run directory."""
    progress_bar: bool = True
    """Show a progress bar with ETA (disabled automatically without a TTY)."""


@dataclass
class PlanConfig:
    """The memory plan checked before a run starts (`aapo-train --plan` prints it)."""

    device_memory_gb: float = 80.0
    """Memory of one device, GiB, when there is no GPU to read it from."""
    reserve_gb: float = 3.0
    """Set aside per device for the CUDA context, communicator buffers and allocator slack, GiB."""
    hf_config: Optional[str] = None
    """config.json of the model, for planning before model.path exists (model.path's own config wins)."""
    enforce: bool = True
    """Refuse to start (exit 2) when the plan does not fit."""
    platform: Literal["auto", "gpu", "cpu"] = "auto"
    """Plan for GPUs (Transformer Engine spec, distributed optimizer) or the CPU path; auto = this machine."""


@dataclass
class Config:
    """Complete run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to train."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages and loss."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Rewards."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """RL loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Memory plan."""

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check ranges and cross-field constraints; raise ConfigError naming the key. Returns self."""
        validate(self, world_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: doc}."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flattened (dotted key, type, default, doc) for every leaf field."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, _type_name(tp), getattr(default, f.name), docs.get(f.name, "")))
    return rows


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from an optional YAML file plus `a.b=value` overrides, then validate ranges."""
    cfg = from_dict(Config, load_raw_config(path, overrides))
    validate(cfg)
    return cfg


def load_raw_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                    values: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The nested dict of an optional YAML file, then `a.b=value` overrides (values parsed as YAML), then
    `values` ({dotted key: value}, taken as is). Shared by every config class; `from_dict` types it."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`algorithm.delta_high=0.3` -> ("algorithm.delta_high", 0.3); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Construct dataclass `cls` from a nested dict, checking keys and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), cls, prefix))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    local = [prefix + f.name for f in dataclasses.fields(cls)]
    candidates = difflib.get_close_matches(key, local, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, _all_keys(Config), n=1, cutoff=0.6
    )
    # A bare leaf name in the wrong section: `delta_high` at top level -> algorithm.delta_high.
    leaf = key.rsplit(".", 1)[-1]
    if not candidates:
        candidates = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{candidates[0]}'?)" if candidates else ""
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"unknown key '{key}'{hint}; valid keys here: {valid}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; widen int -> float; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"'{key}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}{hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping ({_type_name(tp)}), got {value!r}")
        ktp, vtp = args
        return {_coerce(k, ktp, f"{key}.{k}"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported annotation {tp!r}")


# --------------------------------------------------------------------------- validation


def _check_weight_transport(r: "RolloutConfig") -> None:
    from aapo_megatron.rollout.transport.registry import CHOICES, check_transport, is_loopback_url

    _check(r.weight_transport in CHOICES, "rollout.weight_transport", f"must be one of {', '.join(CHOICES)}",
           r.weight_transport)
    if r.weight_transport != "auto":
        try:
            check_transport(r.weight_transport, placement=r.placement,
                            same_host=r.placement != "server" or is_loopback_url(r.server_url))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"'{key}' {msg}, got {value!r}")


def _positive(cfg: Any, section: str, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(v > 0, f"{section}.{name}", "must be > 0", v)


def _non_negative(cfg: Any, section: str, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(v >= 0, f"{section}.{name}", "must be >= 0", v)


def model_shape(cfg: Config) -> dict[str, int]:
    """Heads, KV heads and layers of the configured model (reads config.json when `model.path` is an HF dir)."""
    if cfg.model.path is None:
        s = cfg.model.scratch
        return {"num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads, "num_layers": s.num_layers}
    hf_cfg = os.path.join(cfg.model.path, "config.json")
    if not os.path.isfile(hf_cfg):
        return {}
    with open(hf_cfg) as fh:
        hf = json.load(fh)
    heads = hf.get("num_attention_heads")
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "num_layers": hf.get("num_hidden_layers"),
    }


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Range and cross-field checks. `world_size` (when known) must be divisible by TP*PP."""
    from aapo_megatron.config_checks import check_finite, check_upfront

    check_finite(cfg)  # inf / NaN anywhere (YAML .inf, --set x=nan), before the range checks below
    s = cfg.model.scratch
    _positive(s, "model.scratch", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
              "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rope_theta")
    _check(s.hidden_size % s.num_attention_heads == 0, "model.scratch.hidden_size",
           f"must be divisible by num_attention_heads={s.num_attention_heads}", s.hidden_size)
    _check(s.num_attention_heads % s.num_key_value_heads == 0, "model.scratch.num_key_value_heads",
           f"must divide num_attention_heads={s.num_attention_heads}", s.num_key_value_heads)

    p = cfg.parallel
    _positive(p, "parallel", "tensor_model_parallel_size", "pipeline_model_parallel_size", "timeout_minutes")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    shape = model_shape(cfg)
    if shape.get("num_attention_heads"):
        heads = shape["num_attention_heads"]
        _check(heads % tp == 0, "parallel.tensor_model_parallel_size",
               f"must divide the number of attention heads ({heads})", tp)
        kv = shape.get("num_key_value_heads") or heads
        _check(kv % tp == 0, "parallel.tensor_model_parallel_size",
               f"must divide the number of key/value heads ({kv})", tp)
    if shape.get("num_layers"):
        layers = shape["num_layers"]
        _check(layers % pp == 0, "parallel.pipeline_model_parallel_size",
               f"must divide the number of layers ({layers})", pp)
    if world_size is not None:
        _check(world_size % (tp * pp) == 0, "parallel",
               f"tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} must divide the world size "
               f"({world_size}); tp={tp}, pp={pp}", world_size)
    if p.sequence_parallel and tp == 1:
        raise ConfigError("'parallel.sequence_parallel' needs tensor_model_parallel_size > 1")

    a = cfg.algorithm
    _positive(a, "algorithm", "eps")
    _non_negative(a, "algorithm", "delta_low", "delta_high", "clip_eps_low", "clip_eps_high", "kl_beta")
    _check(a.clip_eps_low < 1, "algorithm.clip_eps_low", "must be < 1", a.clip_eps_low)

    r = cfg.rollout
    _positive(r, "rollout", "num_generations", "max_new_tokens", "weight_sync_bucket_mb", "weight_sync_timeout_s",
              "server_timeout_s", "tensor_parallel_size", "data_parallel_size")
    _non_negative(r, "rollout", "temperature")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    _check(r.top_k == -1 or r.top_k > 0, "rollout.top_k", "must be -1 (off) or > 0", r.top_k)
    _check(0 < r.memory_fraction < 1, "rollout.memory_fraction", "must be in (0, 1)", r.memory_fraction)
    if a.name in ("aapo", "grpo") and a.scale_rewards:
        _check(r.num_generations >= 2, "rollout.num_generations",
               f"must be >= 2 when algorithm.scale_rewards is on (the group std of one sample is undefined; "
               f"algorithm={a.name})", r.num_generations)
    if r.placement == "server" and not r.server_url:
        raise ConfigError("'rollout.server_url' is required when rollout.placement is 'server'")
    _check_weight_transport(r)
    from aapo_megatron.rollout.layout import check_layout

    check_layout(r, shape.get("num_attention_heads"), shape.get("num_key_value_heads"))

    w = cfg.reward
    _positive(w, "reward", "num_workers", "timeout_s", "cosine_max_len")
    if a.name != "sft":
        _check(len(w.functions) > 0, "reward.functions", "must name at least one reward function", w.functions)

    d = cfg.data
    _positive(d, "data", "prompts_per_step", "max_prompt_tokens", "train_size")
    _non_negative(d, "data", "eval_size")
    if d.source in ("jsonl", "parquet") and a.name != "sft" and cfg.trainer.steps > 0:
        _check(d.train_path is not None, "data.train_path", f"is required when data.source is '{d.source}'", d.train_path)

    o = cfg.optim
    _positive(o, "optim", "lr", "adam_eps")
    _non_negative(o, "optim", "min_lr", "warmup_steps", "weight_decay", "clip_grad")
    _check(0 <= o.adam_beta1 < 1, "optim.adam_beta1", "must be in [0, 1)", o.adam_beta1)
    _check(0 <= o.adam_beta2 < 1, "optim.adam_beta2", "must be in [0, 1)", o.adam_beta2)
    _check(o.min_lr <= o.lr, "optim.min_lr", f"must be <= optim.lr ({o.lr})", o.min_lr)

    t = cfg.trainer
    _non_negative(t, "trainer", "steps", "eval_every", "sft_steps")
    _positive(t, "trainer", "sft_lr", "sft_batch_size")
    _check("{answer}" in t.sft_target, "trainer.sft_target", "must contain the placeholder {answer}", t.sft_target)
    _positive(t, "trainer", "updates_per_step", "micro_batch_tokens", "max_bad_steps", "pack_factor")
    from aapo_megatron.models.activation_memory import validate_recompute

    validate_recompute(t, shape.get("num_layers"), pp)
    n_samples = d.prompts_per_step * r.num_generations
    _check(n_samples % t.updates_per_step == 0, "trainer.updates_per_step",
           f"must divide prompts_per_step * num_generations = {n_samples}", t.updates_per_step)

    c = cfg.checkpoint
    _non_negative(c, "checkpoint", "save_every")
    _positive(c, "checkpoint", "keep_last")
    _positive(cfg.plan, "plan", "device_memory_gb")
    _non_negative(cfg.plan, "plan", "reserve_gb")
    check_upfront(cfg)  # reward names against the registry, server placement with SFT


def dump_yaml(cfg: Config) -> str:
    """YAML text of a config (round-trips through load_config)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
