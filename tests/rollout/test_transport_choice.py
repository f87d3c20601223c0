"""Which weight transport `auto` picks for each placement, and the combinations refused at config time."""

from __future__ import annotations

import pytest

from aapo_megatron.config import ConfigError
from aapo_megatron.validation import load_config, validate
from aapo_megatron.rollout.transport.registry import CHOICES, TRANSPORTS, is_loopback_url, load_transport, resolve_transport

# (placement, cuda, same_host) -> what auto picks
AUTO_TABLE = [
    ("colocated", False, True, "shm"),   # one CPU host, engines in the job
    ("colocated", True, True, "ipc"),    # engines on the trainer's own GPUs
    ("server", False, True, "shm"),      # a server on this CPU host
    ("server", False, False, "gloo"),    # a server on another CPU host
    ("server", True, True, "nccl"),      # a server on this node's other GPUs
    ("server", True, False, "nccl"),     # a server on another node
]


@pytest.mark.parametrize("placement,cuda,same_host,expected", AUTO_TABLE)
def test_auto_decision_table(placement, cuda, same_host, expected):
    assert resolve_transport("auto", placement=placement, cuda=cuda, same_host=same_host) == expected


def test_every_registered_transport_loads_and_names_itself():
    assert CHOICES == ("auto", "shm", "ipc", "gloo", "nccl")
    for name in TRANSPORTS:
        assert load_transport(name).name == name
    with pytest.raises(ValueError, match="rollout.weight_transport"):
        resolve_transport("rdma", placement="colocated", cuda=False)


@pytest.mark.parametrize("url,loopback", [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000", True), ("http://[::1]:9", True), (None, True),
    ("http://10.231.0.12:8000", False), ("http://node2:8000", False), ("https://rollout.example.org", False),
])
def test_loopback_urls(url, loopback):
    assert is_loopback_url(url) is loopback


@pytest.mark.parametrize("overrides,message", [
    (["rollout.weight_transport=nccl"], r"nccl cannot reach colocated engines.*Duplicate GPU detected"),
    (["rollout.placement=server", "rollout.server_url=http://10.231.0.12:8000", "rollout.weight_transport=shm"],
     r"shm moves weights through this host's memory, but the rollout server is on another host"),
    (["rollout.placement=server", "rollout.server_url=http://node2:8000", "rollout.weight_transport=ipc"],
     r"ipc passes CUDA IPC handles"),
    (["rollout.weight_transport=tcp"], r"must be one of auto, shm, ipc, gloo, nccl"),
])
def test_config_refuses_transports_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=r"'rollout\.weight_transport'.*" + message):
        validate(load_config(None, overrides))


@pytest.mark.parametrize("overrides", [
    [],
    ["rollout.weight_transport=gloo"],
    ["rollout.weight_transport=ipc"],
    ["rollout.placement=server", "rollout.server_url=http://127.0.0.1:8000", "rollout.weight_transport=shm"],
    ["rollout.placement=server", "rollout.server_url=http://10.231.0.12:8000", "rollout.weight_transport=gloo"],
    ["rollout.placement=server", "rollout.server_url=http://10.231.0.12:8000", "rollout.weight_transport=nccl"],
])
def test_config_accepts_transports_that_can_work(overrides):
    validate(load_config(None, overrides))
