"""Reward functions in-process, on real math-verify / reasoning-gym."""

import math

import pytest

from aapo_megatron.config import RewardConfig
from aapo_megatron.rewards import RewardError, RewardInput, gold_answer, last_boxed, registered_rewards, resolve_reward
from aapo_megatron.rewards.functions import CosineLengthOptions, cosine_length_value


def score(name, completion, sample, num_tokens=None, **cfg):
    return resolve_reward(name)(RewardInput(completion, sample, RewardConfig(**cfg), num_tokens))


# --------------------------------------------------------------------------- accuracy

EQUIVALENT = [
    # (completion, gold, answer_tag)
    ("So the result is \\boxed{0.5}.", "1/2", None),  # decimal vs fraction
    ("\\boxed{\\frac{1}{2}}", "0.5", None),  # LaTeX vs decimal
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", None),  # LaTeX shorthand
    ("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}", None),  # plain vs LaTeX
    ("\\boxed{3/4}", "0.75", None),
    ("\\boxed{1,000}", "1000", None),
    ("\\boxed{x = 3}", "3", None),
    ("<think>\n2+2\n</think>\n<answer>\n0.5\n</answer>", "1/2", "answer"),  # tagged, plain
    ("<answer>\\frac{1}{2}</answer>", "0.5", "answer"),  # tagged, LaTeX
    ("<answer>The answer is $\\boxed{\\frac{1}{2}}$</answer>", "1/2", "answer"),  # tagged and boxed
    ("first \\boxed{3}, no wait: \\boxed{\\frac{1}{2}}", "1/2", None),  # the last box is the answer
    ("\\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", None),  # GSM8K solution
    ("\\boxed{2.5}", "We get $x = \\frac{5}{2}$, so the answer is $\\boxed{\\frac{5}{2}}$.", None),  # MATH solution
    ("\\boxed{1234}", "#### 1,234", None),
]

WRONG = [
    ("\\boxed{0.25}", "1/2", None),
    ("\\boxed{-\\frac{1}{2}}", "1/2", None),
    ("the answer is 1/2", "1/2", None),  # no \boxed{}: no final answer
    ("\\boxed{\\frac{1}{2}} wait, no: \\boxed{3}", "1/2", None),  # the last box counts
    ("\\boxed{1/2}", "1/2", "answer"),  # tag configured but absent
    ("<answer>0.5</answer>", "0.51", "answer"),
    ("\\boxed{73}", "#### 72", None),
    ("\\boxed{\\frac{1}{2}", "1/2", None),  # truncated box
]


@pytest.mark.parametrize("completion,gold,tag", EQUIVALENT)
def test_accuracy_equivalent_forms(completion, gold, tag):
    assert score("accuracy", completion, {"answer": gold}, answer_tag=tag) == 1.0


@pytest.mark.parametrize("completion,gold,tag", WRONG)
def test_accuracy_wrong_answers(completion, gold, tag):
    assert score("accuracy", completion, {"answer": gold}, answer_tag=tag) == 0.0


def test_accuracy_without_a_usable_ground_truth_is_nan():
    assert math.isnan(score("accuracy", "\\boxed{1}", {}))
    assert math.isnan(score("accuracy", "\\boxed{1}", {"answer": "  "}))
    assert math.isnan(score("accuracy", "\\boxed{1}", {"answer": "}{"}))  # math-verify parses nothing


def test_answer_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{1} " + "\\boxed{" * 5000) == "1"  # a degenerate, looping completion
    assert last_boxed("\\boxed {3}") == "3"
    assert gold_answer("Total: 5 + 7 = 12\n#### 1,012") == "1012"
    assert gold_answer("so $\\boxed{\\{1, 2\\}}$") == "\\{1, 2\\}"
    assert gold_answer(42) == "42"


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>\nreason\n</think>\n<answer>\n42\n</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n<answer>\n\\boxed{42}\n</answer>\n", 1.0),
        ("<think>reason</think><answer>42</answer>", 0.0),  # the paper's pattern wants the newlines
        ("<think>\nreason\n</think>\n42", 0.0),  # no answer block
        ("preamble <think>\nreason\n</think>\n<answer>\n42\n</answer>", 0.0),  # must start with <think>
        ("<think>\nreason\n</think>\n<answer>\n42\n</answer>\nand more text", 0.0),
    ],
)
def test_format_think_answer(completion, expected):
    assert score("format", completion, {}) == expected


def test_format_think_answer_follows_the_answer_tag():
    text = "<think>\nr\n</think>\n<final>\n42\n</final>"
    assert score("format", text, {}, answer_tag="final") == 1.0
    assert score("format", text, {}) == 0.0


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("reasoning here\n</think>\nThe answer is \\boxed{4}", 1.0),
        ("reasoning here</think> The answer", 0.0),
        ("a\n</think>\nb\n</think>\nc", 0.0),  # closed twice
        ("no think at all", 0.0),
    ],
)
def test_format_think_close(completion, expected):
    assert score("format", completion, {}, options={"format": {"style": "think_close"}}) == expected


