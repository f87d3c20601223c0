"""reasoning-gym source: deterministic by seed, disjoint splits, scored by the task's own score_answer."""

import pytest

from aapo_megatron.config import DataConfig, RewardConfig
from aapo_megatron.data import DataError, PromptDataset
from aapo_megatron.data.reasoning_gym_source import generate_reasoning_gym, reasoning_gym_splits
from aapo_megatron.rewards import RewardInput, resolve_reward


def cfg(**kw):
    base = dict(source="reasoning_gym", reasoning_gym_task="chain_sum", train_size=60, eval_size=15, seed=5,
                chat_template="plain")
    base.update(kw)
    return DataConfig(**base)


def test_splits_are_deterministic_by_seed():
    train_a, eval_a = reasoning_gym_splits(cfg())
    train_b, eval_b = reasoning_gym_splits(cfg())
    assert (train_a, eval_a) == (train_b, eval_b)
    assert len(train_a) == 60 and len(eval_a) == 15
    train_c, eval_c = reasoning_gym_splits(cfg(seed=6))
    assert [r["question"] for r in train_c] != [r["question"] for r in train_a]
    assert [r["question"] for r in eval_c] != [r["question"] for r in eval_a]
    # Growing the split keeps its prefix (items depend on (seed, index) only).
    bigger, _ = reasoning_gym_splits(cfg(train_size=80))
    assert bigger[:60] == train_a


def test_held_out_questions_never_appear_in_training():
    train, held_out = reasoning_gym_splits(cfg(train_size=100, eval_size=60,
                                               reasoning_gym_args={"min_terms": 2, "max_terms": 2, "max_digits": 1}))
    train_q = {r["question"] for r in train}
    assert len(held_out) == 60 and not train_q & {r["question"] for r in held_out}
    assert len({r["question"] for r in held_out}) == 60  # 200 distinct problems exist: overlap was likely


def test_prompts_and_rewards_from_reasoning_gym(tokenizer):
    ds = PromptDataset.from_config(cfg(reasoning_gym_task="basic_arithmetic"), tokenizer, split="eval")
    assert len(ds) == 15 and ds.name == "reasoning_gym:basic_arithmetic/eval"
    p = ds[3]
    assert p.text == p.reasoning_gym["entry"]["question"] + "\n"
    sample = p.reward_sample()
    assert sample["answer"] == p.reasoning_gym["entry"]["answer"]
    rcfg = RewardConfig(answer_tag="answer")
    gym, acc = resolve_reward("reasoning_gym"), resolve_reward("accuracy")
    right = RewardInput(f"<think>\nsum\n</think>\n<answer>{sample['answer']}</answer>", sample, rcfg)
    wrong = RewardInput(f"<answer>{int(sample['answer']) + 3}</answer>", sample, rcfg)
    assert (gym(right), acc(right)) == (1.0, 1.0)
    assert gym(wrong) < 1.0 and acc(wrong) == 0.0


def test_reasoning_gym_errors():
    with pytest.raises(DataError, match="unknown reasoning-gym task 'chain_summ' \\(did you mean 'chain_sum'"):
        generate_reasoning_gym("chain_summ", {}, 3, 0)
    with pytest.raises(DataError, match="data.reasoning_gym_args must not set 'seed'; use data.train_size/eval_size and data.seed"):
        generate_reasoning_gym("chain_sum", {"seed": 1}, 3, 0)
    with pytest.raises(DataError, match="reasoning-gym task 'chain_sum' rejected data.reasoning_gym_args=\\{'min_terms': 0\\}: "
                                        "min_terms must be positive"):
        generate_reasoning_gym("chain_sum", {"min_terms": 0}, 3, 0)
    with pytest.raises(DataError, match="produced only \\d+ held-out questions not in the 400 training ones \\(asked for "
                                        "data.eval_size=50\\)"):
        reasoning_gym_splits(cfg(train_size=400, eval_size=50,
                                 reasoning_gym_args={"min_terms": 2, "max_terms": 2, "max_digits": 1}))
