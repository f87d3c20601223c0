"""The frozen Megatron reference model at TP=1, TP=2 and PP=2 (gloo), built from an HF directory.

Its log-probs equal HF transformers' (log_softmax of the logits) on packed micro-batches through Megatron's
forward-only schedule; the k3 KL of a policy trained with kl_beta > 0 is 0 at the first update and > 0 after it;
the reference has no grads, no optimizer state and its weights do not move. (tests/models/reference_job.py)
"""

from __future__ import annotations

import pytest

from tests.models.layouts import LAYOUT_IDS, LAYOUTS, run_layout

pytestmark = pytest.mark.slow  # the layout jobs are shared with test_parity.py and test_gpt.py


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_reference_logprobs_match_hf(tp: int, pp: int):
    results = [r["reference"] for r in run_layout(tp, pp)]
    last = [r for r in results if r["last_stage"]]
    assert len(last) == tp
    assert all(r["micro_batches"] >= 2 for r in results)  # the schedule ran several micro-batches
    hf = next(r["hf_logp"] for r in last if "hf_logp" in r)
    for r in last:
        assert [len(s) for s in r["ref_logp"]] == [len(s) for s in hf]
        diff = max(abs(a - b) for ra, rb in zip(r["ref_logp"], hf) for a, b in zip(ra, rb))
        assert diff < 1e-4, f"tp={tp} pp={pp}: max |reference - hf| log-prob = {diff:.3e}"
    assert all(r["ref_logp"] is None for r in results if not r["last_stage"])


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_kl_is_zero_at_step_one_then_positive(tp: int, pp: int):
    for r in run_layout(tp, pp):
        first, second = r["reference"]["kl"]
        assert first < 1e-12, f"policy == reference at update 1, yet kl/reference = {first:.3e}"
        assert second > 1e-7, f"after an update the policy differs from the reference, yet kl = {second:.3e}"


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_reference_is_frozen(tp: int, pp: int):
    for r in (r["reference"] for r in run_layout(tp, pp)):
        assert not r["requires_grad"] and not r["has_grad"] and not r["ref_logp_grad"]
        assert not r["training"]
        assert r["wrapped"] == "GPTModel"  # no DDP wrapper
        assert not r["in_optimizer"]
        assert r["unchanged"], "the reference's weights changed while the policy trained"
