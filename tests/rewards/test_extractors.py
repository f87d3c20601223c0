"""reward.answer_extractors (boxed, tag, last_number, in the configured order) and the format reward's
marked_answer style, on real math-verify and reasoning-gym: what an instruct model's answers need."""

import pytest

from aapo_megatron.config import ConfigError, RewardConfig
from aapo_megatron.validation import load_config
from aapo_megatron.rewards import RewardInput, resolve_reward
from aapo_megatron.rewards.extract import completion_answer, last_number


def score(name, completion, sample, **cfg):
    return resolve_reward(name)(RewardInput(completion, sample, RewardConfig(**cfg)))


@pytest.mark.parametrize("text,expected", [
    ("34 - 10 = 24.", "24"),  # SmolLM2's usual style: the result is the final number
    ("so x = -3", "-3"),
    ("10-3", "3"),  # a minus between digits is the operator, not a sign
    ("a total of $1,234.50 dollars", "1234.50"),
    ("half of it is 3/4", "3/4"),
    ("step 1: 5+6=11\nstep 2: 11*2=22 legs", "22"),
    ("model v2 says 7", "7"),  # digits glued to a word do not count
    ("no digits at all", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_extractors_are_tried_in_order_first_hit_wins():
    text = "2 + 3 = 5, so <answer>5</answer> and \\boxed{6} or 7"
    assert completion_answer(text, None, ["boxed", "tag", "last_number"]) == "6"
    assert completion_answer(text, None, ["tag", "boxed"]) == "5"
    assert completion_answer(text, None, ["last_number"]) == "7"
    assert completion_answer("the sum is 9", None, ["boxed", "last_number"]) == "9"  # fallback
    assert completion_answer("the sum is 9", None, ["boxed", "tag"]) is None
    assert completion_answer("<res>4</res> 8", "res", ["tag", "last_number"]) == "4"  # tag follows answer_tag
    # None keeps the old default: answer_tag when set, else the last box (no number fallback).
    assert completion_answer("the sum is 9", None, None) is None
    assert completion_answer("<answer>1</answer> \\boxed{2}", "answer", None) == "1"


@pytest.mark.parametrize("completion,gold,extractors,expected", [
    ("2 cows have 4 + 4 = 8 legs.", "8", ["boxed", "last_number"], 1.0),
    ("2 cows have 4 + 4 = 8 legs. So \\boxed{8}.", "8", ["boxed", "last_number"], 1.0),
    ("The answer is \\boxed{8}, or maybe 9", "8", ["boxed", "last_number"], 1.0),  # the box wins over the number
    ("The answer is \\boxed{8}, or maybe 9", "8", ["last_number"], 0.0),
    ("2 cows have 4 + 4 = 8 legs.", "8", ["boxed"], 0.0),
    ("It is 0.5", "1/2", ["last_number"], 1.0),  # math-verify equivalence on the extracted number
    ("The total is 1,000 legs", "1000", ["last_number"], 1.0),
])
def test_accuracy_with_configured_extractors(completion, gold, extractors, expected):
    assert score("accuracy", completion, {"answer": gold}, answer_extractors=extractors) == expected


def test_format_marked_answer():
    kw = {"options": {"format": {"style": "marked_answer"}}}
    assert score("format", "so \\boxed{8}", {}, answer_extractors=["boxed", "last_number"], **kw) == 1.0
    assert score("format", "so it is 8", {}, answer_extractors=["boxed", "last_number"], **kw) == 0.0
    assert score("format", "<answer>8</answer>", {}, answer_extractors=["boxed", "last_number"], **kw) == 0.0
    assert score("format", "<answer>8</answer>", {}, answer_extractors=["tag", "last_number"], **kw) == 1.0
    assert score("format", "<answer>8</answer>", {}, **kw) == 1.0  # no extractors set: a box or an answer tag
    assert score("format", "so it is 8", {}, answer_extractors=["last_number"], **kw) == 0.0


def test_reasoning_gym_reward_reads_the_final_number():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("leg_counting", size=2, seed=3, min_animals=1, max_animals=2, max_instances=3)
    entry = ds[0]
    meta = {"reasoning_gym": {"task": "leg_counting", "args": {}, "entry": entry}, "answer": entry["answer"]}
    good = f"Counting the legs gives {entry['answer']}."
    assert score("reasoning_gym", good, meta, answer_extractors=["boxed", "last_number"]) == 1.0
    assert score("reasoning_gym", good, meta) == 0.0  # default extractor: a box, and there is none


def test_unknown_extractor_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"'reward\.answer_extractors' must be list\['boxed' \| 'tag' \| 'last_number'\]"):
        load_config(None, ["reward.answer_extractors=[boxed,final_number]"])


def test_an_empty_box_or_tag_is_no_answer():
    """SmolLM2 trained with AAPO on the demo learned to echo the prompt's "\\boxed{}" ("The result in \\boxed{}
    is 11."): that earned the format reward and, read as an empty answer, hid the final number from accuracy."""
    echo = "The result in \\boxed{} is 11."
    ext = ["boxed", "last_number"]
    assert completion_answer(echo, None, ext) == "11"  # falls through to the number
    assert completion_answer("\\boxed{7} then \\boxed{ }", None, ["boxed"]) == "7"  # an earlier full box
    assert completion_answer("<answer></answer> 5", None, ["tag", "last_number"]) == "5"
    assert score("accuracy", echo, {"answer": "11"}, answer_extractors=ext) == 1.0
    assert score("format", echo, {}, answer_extractors=ext, options={"format": {"style": "marked_answer"}}) == 0.0
    assert score("format", "so \\boxed{11}", {}, answer_extractors=ext, options={"format": {"style": "marked_answer"}}) == 1.0
