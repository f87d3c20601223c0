"""Global token-mean across micro-batches and data-parallel ranks (2 real gloo processes): the averaged DP
gradient equals the gradient of the single-process loss over the whole step."""

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
    loss = num / den  # the global token mean over the whole step (docs/algorithms.md)
    loss.backward()
    for tokens, grad, step_loss in results:
        assert tokens == den
        torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step_loss, loss.detach(), rtol=1e-5, atol=1e-6)
