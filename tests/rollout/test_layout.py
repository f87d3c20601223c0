"""The rollout TP x DP layout (`rollout/layout.py`): prompt chunks, core groups per replica, and the refusals
(exit 2 from aapo-train, naming the key, before any work)."""

from __future__ import annotations

import os

import pytest

from aapo_megatron.config import ConfigError
from aapo_megatron.validation import load_config
from aapo_megatron.rollout.layout import LayoutError, chunks, cpu_binds

QUICKSTART = "configs/quickstart_cpu.yaml"


def test_chunks_are_contiguous_cover_every_prompt_and_differ_by_at_most_one():
    for n in range(0, 12):
        for parts in range(1, 5):
            spans = chunks(n, parts)
            assert len(spans) == parts and spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_cpu_binds_give_every_rank_its_own_cores():
    assert cpu_binds([0, 1], tp=1, dp=2, roles=1) == [["0", "1"], ["0", "1"]]  # the roles take turns
    assert cpu_binds(range(8), tp=2, dp=2, roles=2) == [["0|1", "2|3"], ["4|5", "6|7"]]
    assert cpu_binds(range(5), tp=1, dp=2, roles=1)[0] == ["0,1,2", "3,4"]
    with pytest.raises(LayoutError, match=r"'rollout.data_parallel_size' = 2 .*rollout.overlap_reference .* need 4 CPU cores"):
        cpu_binds([0, 1], tp=1, dp=2, roles=2)
    with pytest.raises(LayoutError, match=r"tensor_parallel_size' = 2 ranks need 6 CPU cores"):
        cpu_binds(range(5), tp=2, dp=3, roles=1)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"'rollout.data_parallel_size' must be > 0, got 0"):
        load_config(QUICKSTART, ["rollout.data_parallel_size=0"])
    with pytest.raises(ConfigError, match=r"'rollout.tensor_parallel_size' must divide the number of attention heads \(4\)"):
        load_config(QUICKSTART, ["rollout.tensor_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"'rollout.data_parallel_size' must be 1 with rollout.placement=server"):
        load_config(QUICKSTART, ["rollout.placement=server", "rollout.server_url=http://127.0.0.1:1",
                                 "rollout.data_parallel_size=2"])
    cfg = load_config(QUICKSTART, ["rollout.tensor_parallel_size=2", "rollout.data_parallel_size=2"])
    assert (cfg.rollout.tensor_parallel_size, cfg.rollout.data_parallel_size) == (2, 2)


def test_aapo_train_refuses_more_replicas_than_cores_with_exit_2(capsys):
    from aapo_megatron.cli import train_main

    too_many = len(os.sched_getaffinity(0)) + 1
    rc = train_main(["--config", QUICKSTART, "--set", f"rollout.data_parallel_size={too_many}",
                     "--set", "rollout.overlap_reference=false", "--set", "trainer.run_dir=/nonexistent/never"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"'rollout.data_parallel_size' = {too_many} replicas" in err and "CPU cores" in err