# --------------------------------------------------------------------------- cosine_length


def test_cosine_length_follows_the_open_rs_curve():
    gold = {"answer": "1/2"}
    right, wrong = "\\boxed{1/2}", "\\boxed{7}"
    cos = {"max_len": 100}
    cfg = dict(options={"cosine_length": cos})
    # Correct: 1.0 at length 0, 0.5 at max_len, 0.75 half-way; wrong: 0.0 -> -0.5 (open-rs defaults).
    for text, at_zero, at_end in ((right, 1.0, 0.5), (wrong, 0.0, -0.5)):
        for length, expected in ((50, (at_zero + at_end) / 2), (100, at_end), (250, at_end)):
            padded = text.ljust(length)
            assert score("cosine_length", padded, gold, **cfg) == pytest.approx(expected, abs=1e-12), (text, length)
        # Near length 0 the reward approaches at_zero.
        assert score("cosine_length", text, gold, **cfg) == pytest.approx(at_zero, abs=0.02)
    # Reproduce open-rs's unclipped curve: at 2 * max_len the cosine is back at its length-0 value.
    long_right = right.ljust(200)
    assert score("cosine_length", long_right, gold, options={"cosine_length": dict(cos, clip_length=False)}) == pytest.approx(1.0)
    # Measured in tokens when asked.
    assert score("cosine_length", right, gold, num_tokens=50,
                 options={"cosine_length": dict(cos, length_unit="tokens")}) == pytest.approx(0.75)


def test_cosine_length_value_closed_form():
    cfg = CosineLengthOptions(max_len=1000, min_value_correct=0.2, max_value_correct=0.9,
                              min_value_wrong=-0.1, max_value_wrong=-0.7)
    for length in (0, 137, 500, 999, 1000):
        c = math.cos(math.pi * length / 1000)
        assert cosine_length_value(True, length, cfg) == pytest.approx(0.2 + 0.5 * 0.7 * (1 + c))
        assert cosine_length_value(False, length, cfg) == pytest.approx(-0.7 + 0.5 * 0.6 * (1 + c))


def test_cosine_length_in_tokens_needs_token_counts():
    with pytest.raises(RewardError, match="cosine_length.length_unit=tokens needs num_tokens"):
        score("cosine_length", "\\boxed{1}", {"answer": "1"}, options={"cosine_length": {"length_unit": "tokens"}})


def test_cosine_length_without_ground_truth_is_nan():
    assert math.isnan(score("cosine_length", "\\boxed{1}", {}))


# --------------------------------------------------------------------------- reasoning_gym


def test_reasoning_gym_uses_the_task_score_answer():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("chain_sum", size=3, seed=5)
    entry = ds[1]
    meta = {"reasoning_gym": {"task": "chain_sum", "args": {}, "entry": entry}, "answer": entry["answer"]}
    good = f"<think>\nadd\n</think>\n<answer>{entry['answer']}</answer>"
    bad = f"<answer>{int(entry['answer']) + 1}</answer>"
    assert score("reasoning_gym", good, meta, answer_tag="answer") == 1.0
    assert score("reasoning_gym", bad, meta, answer_tag="answer") == ds.score_answer(str(int(entry["answer"]) + 1), entry)
    assert score("reasoning_gym", bad, meta, answer_tag="answer") < 1.0
    assert score("reasoning_gym", "no answer", meta, answer_tag="answer") == 0.0
    assert score("reasoning_gym", f"\\boxed{{{entry['answer']}}}", meta) == 1.0  # boxed when no tag is set
    assert math.isnan(score("reasoning_gym", good, {"answer": "3"}))  # not a reasoning-gym prompt


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtins_and_resolves_custom_functions():
    assert registered_rewards()[:4] == ["accuracy", "cosine_length", "format", "reasoning_gym"]
    fn = resolve_reward("tests.rewards.faults:raise_on_request")
    assert fn(RewardInput("ok", {}, RewardConfig())) == 2.0


@pytest.mark.parametrize(
    "name,message",
    [
        ("acuracy", "unknown reward function 'acuracy' (did you mean 'accuracy'?); registered: accuracy, "
                    "cosine_length, format, reasoning_gym"),
        ("no_such_pkg.mod:fn", "reward function 'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod'"),
        ("tests.rewards.faults:missing", "module 'tests.rewards.faults' has no callable 'missing'"),
        ("tests.rewards.faults:NOT_CALLABLE", "module 'tests.rewards.faults' has no callable 'NOT_CALLABLE'"),
    ],
)
def test_registry_errors(name, message):
    with pytest.raises(RewardError) as err:
        resolve_reward(name)
    assert message in str(err.value)
