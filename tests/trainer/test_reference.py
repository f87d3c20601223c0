"""The frozen Megatron reference model at TP=1, TP=2 and PP=2 (gloo), built from an HF directory.

Its log-probs equal HF transformers' (log_softmax of the logits) on packed micro-batches through Megatron's
forward-only schedule; the k3 KL of a policy trained with kl_beta > 0 is 0 at the first update and > 0 after it;
the reference has no grads, no optimizer state and its weights do not move. (tests/models/reference_job.py)
"""

from __future__ import annotations

import pytest

from tests.models.layouts import LAYOUT_IDS, LAYOUTS, run_layout

# The slow tests read the layout jobs shared with test_parity.py and test_gpt.py.


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_kl_is_zero_at_step_one_then_positive(tp: int, pp: int):
    for r in run_layout(tp, pp):
        first, second = r["reference"]["kl"]
        assert first < 1e-12, f"policy == reference at update 1, yet kl/reference = {first:.3e}"
        assert second > 1e-7, f"after an update the policy differs from the reference, yet kl = {second:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=LAYOUT_IDS)
def test_reference_is_frozen(tp: int, pp: int):
    for r in (r["reference"] for r in run_layout(tp, pp)):
        assert not r["requires_grad"] and not r["has_grad"] and not r["ref_logp_grad"]
        assert not r["training"]
        assert r["wrapped"] == "GPTModel"  # no DDP wrapper
        assert not r["in_optimizer"]
        assert r["unchanged"], "the reference's weights changed while the policy trained"


def test_the_reference_is_built_only_when_the_run_needs_it():
    """kl_beta > 0 or reference_kl: a Megatron reference; otherwise none (no extra memory). A resume that lost
    hf_init is covered by tests/trainer/test_reference_identity.py."""
    from aapo_megatron.validation import load_config
    from aapo_megatron.trainer.reference import needs_reference

    assert needs_reference(load_config(None, ["algorithm.kl_beta=0.05"]))
    assert not needs_reference(load_config(None, []))
    assert needs_reference(load_config(None, ["algorithm.reference_kl=true"]))


def test_host_offload_moves_weights_on_cuda_only():
    """CUDA: weights live in pinned host memory outside `on_device()`; CPU (the twin): nothing moves."""
    import torch

    from aapo_megatron.trainer.reference import HostOffload

    cuda = torch.cuda.is_available()
    module = torch.nn.Linear(3, 2).to("cuda" if cuda else "cpu")
    before = [p.detach().cpu().clone() for p in module.parameters()]
    data = [p.detach() for p in module.parameters()]
    offload = HostOffload(module, enabled=True)
    offload.offload()
    assert offload.enabled == cuda
    for p, b, d in zip(module.parameters(), before, data):
        assert (p.device.type == "cpu" and p.is_pinned()) if cuda else p.data_ptr() == d.data_ptr()
    with offload.on_device():
        for p, b, d in zip(module.parameters(), before, data):
            assert p.device == d.device and torch.equal(p.detach().cpu(), b)
