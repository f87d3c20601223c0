"""The conversion worker launcher: results per rank, errors re-raised with their message, GPUs hidden, malloc set."""

from __future__ import annotations

import os

import pytest

from aapo_megatron.checkpoint.errors import ConversionError, ShapeMismatchError
from aapo_megatron.checkpoint.conversion.launch import run_workers


def _ok(rank: int, world: int, tag: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = __import__("torch").tensor([rank + 1])
    dist.all_reduce(t)
    return (tag, rank, world, int(t), os.environ["CUDA_VISIBLE_DEVICES"], os.environ["RANK"],
            os.environ["MALLOC_MMAP_THRESHOLD_"])


def _fails(rank: int, world: int):
    if rank == 1:
        raise ShapeMismatchError("tensor 'x' has shape [1] but the architecture needs [2]")
    return rank


def _crashes(rank: int, world: int):
    if rank == 0:
        raise RuntimeError("worker exploded")
    return rank


def test_results_in_rank_order_with_gpus_hidden(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    # GPUs hidden, and glibc's mmap threshold fixed at 1 MiB (freed tensors go back to the OS)
    assert run_workers(_ok, 2, ("t",)) == [("t", 0, 2, 3, "", "0", "1048576"), ("t", 1, 2, 3, "", "1", "1048576")]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # the parent's environment is restored
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # a user's own setting wins
    assert [r[-1] for r in run_workers(_ok, 2, ("u",))] == ["65536", "65536"]


def test_conversion_errors_keep_type_and_message():
    with pytest.raises(ShapeMismatchError, match=r"^tensor 'x' has shape \[1\] but the architecture needs \[2\]$"):
        run_workers(_fails, 2)


def test_other_errors_carry_the_worker_traceback():
    with pytest.raises(ConversionError, match=r"(?s)conversion worker 0 failed:.*RuntimeError: worker exploded"):
        run_workers(_crashes, 2)
