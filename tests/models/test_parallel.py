"""distributed.py: torchrun / Slurm environment parsing, Slurm hostlists, world-size validation, the Platform."""

from __future__ import annotations

import pytest

from aapo_megatron.config import Config, ConfigError, ParallelConfig
from aapo_megatron.distributed import (
    DEFAULT_MASTER_PORT,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistEnv,
    expand_hostlist,
    init_distributed,
    read_dist_env,
)


def test_torchrun_env():
    env = read_dist_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                         "MASTER_PORT": "29123"})
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="node7", master_port=29123,
                          launcher="torchrun")


def test_torchrun_wins_over_slurm_and_local_rank_from_local_world_size():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "0",
                         "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", DEFAULT_MASTER_PORT)


def test_slurm_env_master_from_nodelist_and_port_from_job_id():
    env = read_dist_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2",
                         "SLURM_JOB_NODELIST": "gpu[003-004,007],cpu01", "SLURM_JOB_ID": "123456"})
    assert env == DistEnv(rank=6, world_size=16, local_rank=2, master_addr="gpu003",
                          master_port=SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN, launcher="slurm")


def test_slurm_env_explicit_master():
    env = read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                         "SLURM_JOB_NODELIST": "a[1-2]", "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("head", 4000)


def test_slurm_without_nodelist_is_an_error():
    with pytest.raises(ValueError, match="needs SLURM_JOB_NODELIST"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_single_process_default():
    assert read_dist_env({}) == DistEnv(0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT, "single")


def test_port_zero_is_refused_for_several_processes():
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    with pytest.raises(ValueError, match=r"MASTER_PORT=0 is not a usable rendezvous port for 2 processes"):
        read_dist_env(env)
    assert read_dist_env({**env, "WORLD_SIZE": "1"}).master_port == 0


def test_bad_rank_values():
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        read_dist_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"rank 4 is not in \[0, world size 4\) \(torchrun environment\)"):
        read_dist_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("hostlist,expected", [
    ("node1", ["node1"]),
    ("gpu[001-004,007],cpu01", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu01"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x,y[09-10],z", ["x", "y09", "y10", "z"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("hostlist,message", [
    ("gpu[001-004", r"unbalanced '\[' in Slurm hostlist 'gpu\[001-004'"),
    ("gpu[4-1]", r"descending range '4-1'"),
    ("gpu[a-b]", r"bad range 'a-b'"),
])
def test_expand_hostlist_errors(hostlist, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(hostlist)


def test_world_size_not_divisible_by_tp_pp_parallel_config():
    pc = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size \* pipeline_model_parallel_size = 4 must "
                                          r"divide the world size \(6\); tp=2, pp=2"):
        init_distributed(pc, environ={"RANK": "0", "WORLD_SIZE": "6"})


def test_world_size_not_divisible_by_tp_pp_full_config():
    cfg = Config()
    cfg.data.train_path = "train.jsonl"
    cfg.model.scratch.num_layers = 4
    cfg.parallel.pipeline_model_parallel_size = 4
    with pytest.raises(ConfigError, match=r"'parallel' tensor_model_parallel_size \* pipeline_model_parallel_size "
                                          r"= 4 must divide the world size \(2\)"):
        init_distributed(cfg, environ={"RANK": "1", "WORLD_SIZE": "2"})


def test_nccl_without_cuda_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ConfigError, match="'parallel.backend' is 'nccl' but CUDA is not available"):
        init_distributed(ParallelConfig(backend="nccl"), environ={})


def test_platform_on_this_host_is_decided_from_the_device():
    import dataclasses

    import torch

    from aapo_megatron.distributed import detect_platform, read_dist_env
    from aapo_megatron.dtypes import DTYPES
    from aapo_megatron.models.gpt import resolve_dtype

    cuda = torch.cuda.is_available()
    p = detect_platform(ParallelConfig(), read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}))
    assert p.cuda is cuda and p.device.type == ("cuda" if cuda else "cpu")
    assert p.backend == ("nccl" if cuda else "gloo") and p.distributed_optimizer is cuda
    assert p.default_dtype == ("bfloat16" if cuda else "float32")
    assert p.transformer_engine is False or cuda  # TE only with CUDA
    assert resolve_dtype("auto") is DTYPES[p.default_dtype] and resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; expected one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cuda = not cuda
