"""Reward function registry: name -> fn(RewardInput) -> float. Custom functions are "pkg.module:fn" paths.

The built-ins (rewards/functions.py) register themselves when `aapo_megatron.rewards` is imported; this module
imports none of them. A function registered with `measures_correctness=True` (1.0 = correct) is what the
trainer's eval and aapo-eval read as "is it correct".
"""

from __future__ import annotations

import difflib
import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from aapo_megatron.errors import AapoError
from aapo_megatron.rewards.extract import completion_answer, gold_answer

if TYPE_CHECKING:
    from aapo_megatron.config import RewardConfig


class RewardError(AapoError, RuntimeError):
    """A reward function or the reward pool cannot run (unknown function, worker that cannot start, bad inputs)."""


@dataclass
class RewardInput:
    """One completion to score: its text, the prompt's sample dict (answer, task metadata) and the reward config."""

    completion: str
    """Decoded completion text (no prompt)."""
    sample: Mapping[str, Any]
    """The prompt's data: "answer" (ground truth) and, for reasoning-gym prompts, "reasoning_gym"."""
    cfg: "RewardConfig"
    """Reward settings (answer tag, cosine curve...)."""
    num_tokens: Optional[int] = None
    """Completion length in tokens, when the caller knows it."""
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def options(self, name: str) -> Any:
        """Reward function `name`'s options: its declared dataclass, `reward.options.<name>` over the defaults
        (a custom function without a declared class gets its mapping as written). Memoised."""
        key = f"options:{name}"
        if key not in self._memo:
            self._memo[key] = build_options(name, self.cfg)
        return self._memo[key]

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
_CORRECTNESS: list[str] = []  # registration order = preference order
_OPTIONS: dict[str, type] = {}  # name -> the dataclass of its reward.options.<name>


def register_reward(name: str, *, measures_correctness: bool = False,
                    options: Optional[type] = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn(RewardInput) -> float` (NaN = does not apply) under `name`;
    measures_correctness: its 1.0 means "the answer is correct" (see `correctness_column`);
    options: a dataclass of the function's own settings, set as `reward.options.<name>.<field>` (its fields'
    docstrings document them; an optional `check(prefix)` method adds range checks)."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RewardError(f"reward function {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        if measures_correctness and name not in _CORRECTNESS:
            _CORRECTNESS.append(name)
        if options is not None:
            _OPTIONS[name] = options
        return fn

    return wrap


def options_class(name: str) -> Optional[type]:
    """The options dataclass registered with reward function `name`, or None (it takes none, or is custom)."""
    return _OPTIONS.get(name)


def build_options(name: str, cfg: "RewardConfig") -> Any:
    """`reward.options.<name>` as the function's options dataclass (defaults for what is unset); ConfigError naming
    the key for an unknown field or a bad value. A function without a registered class gets the mapping as is."""
    from aapo_megatron.config.loader import from_dict

    raw = (cfg.options or {}).get(name) or {}
    cls = options_class(name)
    if cls is None:
        return dict(raw)
    return from_dict(cls, raw, prefix=f"reward.options.{name}.")


def registered_rewards() -> list[str]:
    """Names of the built-in (and so far registered) reward functions, sorted."""
    return sorted(_REGISTRY)


def correctness_rewards() -> list[str]:
    """Registered functions that measure correctness, in preference order (accuracy before reasoning_gym)."""
    return list(_CORRECTNESS)


def correctness_column(names: Sequence[str]) -> Optional[int]:
    """Index in `names` of the preferred correctness function (1.0 = correct), or None if none is configured."""
    for preferred in _CORRECTNESS:
        if preferred in names:
            return list(names).index(preferred)
    return None


def resolve_reward(name: str) -> RewardFn:
    """The reward function for a config name: a registered name or "pkg.module:attr"."""
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
