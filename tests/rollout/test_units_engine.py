"""Fast tests without an engine: the sampling spec and prompt checks, the log-prob mismatch metric, CPU core split."""

from __future__ import annotations

import json

import pytest
import torch

from aapo_megatron.rollout.engine import SamplingSpec, check_prompts
from tests.rollout.mismatch import logprob_mismatch, pad_logprobs


def test_sampling_spec_validation_and_roundtrip():
    spec = SamplingSpec(n=4, temperature=0.7, top_p=0.9, top_k=20, max_tokens=64, stop_token_ids=[2, 3], seed=1,
                        logprobs=True)
    assert SamplingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for kwargs, msg in [({"n": 0}, "SamplingSpec.n must be an integer >= 1"),
                        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                        ({"top_k": 0}, "top_k must be -1 or > 0"),
                        ({"temperature": -1}, "temperature must be >= 0"),
                        ({"max_tokens": 0}, "max_tokens must be an integer >= 1")]:
        with pytest.raises(ValueError, match=msg):
            SamplingSpec(**kwargs)
    with pytest.raises(ValueError, match=r"unknown sampling field\(s\) \['nn'\]"):
        SamplingSpec.from_dict({"nn": 3})
    assert check_prompts([(1, 2), [3]], vocab_size=4) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="prompt 1 holds token id 4 outside the vocabulary"):
        check_prompts([[1], [4]], vocab_size=4)


def test_logprob_mismatch_matches_reference_loop():
    g = torch.Generator().manual_seed(3)
    a, b = -torch.rand(4, 7, generator=g) * 3, -torch.rand(4, 7, generator=g) * 3
    mask = torch.rand(4, 7, generator=g) > 0.3
    diffs = [abs(float(a[i, j]) - float(b[i, j])) for i in range(4) for j in range(7) if mask[i, j]]
    m = logprob_mismatch(a, b, mask)
    assert m.num_tokens == len(diffs)
    assert m.mean == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert m.max == pytest.approx(max(diffs), rel=1e-6)
    assert m.metrics() == {"mismatch/mean": m.mean, "mismatch/max": m.max}
    assert logprob_mismatch(a, a.clone(), mask).max == 0.0
    assert logprob_mismatch(a, b, torch.zeros_like(mask)).num_tokens == 0
    # padding outside the mask is ignored, even if it is garbage
    b2 = b.clone()
    b2[~mask] = float("nan")
    assert logprob_mismatch(a, b2, mask).mean == pytest.approx(m.mean)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(a, b[:, :3], mask)
    values, pmask = pad_logprobs([[-1.0, -2.0], [-0.5]], 3)
    assert values.tolist() == [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
    assert pmask.tolist() == [[True, True, False], [True, False, False]]


def test_split_cpu_cores_gives_the_two_engines_disjoint_halves():
    from aapo_megatron.rollout.vllm_engine import split_cpu_cores

    assert split_cpu_cores([0, 1]) == ("0", "1")
    assert split_cpu_cores([0, 1, 2, 3, 4]) == ("0,1", "2,3,4")
    assert split_cpu_cores([7]) == ("7", "7")
    with pytest.raises(ValueError, match="no CPU cores"):
        split_cpu_cores([])
