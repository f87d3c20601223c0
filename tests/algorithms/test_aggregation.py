"""Global token-mean across micro-batches and data-parallel ranks (2 real gloo processes): the averaged DP
gradient equals the gradient of the single-process loss over the whole step."""

import pytest
import torch

from tests.distributed import run_ranks


def _data():
    gen = torch.Generator().manual_seed(11)
    v, h = 40, 8
    # 2 DP ranks x 2 micro-batches, each [b=2, s] with a different length and mask density
    mbs = []
    for s in (3, 7, 5, 2):
        x = torch.randn(2, s, h, generator=gen)
        target = torch.randint(0, v, (2, s), generator=gen)
        adv = torch.randn(2, 1, generator=gen).expand(2, s).contiguous()
        mask = (torch.rand(2, s, generator=gen) > 0.4).float()
        mask[0, 0] = 1.0
        mbs.append((x, target, adv, mask))
    weight = torch.randn(v, h, generator=gen) * 0.5
    return mbs, weight


def _body(rank, world_size):
    import torch.distributed as dist

    from aapo_megatron.algorithms import GlobalTokenMean, PolicyLossInputs, build_policy_loss, policy_loss_from_logits
    from aapo_megatron.config import AlgorithmConfig

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mbs, weight = _data()
    mine = mbs[2 * rank : 2 * rank + 2]
    w = weight.clone().requires_grad_(True)
    norm = GlobalTokenMean.for_step([m[3] for m in mine], dist.group.WORLD, grads_averaged_over_dp=True)
    loss_fn = build_policy_loss(AlgorithmConfig(name="aapo"))
    total_loss = torch.zeros(())
    for i, (x, target, adv, mask) in enumerate(mine):
        logits = x @ w.t()  # [b, s, V]
        out = policy_loss_from_logits(loss_fn, logits, target, PolicyLossInputs(adv, mask), norm, fused=i == 0,
                                      inplace=True)
        out.loss.backward()
        total_loss += out.metrics["loss"]
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world_size  # DDP-style averaging over DP
    dist.all_reduce(total_loss)
    return norm.num_tokens_in_step, grad, total_loss


def test_global_token_mean_over_microbatches_and_dp():
    results = run_ranks(_body, world_size=2)
    mbs, weight = _data()
    w = weight.clone().requires_grad_(True)
    num, den = 0.0, 0.0
    for x, target, adv, mask in mbs:
        lp = torch.log_softmax(x @ w.t(), -1).gather(-1, target[..., None])[..., 0]
        num = num + (-adv * lp * mask).sum()
        den += float(mask.sum())
    loss = num / den  # the global token mean over the whole step
    loss.backward()
    for tokens, grad, step_loss in results:
        assert tokens == den
        torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step_loss, loss.detach(), rtol=1e-5, atol=1e-6)


GROUP = 3  # 8 samples (rows): groups {0,1,2}, {3,4,5}, {6,7}; rank 0 holds samples 0-3, so group 1 spans both ranks
MAX_NEW_TOKENS = 7


def _weighted_body(rank, world_size):
    import torch.distributed as dist

    from aapo_megatron.algorithms import GlobalTokenMean, PolicyLossInputs, build_policy_loss, policy_loss_from_logits
    from aapo_megatron.algorithms.aggregation import position_weights, sample_loss_weights
    from aapo_megatron.config import AlgorithmConfig

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mbs, weight = _data()
    lengths = [int(m[3][r].sum()) for m in mbs for r in range(2)]
    mine = mbs[2 * rank : 2 * rank + 2]
    out = {}
    for mode in ("group_token_mean", "constant"):
        factors = sample_loss_weights(lengths, range(8), mode, GROUP, MAX_NEW_TOKENS)
        w = weight.clone().requires_grad_(True)
        step = GlobalTokenMean.for_step([m[3] for m in mine], dist.group.WORLD, grads_averaged_over_dp=True)
        loss_fn = build_policy_loss(AlgorithmConfig(name="aapo"))
        total = torch.zeros(())
        for i, (x, target, adv, mask) in enumerate(mine):
            sample_index = torch.tensor([4 * rank + 2 * i, 4 * rank + 2 * i + 1])  # [b]: one sample per row
            norm = GlobalTokenMean(step.num_tokens_in_step, step.grad_scale,
                                   token_weights=position_weights(factors, sample_index, mask.shape))
            out_i = policy_loss_from_logits(loss_fn, x @ w.t(), target, PolicyLossInputs(adv, mask), norm,
                                            fused=i == 0, temperature=0.7)
            out_i.loss.backward()
            total += out_i.loss.detach() / step.grad_scale
        grad = w.grad.clone()
        dist.all_reduce(grad)
        dist.all_reduce(total)
        out[mode] = (grad / world_size, total)
    return out


def test_group_token_mean_and_constant_over_microbatches_and_dp():
    """Each prompt group weighs the same (token mean inside the group, mean over groups), and Dr. GRPO's token sum
    over max_new_tokens x sequences, with a group split over micro-batches and DP ranks; log-probs at T=0.7."""
    results = run_ranks(_weighted_body, world_size=2)
    mbs, weight = _data()
    rows = []  # (per-token loss [s], mask [s]) per sample, in sample order
    w = weight.clone().requires_grad_(True)
    for x, target, adv, mask in mbs:
        lp = torch.log_softmax((x @ w.t()) / 0.7, -1).gather(-1, target[..., None])[..., 0]
        rows += [((-adv * lp)[r], mask[r]) for r in range(2)]
    groups = [rows[g : g + GROUP] for g in range(0, 8, GROUP)]
    by_group = sum(sum((l * m).sum() for l, m in grp) / sum(m.sum() for _, m in grp) for grp in groups) / len(groups)
    constant = sum((l * m).sum() for l, m in rows) / (MAX_NEW_TOKENS * len(rows))
    for mode, want in (("group_token_mean", by_group), ("constant", constant)):
        (grad_want,) = torch.autograd.grad(want, w, retain_graph=True)
        for got in results:
            grad, loss = got[mode]
            torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, grad_want, rtol=1e-5, atol=1e-6)
    token_mean = sum((l * m).sum() for l, m in rows) / sum(m.sum() for _, m in rows)
    assert abs(float(by_group - token_mean)) > 1e-3  # the case tells the aggregations apart


def test_sample_loss_weights_by_hand():
    from aapo_megatron.algorithms.aggregation import sample_loss_weights

    lengths = [1, 3, 4, 4, 9]  # groups of 2: {0,1} 4 tokens, {2,3} 8, {4} 9; T = 21, N = 3
    assert sample_loss_weights(lengths, range(5), "group_token_mean", 2, 10).tolist() == pytest.approx(
        [21 / 12, 21 / 12, 21 / 24, 21 / 24, 21 / 27])
    assert sample_loss_weights(lengths, range(5), "constant", 2, 10).tolist() == pytest.approx([21 / 50] * 5)
    assert sample_loss_weights(lengths, range(2, 4), "token_mean", 2, 10).tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        sample_loss_weights(lengths, range(5), "mean", 2, 10)
