"""The run configuration's schema: nested dataclasses, one per section, every field with a docstring.

Field docstrings (the string literal under each field, in the style of torchtitan's job config) are read back
by `describe()` for `aapo-train --help-config`. Names of algorithms, losses, architectures and reward functions
are plain strings here: `aapo_megatron.validation` checks them against their registries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional


# --------------------------------------------------------------------------- sections


@dataclass
class ScratchModelConfig:
    """Architecture of a model trained from scratch (the CPU quickstart); ignored when `model.path` is set."""

    architecture: str = "llama"
    """HF architecture family whose config is synthesised (a registered model family: llama, qwen2, qwen3)."""
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
    """Advantage estimator and policy loss (docs/algorithms.md)."""

    name: str = "aapo"
    """Advantage estimator, a registered name: aapo (paper), grpo / dr_grpo / rloo (baselines). A supervised-only
    run is trainer.mode=sft."""
    loss: Optional[str] = None
    """Policy loss, a registered name (aapo_ce, grpo_clip, sft_ce); None picks the estimator's default loss."""
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
    """How token losses are averaged over an update: token_mean (over every token), group_token_mean (token mean inside each prompt group, then the mean over groups: the authors' code), constant (token sum / (rollout.max_new_tokens x sequences): Dr. GRPO). None = the estimator's default (constant for dr_grpo, else token_mean; docs/algorithms.md)."""


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
    backend: str = "vllm"
    """The engine that generates inside the job (placement=colocated): a backend registered in rollout/backends.py (vllm)."""
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
    num_workers: int = 2
    """Reward worker processes."""
    timeout_s: float = 10.0
    """Per-sample reward timeout, seconds. A worker still busy after it is killed and replaced."""
    on_failure: Literal["nan", "zero"] = "zero"
    """Reward given to a sample whose reward timed out or crashed."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-function options, under their function: reward.options.<function>.<key>, e.g. reward.options.format.style=marked_answer, reward.options.cosine_length.max_len=400. Each function declares its own (rewards/functions.py; docs/rewards_and_data.md lists them)."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "format_style": "options.format.style",
        **{f"cosine_{k}": f"options.cosine_length.{k}" for k in (
            "min_value_wrong", "max_value_wrong", "min_value_correct", "max_value_correct", "max_len",
            "length_unit", "clip_length")},
    }
    """Old flat keys -> where they live now (the loader names the new key in its error)."""


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

    mode: Literal["rl", "sft"] = "rl"
    """rl: trainer.sft_steps of supervised warm start (if any), then RL; sft: only the trainer.sft_steps of SFT."""
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
    """Supervised warm-start steps before RL (trainer.mode=sft runs only these)."""
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

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)
