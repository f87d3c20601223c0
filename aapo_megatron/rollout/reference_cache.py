"""Cached reference rollouts (`algorithm.reference_rollouts: cached`).

The reference model is frozen, so its completions for a prompt come from a fixed distribution. The cache
samples them once per prompt (on first sight) and reuses them in later epochs, which removes AAPO's
second generation pass for every revisited prompt. It is plain data (`state_dict` / `load_state_dict`),
saved inside the trainer's atomic checkpoint, or on its own with `save` / `load` (atomic rename).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

from aapo_megatron.rollout.engine import Completion

_FORMAT = 1


class ReferenceCache:
    """prompt key -> the G reference completions sampled for it."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[list[int], list[Completion]]] = {}
        self.hits = 0
        """Prompts served from the cache."""
        self.misses = 0
        """Prompts that had to be generated."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get_or_generate(
        self,
        keys: Sequence[str],
        prompt_ids: Sequence[Sequence[int]],
        generate_fn: Callable[[list[list[int]]], list[list[Completion]]],
        n: Optional[int] = None,
    ) -> list[list[Completion]]:
        """Completion groups for each prompt: cached ones reused, the missing ones generated in one call.

        generate_fn(missing prompt ids) -> one completion group per missing prompt. `n` (if given) is the group
        size the caller expects; a cached group of another size raises ValueError (the config changed).
        """
        if len(keys) != len(prompt_ids):
            raise ValueError(f"reference cache: {len(keys)} keys for {len(prompt_ids)} prompts")
        missing: list[int] = []
        first_index: dict[str, int] = {}
        for i, (key, ids) in enumerate(zip(keys, prompt_ids)):
            entry = self._entries.get(key)
            if entry is None:
                if key not in first_index:
                    first_index[key] = i
                    missing.append(i)
                continue
            if list(entry[0]) != list(ids):
                raise ValueError(f"reference cache: key {key!r} was cached for different prompt token ids "
                                 f"(the dataset or tokenizer changed since the cache was built)")
            if n is not None and len(entry[1]) != n:
                raise ValueError(f"reference cache: key {key!r} holds {len(entry[1])} completions but {n} are "
                                 f"needed (rollout.num_generations changed); start a fresh cache")
        if missing:
            groups = generate_fn([list(prompt_ids[i]) for i in missing])
            if len(groups) != len(missing):
                raise ValueError(f"reference cache: generate_fn returned {len(groups)} groups for "
                                 f"{len(missing)} prompts")
            for i, group in zip(missing, groups):
                if n is not None and len(group) != n:
                    raise ValueError(f"reference cache: generate_fn returned {len(group)} completions, expected {n}")
                self._entries[keys[i]] = (list(prompt_ids[i]), list(group))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return [list(self._entries[k][1]) for k in keys]

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable contents (entries, hit/miss counters)."""
        return {
            "format": _FORMAT,
            "hits": self.hits,
            "misses": self.misses,
            "entries": {k: {"prompt_ids": list(ids), "completions": [c.to_dict() for c in group]}
                        for k, (ids, group) in self._entries.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents with a `state_dict()`; malformed input raises ValueError and changes nothing."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"reference cache state: expected format {_FORMAT}, got "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
        entries: dict[str, tuple[list[int], list[Completion]]] = {}
        try:
            for key, e in state["entries"].items():
                entries[str(key)] = ([int(t) for t in e["prompt_ids"]], [Completion.from_dict(c) for c in e["completions"]])
            hits, misses = int(state["hits"]), int(state["misses"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"reference cache state is malformed: {type(exc).__name__}: {exc}") from None
        self._entries, self.hits, self.misses = entries, hits, misses

    def save(self, path: str) -> None:
        """Write state_dict() as JSON atomically (temp file + rename)."""
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as fh:
                json.dump(self.state_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "ReferenceCache":
        """A cache read from `save`'s file."""
        with open(path) as fh:
            state = json.load(fh)
        cache = cls()
        cache.load_state_dict(state)
        return cache
