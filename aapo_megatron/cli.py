"""Console entry points: aapo-train, aapo-convert, aapo-eval, aapo-rollout-server."""

from __future__ import annotations

import sys


def _not_yet(name: str) -> int:
    print(f"{name}: not implemented yet in this build (see the open issues)", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    """aapo-train --config X.yaml [--set k=v ...]."""
    return _not_yet("aapo-train")


def convert_main(argv: list[str] | None = None) -> int:
    """aapo-convert hf-to-mcore | mcore-to-hf."""
    return _not_yet("aapo-convert")


def eval_main(argv: list[str] | None = None) -> int:
    """aapo-eval --model DIR --data FILE."""
    return _not_yet("aapo-eval")


def rollout_server_main(argv: list[str] | None = None) -> int:
    """aapo-rollout-server."""
    return _not_yet("aapo-rollout-server")
