"""Built-in reward functions: accuracy, format, cosine_length, reasoning_gym. Each maps one RewardInput to a float."""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from aapo_megatron.rewards.extract import MARKED_EXTRACTORS, extract_with
from aapo_megatron.rewards.registry import RewardError, RewardInput, register_reward


@register_reward("accuracy")
def accuracy(x: RewardInput) -> float:
    """1.0 if the final answer (tag or last \\boxed{}) equals sample["answer"] under math-verify, else 0.0.

    NaN when the sample has no parseable ground truth.
    """
    return x.correct()


@functools.lru_cache(maxsize=8)
def _think_answer_pattern(tag: str) -> re.Pattern:
    return re.compile(rf"<think>\n.*?\n</think>\n<{tag}>\n.*?\n</{tag}>\s*", flags=re.DOTALL)


@register_reward("format")
def format_reward(x: RewardInput) -> float:
    """1.0 if the completion has the paper's <think>...</think> then answer structure (reward.format_style), else 0.0."""
    if x.cfg.format_style == "marked_answer":
        # instruct models: the answer sits in a \\boxed{} or an answer tag (whichever answer_extractors names).
        marked = [n for n in (x.cfg.answer_extractors or MARKED_EXTRACTORS) if n in MARKED_EXTRACTORS]
        return 1.0 if any(extract_with(x.completion, n, x.cfg.answer_tag) is not None for n in marked) else 0.0
    if x.cfg.format_style == "think_close":
        # open-rs: the chat template opens <think>; the completion must close it exactly once.
        return 1.0 if x.completion.count("\n</think>\n") == 1 else 0.0
    tag = x.cfg.answer_tag or "answer"
    return 1.0 if _think_answer_pattern(tag).fullmatch(x.completion) else 0.0


def cosine_length_value(correct: bool, length: float, cfg: Any) -> float:
    """The open-rs cosine curve at `length` (chars or tokens).

    Correct answers fall from max_value_correct (length 0) to min_value_correct (max_len); wrong ones go
    from min_value_wrong (length 0) to max_value_wrong (max_len).
    """
    progress = length / cfg.cosine_max_len
    if cfg.cosine_clip_length:
        progress = min(max(progress, 0.0), 1.0)
    if correct:
        at_zero, at_end = cfg.cosine_max_value_correct, cfg.cosine_min_value_correct
    else:
        at_zero, at_end = cfg.cosine_min_value_wrong, cfg.cosine_max_value_wrong
    return at_end + 0.5 * (at_zero - at_end) * (1.0 + math.cos(progress * math.pi))


@register_reward("cosine_length")
def cosine_length(x: RewardInput) -> float:
    """Length-aware correctness (open-rs "cosine"): short correct answers score highest; NaN without a parseable answer."""
    correct = x.correct()
    if math.isnan(correct):
        return math.nan
    if x.cfg.cosine_length_unit == "tokens":
        if x.num_tokens is None:
            raise RewardError("cosine_length with reward.cosine_length_unit=tokens needs num_tokens from RewardPool.score")
        length = float(x.num_tokens)
    else:
        length = float(len(x.completion))
    return cosine_length_value(correct == 1.0, length, x.cfg)


@functools.lru_cache(maxsize=16)
def _gym_dataset(task: str, args_json: str) -> Any:
    import reasoning_gym

    args = json.loads(args_json)
    args.pop("size", None)
    args.pop("seed", None)
    return reasoning_gym.create_dataset(task, size=1, seed=0, **args)


@register_reward("reasoning_gym")
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
