"""ResumableSampler: per-epoch permutations fixed by seed, exact mid-epoch resume, state validation."""

import json

import numpy as np
import pytest

from aapo_megatron.config import DataConfig
from aapo_megatron.data import PromptDataset, ResumableSampler, SamplerStateError


def draw(sampler, batches, size):
    return [sampler.next_batch(size) for _ in range(batches)]


def test_each_epoch_is_a_fresh_permutation_fixed_by_the_seed():
    n = 23
    a, b, c = ResumableSampler(n, seed=7), ResumableSampler(n, seed=7), ResumableSampler(n, seed=8)
    epochs_a = [a.next_batch(n) for _ in range(3)]
    for e in epochs_a:
        assert sorted(e) == list(range(n))
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    assert epochs_a == [b.next_batch(n) for _ in range(3)]
    assert epochs_a[0] != c.next_batch(n)
    assert epochs_a[1] == np.random.default_rng([7, 1]).permutation(n).tolist()  # the documented order


def test_batches_run_across_the_end_of_an_epoch():
    s = ResumableSampler(5, seed=0)
    e0, e1 = np.random.default_rng([0, 0]).permutation(5).tolist(), np.random.default_rng([0, 1]).permutation(5).tolist()
    assert s.next_batch(3) == e0[:3]
    assert s.next_batch(3) == e0[3:] + e1[:1]
    assert s.state_dict() == {"epoch": 1, "position": 1, "seed": 0, "num_samples": 5, "shuffle": True}
    assert s.next_batch(11) == e1[1:] + np.random.default_rng([0, 2]).permutation(5).tolist() + \
        np.random.default_rng([0, 3]).permutation(5).tolist()[:2]


@pytest.mark.parametrize("consumed", [0, 4, 9, 10, 11, 27])
def test_resume_continues_with_exactly_the_next_indices(consumed):
    n, size = 10, 3
    ref = ResumableSampler(n, seed=1234)
    if consumed:
        ref.next_batch(consumed)
    state = json.loads(json.dumps(ref.state_dict()))  # what a checkpoint stores
    expected = draw(ref, 8, size)

    resumed = ResumableSampler(n, seed=1234)
    resumed.next_batch(5)  # whatever it did before is overwritten by the state
    resumed.load_state_dict(state)
    assert draw(resumed, 8, size) == expected
    # And the uninterrupted stream is the same as the interrupted one.
    straight = ResumableSampler(n, seed=1234)
    flat = straight.next_batch(consumed + 8 * size)
    assert flat[consumed:] == [i for b in expected for i in b]


def test_resume_yields_the_next_prompts_of_a_dataset(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"question {i}?", "answer": str(i)}) for i in range(13)) + "\n")
    cfg = DataConfig(source="jsonl", train_path=str(path), chat_template="plain", prompts_per_step=4, seed=99)
    ds = PromptDataset.from_config(cfg, tokenizer)
    s1 = ResumableSampler(len(ds), seed=cfg.seed, shuffle=cfg.shuffle)
    before = [ds[i].answer for _ in range(2) for i in s1.next_batch(cfg.prompts_per_step)]  # two RL steps
    ckpt = {"sampler": s1.state_dict()}
    nxt = [[ds[i].answer for i in s1.next_batch(cfg.prompts_per_step)] for _ in range(3)]

    ds2 = PromptDataset.from_config(cfg, tokenizer)  # a new process after restart
    s2 = ResumableSampler(len(ds2), seed=cfg.seed, shuffle=cfg.shuffle)
    s2.load_state_dict(ckpt["sampler"])
    assert [[ds2[i].answer for i in s2.next_batch(cfg.prompts_per_step)] for _ in range(3)] == nxt
    first_epoch = before + [a for b in nxt for a in b][:5]
    assert sorted(first_epoch, key=int) == [str(i) for i in range(13)]  # every prompt once per epoch


def test_no_shuffle_is_sequential():
    s = ResumableSampler(4, shuffle=False)
    assert s.next_batch(6) == [0, 1, 2, 3, 0, 1]


def test_state_errors():
    s = ResumableSampler(10, seed=3)
    good = s.state_dict()
    with pytest.raises(SamplerStateError, match="sampler state has num_samples=11 but this sampler has num_samples=10; "
                                                "the prompt order would differ \\(did the dataset or data.seed change\\?\\)"):
        s.load_state_dict({**good, "num_samples": 11})
    with pytest.raises(SamplerStateError, match="sampler state has seed=4 but this sampler has seed=3"):
        s.load_state_dict({**good, "seed": 4})
    with pytest.raises(SamplerStateError, match="sampler state has shuffle=False but this sampler has shuffle=True"):
        s.load_state_dict({**good, "shuffle": False})
    with pytest.raises(SamplerStateError, match="sampler state lacks 'position' \\(has: epoch, seed, num_samples, shuffle\\)"):
        s.load_state_dict({k: v for k, v in good.items() if k != "position"})
    with pytest.raises(SamplerStateError, match="sampler state out of range: epoch=0, position=11 \\(num_samples=10\\)"):
        s.load_state_dict({**good, "position": 11})
    with pytest.raises(ValueError, match="ResumableSampler needs at least one sample, got num_samples=0"):
        ResumableSampler(0)


def test_peek_batch_shows_the_next_batch_without_consuming_it():
    s = ResumableSampler(5, seed=3)
    s.next_batch(4)
    state = s.state_dict()
    peeked = s.peek_batch(3)  # crosses into epoch 1
    assert s.state_dict() == state
    assert s.next_batch(3) == peeked
    assert s.peek_batch(2) == s.next_batch(2)
