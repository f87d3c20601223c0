"""The train step's micro-batch loss with the run's loss settings: log-probs of logits / rollout.temperature and
the group_token_mean / constant aggregations through packed micro-batches, against a by-hand computation."""

import pytest
import torch

from aapo_megatron.validation import load_config
from aapo_megatron.trainer.batch import RolloutBatch, make_packed_micro_batches
from aapo_megatron.trainer.losses import build_loss_fn, update_loss_settings

V, G = 40, 3


def _batch():
    g = torch.Generator().manual_seed(2)
    prompts = [[int(t) for t in torch.randint(1, V, (n,), generator=g)] for n in (3, 2, 4, 2, 5, 3)]
    completions = [[int(t) for t in torch.randint(1, V, (n,), generator=g)] for n in (5, 1, 2, 6, 2, 3)]
    return RolloutBatch(prompts, completions, torch.randn(6, generator=g))


@pytest.mark.parametrize("mode", ["token_mean", "group_token_mean", "constant"])
def test_micro_batch_losses_sum_to_the_aggregated_objective_at_temperature(mode):
    cfg = load_config(None, ["rollout.temperature=0.7", f"rollout.num_generations={G}", "rollout.max_new_tokens=8",
                             f"algorithm.loss_aggregation={mode}", "data.prompts_per_step=2"])
    batch = _batch()
    temperature, weights = update_loss_settings(cfg, batch, range(6), "aapo_ce")
    assert temperature == 0.7 and (weights is None) == (mode == "token_mean")
    micro = make_packed_micro_batches(batch, range(6), token_budget=16, row_len=8)  # several rows and micro-batches
    assert len(micro) > 1
    loss_fn = build_loss_fn("aapo_ce", cfg.algorithm, temperature=temperature, sample_weights=weights)
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(*mb.tokens.shape, V, generator=gen).requires_grad_(True) for mb in micro]
    total = sum(loss_fn(x, mb, None)[0] for x, mb in zip(logits, micro))
    num_tokens = sum(len(c) for c in batch.completion_ids)
    got = total / num_tokens  # what Megatron's calculate_per_token_loss makes of the token sums
    got_grads = torch.autograd.grad(got, logits)

    per_sample = {}  # sample -> sum over its tokens of -A * log_softmax(x / T)[target]
    for x, mb in zip(logits, micro):
        lp = torch.log_softmax(x / 0.7, -1).gather(-1, mb.targets[..., None])[..., 0]
        idx = mb.sample_index if mb.sample_index.dim() == 2 else mb.sample_index[:, None].expand_as(lp)
        for i in range(6):
            sel = (idx == i) & (mb.loss_mask > 0)
            per_sample[i] = per_sample.get(i, 0.0) + (-batch.advantages[i] * lp[sel]).sum()
    lengths = [len(c) for c in batch.completion_ids]
    if mode == "token_mean":
        want = sum(per_sample.values()) / sum(lengths)
    elif mode == "constant":
        want = sum(per_sample.values()) / (8 * 6)
    else:
        want = sum(sum(per_sample[i] for i in range(g, g + G)) / sum(lengths[g : g + G]) for g in (0, G)) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, torch.autograd.grad(want, logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sft_and_raw_use_temperature_one():
    cfg = load_config(None, ["rollout.temperature=0.7", "algorithm.logprob_temperature=raw"])
    assert update_loss_settings(cfg, _batch(), range(6), "aapo_ce")[0] == 1.0
    cfg = load_config(None, ["rollout.temperature=0.7"])
    assert update_loss_settings(cfg, _batch(), range(6), "sft_ce") == (1.0, None)
