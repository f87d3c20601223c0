"""The rollout server's network weight transport: the trainer's gloo group with the server's vLLM workers
through the server's update session (what a trainer on another host uses), on the session's real server.

Partial updates are refused by the gloo engine with the old weights still served; a dead trainer's gloo session
is taken over; a transport that cannot reach the server is refused naming the key. (A dead engine's /health 503
is tests/rollout/test_server_liveness.py.)
"""

from __future__ import annotations

import pytest
import torch

from aapo_megatron.rollout.client import RemoteRolloutEngine
from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from aapo_megatron.rollout.transport.base import WeightSyncError, hf_named_tensors
from tests.rollout.conftest import PROMPTS, hf_greedy, hf_token_logprobs
from tests.rollout.test_server import raw

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=24, logprobs=True)


def gloo_client(srv) -> RemoteRolloutEngine:
    c = RemoteRolloutEngine(srv["url"], token=srv["token"], weight_sync_bucket_mb=0.25, weight_sync_timeout_s=60.0,
                            weight_transport="gloo")
    c.use_server_info(c.request("GET", "/version"))
    return c


def _tokens(c) -> list[list[int]]:
    return [g[0].token_ids for g in c.generate(PROMPTS, GREEDY).completions]


def test_gloo_update_through_the_server_session(rollout_server, model_dirs):
    _, models = model_dirs
    c = gloo_client(rollout_server)
    try:
        assert c.transport == "gloo" and c.transfer_workers == 1
        c.update_weights(hf_named_tensors(models["a"]))
        v = c.weight_version
        assert c.update_weights(hf_named_tensors(models["b"])) == v + 1 == c.weight_version
        stats = c.last_sync
        assert stats.transport == "gloo" and stats.num_buckets > 2
        assert stats.num_bytes == sum(t.numel() * 4 for _, t in hf_named_tensors(models["b"]))
        out = c.generate(PROMPTS, GREEDY)
        assert out.weight_version == v + 1
        expected = hf_greedy(models["b"], PROMPTS, 24)
        assert expected != hf_greedy(models["a"], PROMPTS, 24)
        assert [g[0].token_ids for g in out.completions] == expected
        for prompt, group in zip(PROMPTS, out.completions):
            ref = hf_token_logprobs(models["b"], prompt, group[0].token_ids)
            assert torch.allclose(torch.tensor(group[0].logprobs), ref, atol=1e-4)
        # The group outlives the session: the next sync reuses it (and an explicit version is committed).
        group = c._broadcast.group
        assert c.update_weights(hf_named_tensors(models["a"]), version=v + 5) == v + 5
        assert c._broadcast.group is group
        assert _tokens(c) == hf_greedy(models["a"], PROMPTS, 24)
    finally:
        c.close()


def test_partial_gloo_update_is_rejected_and_old_weights_stay(rollout_server, model_dirs):
    _, models = model_dirs
    c = gloo_client(rollout_server)
    try:
        c.update_weights(hf_named_tensors(models["a"]))
        v, served = c.weight_version, _tokens(c)
        partial = [(n, t) for n, t in hf_named_tensors(models["b"]) if n != "model.layers.1.mlp.down_proj.weight"]
        with pytest.raises(WeightSyncError, match=r"stage 'finish' failed: .*HTTP 400: the update delivered "
                                                  r"\d+ of \d+ tensors; missing \[\"model\.layers\.1\.mlp\.down_proj"
                                                  r"\.weight\"\]: update rejected, the served weights are unchanged; "
                                                  rf"version {v} still served"):
            c.update_weights(partial)
        assert c.weight_version == v
        assert _tokens(c) == served  # nothing of B was loaded
        assert raw(rollout_server, "GET", "/health")[1]["status"] == "ok"
        # A full update goes through afterwards (the engine's update state was reset).
        assert c.update_weights(hf_named_tensors(models["b"])) == v + 1
        assert _tokens(c) == hf_greedy(models["b"], PROMPTS, 24)
    finally:
        c.close()


def test_gloo_session_of_a_dead_trainer_is_taken_over(rollout_server, model_dirs):
    _, models = model_dirs
    tok = rollout_server["token"]
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "begin", "transport": "gloo"}, token=tok)
    assert status == 200 and out["transfer_workers"] == 1
    status, out2 = raw(rollout_server, "POST", "/update_weights",
                       {"action": "load", "session": out["session"], "file": "x.safetensors"}, token=tok)
    assert status == 400 and "moves its weights by gloo: 'load' (a bucket file) is refused" in out2["error"]
    c = gloo_client(rollout_server)  # a restarted trainer: waits out the 1.5 s takeover timeout
    try:
        v = c.weight_version
        assert c.update_weights(hf_named_tensors(models["a"])) == v + 1
        assert _tokens(c) == hf_greedy(models["a"], PROMPTS, 24)
    finally:
        c.close()


def test_transports_that_cannot_reach_the_server_are_refused(rollout_server):
    info = {"role": "policy", "weight_dir": "/dev/shm", "weight_transports": ["shm", "gloo"], "transfer_workers": 1}
    for name in ("shm", "ipc"):
        c = RemoteRolloutEngine("http://10.231.0.12:8000", token="t", weight_transport=name)
        with pytest.raises(RolloutError, match=rf"'rollout\.weight_transport': {name} .*another host|"
                                               rf"'rollout\.weight_transport': ipc passes CUDA IPC handles"):
            c.use_server_info(info)
    remote = RemoteRolloutEngine("http://10.231.0.12:8000", token="t")
    remote.use_server_info(info)
    assert remote.transport == "gloo"  # auto, a server on another CPU host
    c = RemoteRolloutEngine(rollout_server["url"], token=rollout_server["token"], weight_transport="nccl")
    with pytest.raises(RolloutError, match=r"'rollout\.weight_transport': nccl cannot reach the rollout server "
                                           r".*it takes \['shm', 'gloo'\]"):
        c.use_server_info(c.request("GET", "/version"))
    status, out = raw(rollout_server, "POST", "/update_weights", {"action": "begin", "transport": "nccl"},
                      token=rollout_server["token"])
    assert status == 400 and "'transport' must be one of ['shm', 'gloo']" in out["error"]
