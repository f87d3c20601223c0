"""Reward function registry: name -> fn(RewardInput) -> float. Custom functions are "pkg.module:fn" paths."""

from __future__ import annotations

import difflib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from aapo_megatron.config import RewardConfig
from aapo_megatron.rewards.extract import completion_answer, gold_answer


class RewardError(RuntimeError):
    """A reward function or the reward pool cannot run (unknown function, worker that cannot start, bad inputs)."""


@dataclass
class RewardInput:
    """One completion to score: its text, the prompt's sample dict (answer, task metadata) and the reward config."""

    completion: str
    """Decoded completion text (no prompt)."""
    sample: Mapping[str, Any]
    """The prompt's data: "answer" (ground truth) and, for reasoning-gym prompts, "reasoning_gym"."""
    cfg: RewardConfig
    """Reward settings (answer tag, cosine curve...)."""
    num_tokens: Optional[int] = None
    """Completion length in tokens, when the caller knows it."""
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def answer(self) -> Optional[str]:
        """The completion's final answer (reward.answer_extractors in order; default tag if set, else last \\boxed{}), or None."""
        if "answer" not in self._memo:
            self._memo["answer"] = completion_answer(self.completion, self.cfg.answer_tag,
                                                    self.cfg.answer_extractors)
        return self._memo["answer"]

    def correct(self) -> float:
        """1.0 / 0.0 by math-verify against sample["answer"]; NaN if the sample has no parseable answer. Memoised."""
        if "correct" not in self._memo:
            gold = self.sample.get("answer")
            if gold is None or not str(gold).strip():
                self._memo["correct"] = math.nan
            else:
                from aapo_megatron.rewards.equivalence import math_equal

                self._memo["correct"] = math_equal(self.answer(), gold_answer(gold))
        return self._memo["correct"]


RewardFn = Callable[[RewardInput], float]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn(RewardInput) -> float` (NaN = does not apply) under `name`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RewardError(f"reward function {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return wrap


def registered_rewards() -> list[str]:
    """Names of the built-in (and so far registered) reward functions, sorted."""
    import aapo_megatron.rewards.functions  # noqa: F401  (registers the built-ins)

    return sorted(_REGISTRY)


def resolve_reward(name: str) -> RewardFn:
    """The reward function for a config name: a registered name or "pkg.module:attr"."""
    import aapo_megatron.rewards.functions  # noqa: F401

    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardError(f"reward function {name!r}: cannot import module {module_name!r}: {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"reward function {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RewardError(
        f"unknown reward function {name!r}{hint}; registered: {', '.join(sorted(_REGISTRY))}, "
        f"or give a custom one as 'pkg.module:function'"
    )
