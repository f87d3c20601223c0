"""The rollout-engine interface: token-id prompts in, sampled token ids (+ log-probs) out.

Implemented by `VLLMRolloutEngine` (vLLM in this process, engine core in a spawned one) and
`RemoteRolloutEngine` (an `aapo-rollout-server` over HTTP). The learner owns tokenization, so
prompts and completions are lists of token ids.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from aapo_megatron.dtypes import DTYPES

ENGINE_DTYPES = DTYPES
"""Rollout engine dtype names -> torch dtypes (the names vLLM and `aapo-rollout-server --dtype` take)."""


class RolloutError(RuntimeError):
    """A rollout engine refused or failed a request."""


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample completions for one batch of prompts."""

    n: int = 1
    """Completions per prompt (the group size G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = -1
    """Top-k; -1 disables."""
    max_tokens: int = 128
    """Longest completion, tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after emitting any of these ids (the id is kept in the completion)."""
    seed: Optional[int] = None
    """Sampling seed; prompt i of a batch uses seed + i so batches reproduce. None = unseeded."""
    logprobs: bool = False
    """Also return the log-prob of each sampled token (raw, or after temperature and top-k/top-p when the engine
    runs with vLLM's logprobs_mode=processed_logprobs, as the trainer starts it by default)."""

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k > 0), "top_k", "must be -1 or > 0"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1"),
            (self.seed is None or isinstance(self.seed, int), "seed", "must be an integer or None"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"SamplingSpec.{name} {msg}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingSpec":
        """Inverse of to_dict; unknown keys raise ValueError naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


@dataclass
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    """Generated token ids (excludes the prompt; includes a stop id when finish_reason == 'stop')."""
    finish_reason: str
    """'stop' (a stop/EOS id was emitted) or 'length' (max_tokens reached)."""
    logprobs: Optional[list[float]] = None
    """log p(token_t | prefix) for each generated token, nats; None unless requested."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"token_ids": list(self.token_ids), "finish_reason": self.finish_reason, "logprobs": self.logprobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Completion":
        """Inverse of to_dict."""
        return cls(token_ids=[int(t) for t in d["token_ids"]], finish_reason=str(d["finish_reason"]),
                   logprobs=None if d.get("logprobs") is None else [float(x) for x in d["logprobs"]])


@dataclass
class GenerationResult:
    """Completions for a batch: completions[i][j] is sample j of prompt i."""

    completions: list[list[Completion]]
    """[num_prompts][n] completions."""
    weight_version: int
    """Weight version every completion of this batch was generated with."""
    seconds: float = 0.0
    """Wall time of the generate call, seconds."""
    num_tokens: int = field(init=False, default=0)
    """Generated tokens over the batch."""

    def __post_init__(self) -> None:
        self.num_tokens = sum(len(c.token_ids) for group in self.completions for c in group)


NamedTensors = Iterable[tuple[str, torch.Tensor]]


class RolloutEngine(abc.ABC):
    """Generates completions from token-id prompts; a policy engine also accepts weight updates."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> GenerationResult:
        """Sample `sampling.n` completions for each prompt (token ids) with one weight version."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Number of completed weight updates (0 = the weights the engine was loaded with)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: NamedTensors, version: Optional[int] = None) -> int:
        """Replace the weights with HF-named tensors (streamed); returns the new weight version."""

    def sleep(self, level: int = 1) -> None:
        """Release the engine's accelerator memory while the trainer runs (colocated engines; default: no-op)."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Bring back "weights" and/or "kv_cache" (None = both) after `sleep` (default: no-op)."""

    def close(self) -> None:
        """Release the engine's processes and memory."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: Optional[int] = None) -> list[list[int]]:
    """Validate token-id prompts (non-empty lists of ints in [0, vocab)); returns them as lists."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {p!r:.80}")
        ids = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"prompt {i} holds a non-integer token id {t!r}")
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"prompt {i} holds token id {t} outside the vocabulary [0, {vocab_size})")
            ids.append(int(t))
        out.append(ids)
    return out
