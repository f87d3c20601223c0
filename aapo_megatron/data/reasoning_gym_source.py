"""reasoning-gym prompts generated offline: train and held-out splits of a named task, deterministic by seed.

The train split is `create_dataset(task, size=train_size, seed=seed, **args)`. The held-out split is
drawn from the same task with a seed derived from `seed`, dropping any question that is also in the
train split (small tasks repeat questions) until `eval_size` remain.
"""

from __future__ import annotations

import json
from typing import Any

from aapo_megatron.config import DataConfig
from aapo_megatron.data.readers import DataError

_EVAL_SEED_OFFSET = 1_000_003
_MAX_EVAL_DRAWS = 20


def generate_reasoning_gym(task: str, args: dict[str, Any], size: int, seed: int) -> list[dict[str, Any]]:
    """`size` rows {"question", "answer", "reasoning_gym": {"task", "args", "entry"}} from a reasoning-gym task."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise DataError(f"unknown reasoning-gym task {task!r}{hint}; {len(DATASETS)} tasks are available")
    for reserved in ("size", "seed"):
        if reserved in args:
            raise DataError(
                f"data.reasoning_gym_args must not set {reserved!r}; use data.train_size/eval_size and data.seed"
            )
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **args)
    except (TypeError, AssertionError, ValueError) as exc:
        raise DataError(f"reasoning-gym task {task!r} rejected data.reasoning_gym_args={args!r}: {exc}") from None
    rows = []
    for i in range(size):
        entry = dataset[i]
        rows.append({
            "question": entry["question"],
            "answer": str(entry["answer"]),
            "reasoning_gym": {"task": task, "args": dict(args), "entry": entry},
        })
    return rows


def reasoning_gym_splits(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) for `cfg.reasoning_gym_task`; no held-out question appears in train."""
    task, args = cfg.reasoning_gym_task, dict(cfg.reasoning_gym_args)
    train = generate_reasoning_gym(task, args, cfg.train_size, cfg.seed)
    if cfg.eval_size == 0:
        return train, []
    seen = {r["question"] for r in train}
    held_out: list[dict[str, Any]] = []
    for draw in range(_MAX_EVAL_DRAWS):
        size = 2 * cfg.eval_size + 16
        for row in generate_reasoning_gym(task, args, size, cfg.seed + _EVAL_SEED_OFFSET * (draw + 1)):
            if row["question"] not in seen:
                seen.add(row["question"])
                held_out.append(row)
                if len(held_out) == cfg.eval_size:
                    return train, held_out
    raise DataError(
        f"reasoning-gym task {task!r} with args {json.dumps(args)} produced only {len(held_out)} held-out questions "
        f"not in the {cfg.train_size} training ones (asked for data.eval_size={cfg.eval_size}); the task has too few "
        f"distinct problems: lower data.eval_size or data.train_size, or widen its parameters"
    )
