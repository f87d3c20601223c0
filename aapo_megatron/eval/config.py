"""`aapo-eval` configuration: nested dataclasses with per-field docs, loaded like the training config.

    cfg = load_eval_config("configs/eval/math.yaml", ["sampling.n=8", "sampling.temperature=0.6"])

The same loader as `aapo-train` (`config.load`): `--set key=value` overrides, errors naming the key, and a
did-you-mean drawn from this schema. The sampling ranges are the training rollout's (`config.checks.check_sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from aapo_megatron.config import ConfigError, RewardConfig, load  # noqa: F401  (ConfigError: re-exported)
from aapo_megatron.config.checks import check, check_finite, check_sampling


@dataclass
class EvalModelConfig:
    """What to evaluate."""

    path: Optional[str] = None
    """HF model directory, or a Megatron checkpoint: a trainer run dir (its latest checkpoint), a checkpoint root,
    one step_XXXXXXXX dir, or an aapo-convert output; Megatron checkpoints are converted to a temporary HF dir."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; default: the model's own (HF dir), or the run's hf_init / tokenizer dir."""
    hf_config: Optional[str] = None
    """config.json (or HF dir holding one) describing a Megatron checkpoint; default: found next to it (hf_init)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """vLLM compute dtype (auto: bfloat16 with CUDA, float32 on CPU)."""
    memory_fraction: float = 0.15
    """Share of device memory (RAM on CPU) for vLLM's KV cache."""
    kv_cache_mb: Optional[int] = None
    """KV cache size in MiB; overrides memory_fraction (small models on shared machines)."""
    max_model_len: Optional[int] = None
    """vLLM context length; default: the model's max_position_embeddings."""


@dataclass
class EvalDataConfig:
    """Benchmark files and how their columns map to prompt and answer."""

    files: list[str] = field(default_factory=list)
    """Benchmark files (.jsonl / .parquet), each optionally 'name=path'; the name defaults to the file stem."""
    layout: str = "auto"
    """Column layout: auto (detect from the columns), math500, aime24, amc23, minerva, olympiadbench, or custom."""
    prompt_key: Optional[str] = None
    """Prompt column (dotted paths reach into nested dicts); overrides the layout's."""
    answer_key: Optional[str] = None
    """Ground-truth column; overrides the layout's. List values (OlympiadBench final_answer) use the first element."""
    system_prompt: Optional[str] = None
    """System prompt text or a preset name (aapo_open_rs, aapo_open_r1); none by default."""
    chat_template: Optional[str] = None
    """'plain', 'raw', a Jinja template or a file; default: the tokenizer's own chat template."""
    max_prompt_tokens: int = 2048
    """Longer prompts are skipped (and counted in the summary)."""
    max_items: int = 0
    """Evaluate only the first N items of each benchmark (0 = all)."""


@dataclass
class EvalSamplingConfig:
    """How completions are sampled."""

    n: int = 1
    """Samples per item. 1 with temperature 0 is greedy pass@1; n > 1 gives pass@k (k <= n) and avg@n."""
    temperature: Optional[float] = None
    """Softmax temperature; default 0 (greedy) when n = 1, 0.6 when n > 1."""
    top_p: float = 0.95
    """Nucleus mass in (0, 1] (ignored when greedy)."""
    top_k: int = -1
    """Top-k; -1 disables (ignored when greedy)."""
    max_new_tokens: int = 1024
    """Longest completion, tokens."""
    seed: int = 0
    """Sampling seed; item i of a benchmark is sampled with a seed derived from (seed, benchmark, i)."""
    ks: list[int] = field(default_factory=list)
    """k values for pass@k; default 1, 2, 4, ... up to n."""


@dataclass
class EvalOutputConfig:
    """Where results go."""

    dir: Optional[str] = None
    """Output directory: responses.jsonl, summary.json, fingerprint.json (default eval_runs/<model name>)."""
    overwrite: bool = False
    """Discard existing results in dir (needed when the model, sampling or data changed since they were written)."""
    batch_size: int = 64
    """Items per generate call; each finished batch is appended to responses.jsonl (the unit of resume)."""
    progress_bar: bool = True
    """tqdm progress bar per benchmark on stderr (when stderr is a terminal)."""


@dataclass
class EvalConfig:
    """An aapo-eval job."""

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    """What to evaluate."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Benchmarks."""
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    """Decoding."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Answer checking (default: math-verify accuracy on the last \\boxed{}; answer_tag reads <tag>...</tag>)."""
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)
    """Results."""

    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.effective_temperature() == 0.0

    def effective_temperature(self) -> float:
        """sampling.temperature, or its default (0 for n = 1, 0.6 for n > 1)."""
        t = self.sampling.temperature
        return (0.0 if self.sampling.n == 1 else 0.6) if t is None else float(t)


def validate_eval_config(cfg: EvalConfig) -> EvalConfig:
    """Range checks; ConfigError naming the key. Returns cfg."""
    from aapo_megatron.validation import check_reward_names, check_reward_options

    check_finite(cfg)
    s = cfg.sampling
    check(s.n >= 1, "sampling.n", "must be >= 1", s.n)
    check_sampling("sampling", temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   max_new_tokens=s.max_new_tokens)
    check(not (s.n > 1 and cfg.effective_temperature() == 0.0), "sampling.n",
          "must be 1 with greedy decoding (sampling.temperature=0): n identical samples say nothing", s.n)
    for k in s.ks:
        check(1 <= k <= s.n, "sampling.ks", f"must hold values in [1, sampling.n={s.n}]", s.ks)
    check(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1", cfg.data.max_prompt_tokens)
    check(cfg.data.max_items >= 0, "data.max_items", "must be >= 0", cfg.data.max_items)
    check(cfg.output.batch_size >= 1, "output.batch_size", "must be >= 1", cfg.output.batch_size)
    check(0 < cfg.model.memory_fraction <= 1, "model.memory_fraction", "must be in (0, 1]", cfg.model.memory_fraction)
    check(cfg.reward.num_workers >= 1, "reward.num_workers", "must be >= 1", cfg.reward.num_workers)
    check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0", cfg.reward.timeout_s)
    check(bool(cfg.reward.functions), "reward.functions", "must name at least one reward function", cfg.reward.functions)
    check_reward_names(cfg.reward.functions)  # before the next check: a misspelling gets a did-you-mean
    check_reward_options(cfg.reward)
    from aapo_megatron.rewards.registry import correctness_column, correctness_rewards

    check(correctness_column(list(cfg.reward.functions)) is not None, "reward.functions",
          f"must include a correctness function ({' or '.join(correctness_rewards())}) to score answers",
          cfg.reward.functions)
    return cfg


def load_eval_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                     values: Optional[dict[str, Any]] = None) -> EvalConfig:
    """EvalConfig from an optional YAML file, dotted `key=value` overrides (YAML values), then `values`
    ({dotted key: value}, taken as is: command-line flags), validated."""
    return load(EvalConfig, path, overrides, values, validate=validate_eval_config)
