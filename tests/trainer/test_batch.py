"""Micro-batch packing: shifted targets, masks exactly on completion tokens, fixed shapes, DP sharding."""

import pytest
import torch

from aapo_megatron.trainer.batch import RolloutBatch, make_micro_batches, micro_batch_shape, shard_indices


def _batch():
    return RolloutBatch(
        prompt_ids=[[1, 2, 3], [4, 5], [6]],
        completion_ids=[[7, 8], [9, 10, 11], [12]],
        advantages=torch.tensor([0.5, -1.0, 2.0]),
        rollout_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6]],
    )


def test_targets_and_masks_align():
    b = _batch()
    rows, seq = micro_batch_shape(b, token_budget=16, multiple_of=8)
    assert (rows, seq) == (2, 8)
    mbs = make_micro_batches(b, range(3), rows, seq)
    assert len(mbs) == 2 and all(m.tokens.shape == (2, 8) for m in mbs)
    m0 = mbs[0]
    # Sample 0: tokens 1 2 3 7 8; positions 2 and 3 predict the completion tokens 7 and 8.
    assert m0.tokens[0, :5].tolist() == [1, 2, 3, 7, 8]
    assert m0.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert m0.targets[0, 2:4].tolist() == [7, 8]
    assert m0.advantages[0, 2:4].tolist() == [0.5, 0.5] and m0.advantages[0, 4] == 0
    assert m0.rollout_logprobs[0, 2:4].tolist() == pytest.approx([-0.1, -0.2])
    # Sample 1: prompt of 2, completion of 3.
    assert m0.targets[1, 1:4].tolist() == [9, 10, 11] and m0.loss_mask[1].sum() == 3
    # The padding row of the last micro-batch carries nothing.
    assert mbs[1].sample_index.tolist() == [2, -1] and mbs[1].loss_mask[1].sum() == 0
    assert sum(m.num_tokens for m in mbs) == b.num_completion_tokens() == 6


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        RolloutBatch([[1]], [[2]], torch.zeros(2))
    with pytest.raises(ValueError, match=r"rollout_logprobs: lengths differ from completions at samples \[0\]"):
        RolloutBatch([[1]], [[2, 3]], torch.zeros(1), rollout_logprobs=[[0.0]])
    with pytest.raises(ValueError, match="empty prompt"):
        make_micro_batches(RolloutBatch([[]], [[2]], torch.zeros(1)), range(1), 1, 8)
    with pytest.raises(ValueError, match="exceed the micro-batch length 2"):
        make_micro_batches(_batch(), range(1), 1, 2)


def test_shard_indices_cover_exactly_once():
    for n in (1, 7, 12):
        for world in (1, 2, 3, 4):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
