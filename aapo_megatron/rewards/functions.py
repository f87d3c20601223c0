"""Built-in reward functions: accuracy, format, cosine_length, reasoning_gym. Each maps one RewardInput to a float."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from aapo_megatron.rewards.extract import MARKED_EXTRACTORS, extract_with
from aapo_megatron.rewards.registry import RewardError, RewardInput, register_reward


@register_reward("accuracy", measures_correctness=True)
def accuracy(x: RewardInput) -> float:
    """1.0 if the final answer (tag or last \\boxed{}) equals sample["answer"] under math-verify, else 0.0.

    NaN when the sample has no parseable ground truth.
    """
    return x.correct()


@functools.lru_cache(maxsize=8)
def _think_answer_pattern(tag: str) -> re.Pattern:
    return re.compile(rf"<think>\n.*?\n</think>\n<{tag}>\n.*?\n</{tag}>\s*", flags=re.DOTALL)


@dataclass
class FormatOptions:
    """reward.options.format: which structure the format reward asks for."""

    style: Literal["think_answer", "think_close", "marked_answer"] = "think_answer"
    """think_answer = the whole completion is <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer> (open-r1); think_close = exactly one "\\n</think>\\n" (open-rs, where the chat template opens <think>); marked_answer = the answer is marked by a boxed or tag extractor of reward.answer_extractors (instruct models)."""


@register_reward("format", options=FormatOptions)
def format_reward(x: RewardInput) -> float:
    """1.0 if the completion has the paper's <think>...</think> then answer structure (reward.options.format.style), else 0.0."""
    style = x.options("format").style
    if style == "marked_answer":
        # instruct models: the answer sits in a \\boxed{} or an answer tag (whichever answer_extractors names).
        marked = [n for n in (x.cfg.answer_extractors or MARKED_EXTRACTORS) if n in MARKED_EXTRACTORS]
        return 1.0 if any(extract_with(x.completion, n, x.cfg.answer_tag) is not None for n in marked) else 0.0
    if style == "think_close":
        # open-rs: the chat template opens <think>; the completion must close it exactly once.
        return 1.0 if x.completion.count("\n</think>\n") == 1 else 0.0
    tag = x.cfg.answer_tag or "answer"
    return 1.0 if _think_answer_pattern(tag).fullmatch(x.completion) else 0.0


@dataclass
class CosineLengthOptions:
    """reward.options.cosine_length: the open-rs cosine curve (defaults: open-rs)."""

    min_value_wrong: float = 0.0
    """Reward of a wrong answer at length 0."""
    max_value_wrong: float = -0.5
    """Reward of a wrong answer at max_len."""
    min_value_correct: float = 0.5
    """Reward of a correct answer at max_len."""
    max_value_correct: float = 1.0
    """Reward of a correct answer at length 0."""
    max_len: int = 1000
    """Length where the curve ends, in length_unit."""
    length_unit: Literal["chars", "tokens"] = "chars"
    """Measure completions in characters (open-rs) or completion tokens."""
    clip_length: bool = True
    """Hold the reward at its max_len value beyond it; false reproduces open-rs, whose cosine keeps oscillating."""

    def check(self, prefix: str) -> None:
        """ConfigError for a curve that cannot be evaluated."""
        from aapo_megatron.config.checks import positive

        positive(self, prefix.rstrip("."), "max_len")


def cosine_length_value(correct: bool, length: float, o: CosineLengthOptions) -> float:
    """The open-rs cosine curve at `length` (chars or tokens).

    Correct answers fall from max_value_correct (length 0) to min_value_correct (max_len); wrong ones go
    from min_value_wrong (length 0) to max_value_wrong (max_len).
    """
    progress = length / o.max_len
    if o.clip_length:
        progress = min(max(progress, 0.0), 1.0)
    if correct:
        at_zero, at_end = o.max_value_correct, o.min_value_correct
    else:
        at_zero, at_end = o.min_value_wrong, o.max_value_wrong
    return at_end + 0.5 * (at_zero - at_end) * (1.0 + math.cos(progress * math.pi))


@register_reward("cosine_length", options=CosineLengthOptions)
def cosine_length(x: RewardInput) -> float:
    """Length-aware correctness (open-rs "cosine"): short correct answers score highest; NaN without a parseable answer."""
    correct = x.correct()
    if math.isnan(correct):
        return math.nan
    o = x.options("cosine_length")
    if o.length_unit == "tokens":
        if x.num_tokens is None:
            raise RewardError("cosine_length with reward.options.cosine_length.length_unit=tokens needs num_tokens "
                              "from RewardPool.score")
        length = float(x.num_tokens)
    else:
        length = float(len(x.completion))
    return cosine_length_value(correct == 1.0, length, o)


@functools.lru_cache(maxsize=16)
def _gym_dataset(task: str, args_json: str) -> Any:
    import reasoning_gym

    args = json.loads(args_json)
    args.pop("size", None)
    args.pop("seed", None)
    return reasoning_gym.create_dataset(task, size=1, seed=0, **args)


@register_reward("reasoning_gym", measures_correctness=True)
def reasoning_gym_reward(x: RewardInput) -> float:
    """The reasoning-gym task's own score_answer(answer, entry) in [0, 1]; NaN for prompts not from reasoning-gym."""
    meta = x.sample.get("reasoning_gym")
    if not meta:
        return math.nan
    dataset = _gym_dataset(meta["task"], json.dumps(meta.get("args") or {}, sort_keys=True))
    return float(dataset.score_answer(x.answer(), meta["entry"]))


def _warm_math_verify() -> None:
    from aapo_megatron.rewards.equivalence import math_equal

    math_equal("\\frac{1}{2}", "0.5")


def _import_reasoning_gym() -> None:
    import reasoning_gym  # noqa: F401  (slow first import: do it before the worker reports ready)


# Workers call `fn.warmup()` before reporting ready, so no sample's deadline pays for lazy imports.
accuracy.warmup = _warm_math_verify
cosine_length.warmup = _warm_math_verify
reasoning_gym_reward.warmup = _import_reasoning_gym
