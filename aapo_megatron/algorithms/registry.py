"""Name -> class registries (advantage estimators, policy losses) with errors that list the known names.

The registries are the single source of these names: the config holds plain strings checked against them.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a config name (e.g. "aapo") to the class that implements it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register `cls` under `name` (names are unique)."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name].__name__})")
            self._items[name] = cls
            cls.name = name
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        """The class registered as `name`; ValueError naming the known ones otherwise."""
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
"""algorithm.name -> AdvantageEstimator subclass (filled by the modules `aapo_megatron.algorithms` imports)."""
POLICY_LOSSES: Registry = Registry("policy loss")
"""algorithm.loss -> PolicyLoss subclass."""
