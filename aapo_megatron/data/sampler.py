"""Deterministic, resumable prompt order: a fresh permutation per epoch, fixed by (seed, epoch).

    sampler = ResumableSampler(len(ds), seed=cfg.data.seed)
    idx = sampler.next_batch(cfg.data.prompts_per_step)   # list[int]; batches run across epoch ends
    nxt = sampler.peek_batch(cfg.data.prompts_per_step)   # the following batch, not consumed
    ckpt["sampler"] = sampler.state_dict()                # {"epoch", "position", "seed", "num_samples", "shuffle"}
    sampler.load_state_dict(ckpt["sampler"])              # continues with exactly the next indices

The state is two integers plus what identifies the order, so nothing depends on how many batches were
drawn before; a resumed sampler regenerates the epoch's permutation and skips `position` entries.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from aapo_megatron.errors import BadInputError


class SamplerStateError(BadInputError, ValueError):
    """A sampler state does not belong to this dataset/seed (the message names the field)."""


class ResumableSampler:
    """Endless index stream over `num_samples` items: epoch e is permutation(seed, e), consumed in order."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError(f"ResumableSampler needs at least one sample, got num_samples={num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """[num_samples] int64 order of one epoch."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def next_batch(self, batch_size: int) -> list[int]:
        """The next `batch_size` indices; crossing the end of an epoch continues into the next permutation."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(batch_size - len(out), self.num_samples - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def peek_batch(self, batch_size: int) -> list[int]:
        """What `next_batch(batch_size)` will return, without consuming it."""
        saved = (self.epoch, self.position, self._order)
        try:
            return self.next_batch(batch_size)
        finally:
            self.epoch, self.position, self._order = saved

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next_batch(1)[0]

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state: epoch, position within it, and the seed / size / shuffle that define the order."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; SamplerStateError if it was made for another dataset size, seed or order."""
        for key in ("epoch", "position", "seed", "num_samples"):
            if key not in state:
                raise SamplerStateError(f"sampler state lacks {key!r} (has: {', '.join(state)})")
        for key, mine in (("num_samples", self.num_samples), ("seed", self.seed),
                          ("shuffle", self.shuffle)):
            theirs = state.get(key, mine)
            if theirs != mine:
                raise SamplerStateError(
                    f"sampler state has {key}={theirs!r} but this sampler has {key}={mine!r}; "
                    f"the prompt order would differ (did the dataset or data.seed change?)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise SamplerStateError(f"sampler state out of range: epoch={epoch}, position={position} "
                                    f"(num_samples={self.num_samples})")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
