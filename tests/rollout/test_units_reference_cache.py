"""Fast tests without an engine: reference-cache bookkeeping and persistence."""

from __future__ import annotations

import os

import pytest

from aapo_megatron.rollout.engine import Completion
from aapo_megatron.rollout.reference_cache import ReferenceCache


def _groups(ids):
    return [[Completion([p[0] + 1, 2], "stop", [-0.1, -0.2]), Completion([p[0] + 3], "length")] for p in ids]


def test_reference_cache_bookkeeping_and_errors(tmp_path):
    cache = ReferenceCache()
    calls = []

    def gen(ids):
        calls.append([list(x) for x in ids])
        return _groups(ids)

    out = cache.get_or_generate(["a", "b", "a"], [[1], [5], [1]], gen, n=2)
    assert calls == [[[1], [5]]]  # the repeated key is generated once
    assert out[0][0].token_ids == [2, 2] and out[2][0].token_ids == [2, 2]
    out2 = cache.get_or_generate(["b"], [[5]], gen, n=2)
    assert len(calls) == 1 and out2[0][1].token_ids == [8]
    assert (cache.hits, cache.misses) == (2, 2)
    with pytest.raises(ValueError, match="key 'a' was cached for different prompt token ids"):
        cache.get_or_generate(["a"], [[9]], gen)
    with pytest.raises(ValueError, match="holds 2 completions but 4 are needed"):
        cache.get_or_generate(["a"], [[1]], gen, n=4)

    path = str(tmp_path / "cache.json")
    cache.save(path)
    assert os.listdir(tmp_path) == ["cache.json"]
    restored = ReferenceCache.load(path)
    assert restored.state_dict() == cache.state_dict()
    assert restored.get_or_generate(["a"], [[1]], gen)[0][0].logprobs == [-0.1, -0.2]
    with pytest.raises(ValueError, match="expected format 1"):
        ReferenceCache().load_state_dict({"entries": {}})
    bad = cache.state_dict()
    bad["entries"]["a"]["completions"][0].pop("token_ids")
    fresh = ReferenceCache()
    with pytest.raises(ValueError, match="reference cache state is malformed: KeyError"):
        fresh.load_state_dict(bad)
    assert len(fresh) == 0  # unchanged on error
