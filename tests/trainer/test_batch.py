"""Micro-batch packing: shifted targets, masks exactly on completion tokens, fixed shapes, DP sharding."""

import pytest
import torch

from aapo_megatron.trainer.batch import (
    RolloutBatch,
    make_micro_batches,
    choose_row_length,
    make_packed_micro_batches,
    micro_batch_shape,
    pack_rows,
    packed_row_length,
    shard_indices,
)


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


def test_packed_rows_keep_targets_masks_and_segments():
    b = _batch()  # sequence lengths 5, 5, 2
    assert packed_row_length(b, token_budget=64) == 16 and packed_row_length(b, token_budget=8) == 8
    mbs = make_packed_micro_batches(b, range(3), token_budget=16, row_len=16)
    assert len(mbs) == 1 and mbs[0].tokens.shape == (1, 16)
    m = mbs[0]
    assert m.tokens[0].tolist() == [1, 2, 3, 7, 8, 4, 5, 9, 10, 11, 6, 12, 0, 0, 0, 0]
    assert m.segment_ids[0].tolist() == [0] * 5 + [1] * 5 + [2] * 2 + [3] * 4  # tail padding: its own segment
    assert m.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]
    # A sample's last token predicts nothing (target 0, mask 0), never the next sample's first token.
    assert m.targets[0, :12].tolist() == [2, 3, 7, 8, 0, 5, 9, 10, 11, 0, 12, 0]
    assert m.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1] + [0] * 5
    assert m.advantages[0, 6:9].tolist() == [-1.0] * 3 and m.advantages[0, 10] == 2.0
    assert m.rollout_logprobs[0, 6:9].tolist() == pytest.approx([-0.3, -0.4, -0.5])
    assert m.sample_index[0].tolist() == [0] * 5 + [1] * 5 + [2] * 2 + [-1] * 4
    assert m.num_tokens == b.num_completion_tokens() == 6


def test_packed_micro_batches_spread_rows_evenly():
    b = RolloutBatch([[1] * 3] * 7, [[2] * 5] * 7, torch.zeros(7))  # 7 samples of 8 tokens
    # Budget 40 allows 5 rows of 8; 7 rows need 2 micro-batches, spread 4 + 4 (one padding row), not 5 + 5.
    mbs = make_packed_micro_batches(b, range(7), token_budget=40, row_len=8)
    assert [m.tokens.shape for m in mbs] == [(4, 8), (4, 8)]
    assert sorted(int((m.sample_index >= 0).any(dim=1).sum()) for m in mbs) == [3, 4]
    assert sum(m.num_tokens for m in mbs) == 35
    assert pack_rows([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]  # first-fit decreasing


def test_row_length_computing_fewest_tokens():
    # Eight samples of 5 tokens and one of 8: rows of 8 hold one sample each (9 x 8 = 72 tokens computed),
    # rows of 16 hold [8, 5], [5, 5, 5], [5, 5, 5] (3 x 16 = 48).
    short = RolloutBatch([[1, 2]] * 9, [[3] * 3] * 8 + [[3] * 6], torch.zeros(9))
    assert choose_row_length(short, range(9), token_budget=1024, max_factor=1) == 8
    assert choose_row_length(short, range(9), token_budget=1024, max_factor=2) == 16
    # Samples near the longest length fill rows of 1x and 2x alike: the shorter row wins (cheaper attention).
    even = RolloutBatch([[1] * 4] * 6, [[2] * 4] * 6, torch.zeros(6))
    assert choose_row_length(even, range(6), token_budget=1024, max_factor=3) == 8


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        RolloutBatch([[1]], [[2]], torch.zeros(2))
    with pytest.raises(ValueError, match=r"rollout_logprobs: lengths differ from completions at samples \[0\]"):
        RolloutBatch([[1]], [[2, 3]], torch.zeros(1), rollout_logprobs=[[0.0]])
    with pytest.raises(ValueError, match="empty prompt"):
        make_micro_batches(RolloutBatch([[]], [[2]], torch.zeros(1)), range(1), 1, 8)
    with pytest.raises(ValueError, match="exceed the micro-batch length 2"):
        make_micro_batches(_batch(), range(1), 1, 2)
    with pytest.raises(ValueError, match="a sample of 5 tokens exceeds the packed row length 4"):
        make_packed_micro_batches(_batch(), range(3), 16, 4)
    with pytest.raises(ValueError, match="sample 0: empty prompt"):
        make_packed_micro_batches(RolloutBatch([[]], [[2]], torch.zeros(1)), range(1), 8, 8)


def test_shard_indices_cover_exactly_once():
    for n in (1, 7, 12):
        for world in (1, 2, 3, 4):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
