"""RewardPool: real worker processes, real math-verify, timeouts, crashes and errors."""

import math
import os

import pytest
import torch

from aapo_megatron.config import RewardConfig
from aapo_megatron.rewards import RewardError, RewardInput, RewardPool, resolve_reward

PATHOLOGICAL = "\\boxed{9^{9^{9}}}"  # sympy tries to evaluate 9**387420489 when comparing with the gold
GOLD = {"answer": "1/2"}
BATCH = [
    ("<think>\nhalf\n</think>\n<answer>\n\\boxed{0.5}\n</answer>", GOLD),
    ("\\boxed{\\frac{1}{2}}", GOLD),
    ("\\boxed{3}", GOLD),
    ("no answer", GOLD),
    ("\\boxed{-4}", {"answer": "#### -4"}),
    ("\\boxed{1}", {}),  # no ground truth: accuracy and cosine are NaN
]


def in_process(cfg, batch, num_tokens=None):
    """The reference: every function called directly, no pool."""
    fns = [resolve_reward(n) for n in cfg.functions]
    rows = []
    for i, (text, sample) in enumerate(batch):
        x = RewardInput(text, sample, cfg, None if num_tokens is None else num_tokens[i])
        rows.append([fn(x) for fn in fns])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture(scope="module")
def pool():
    cfg = RewardConfig(functions={"accuracy": 1.0, "format": 0.5, "cosine_length": 2.0}, num_workers=2, timeout_s=3.0)
    with RewardPool(cfg) as p:
        p.wait_ready()
        yield p


def test_pool_matches_in_process_rewards(pool):
    texts, samples = zip(*BATCH)
    result = pool.score(list(texts), list(samples))
    expected = in_process(pool.cfg, BATCH)
    assert result.names == ["accuracy", "format", "cosine_length"]
    assert torch.equal(result.weights, torch.tensor([1.0, 0.5, 2.0]))
    assert result.rewards.dtype == torch.float32 and result.rewards.shape == (6, 3)
    torch.testing.assert_close(result.rewards, expected, equal_nan=True, rtol=0, atol=0)
    assert result.rewards[:, 0].tolist()[:5] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math.isnan(result.rewards[5, 0]) and math.isnan(result.rewards[5, 2])
    assert not result.failed.any() and (result.num_timeouts, result.num_crashes, result.num_errors) == (0, 0, 0)
    # NaN-ignoring weighted sum, as the grouped-advantage op computes it; row 5 has only format (0.0 * 0.5).
    total = result.total()
    assert total[5].item() == 0.0
    masked = result.rewards.clone()
    masked[1] = torch.nan  # a row where no function applies sums to 0 (an empty sum)
    assert type(result)(masked, result.names, result.weights, result.failed).total()[1].item() == 0.0
    assert total[0].item() == pytest.approx(1.0 + 0.5 + 2.0 * expected[0, 2].item())
    # The contract with the grouped-advantage op: it takes rewards [B*G, F] and weights [F] as returned.
    from aapo_megatron.ops.advantages import grouped_advantages

    adv = grouped_advantages(result.rewards, 3, weights=result.weights)
    torch.testing.assert_close(adv.rewards, total)
    m = result.metrics()
    assert m["reward/accuracy/mean"] == pytest.approx(3 / 5) and m["reward/accuracy/nan_frac"] == pytest.approx(1 / 6)


def test_pathological_expression_times_out_and_the_pool_keeps_scoring(pool):
    before = set(pool.worker_pids)
    texts = ["\\boxed{1/2}", PATHOLOGICAL, "\\boxed{0.5}", "\\boxed{7}"]
    result = pool.score(texts, [GOLD] * 4)
    assert result.num_timeouts == 1 and result.failed.tolist() == [False, True, False, False]
    assert result.rewards[1].tolist() == [0.0, 0.0, 0.0]  # on_failure=zero, every column
    assert result.rewards[[0, 2, 3], 0].tolist() == [1.0, 1.0, 0.0]
    assert len(result.messages) == 1
    assert result.messages[0].startswith("sample 1: reward timed out after 3s (worker pid ")
    assert result.messages[0].endswith("killed and replaced)")
    assert len(set(pool.worker_pids) - before) == 1  # the hung worker was replaced
    # The next batch is scored normally, by both the surviving and the new worker.
    texts, samples = zip(*BATCH)
    again = pool.score(list(texts), list(samples))
    torch.testing.assert_close(again.rewards, in_process(pool.cfg, BATCH), equal_nan=True, rtol=0, atol=0)
    assert again.num_timeouts == 0 and pool.totals["timeouts"] >= 1 and pool.totals["restarts"] >= 1


def test_crash_error_inf_and_nan_failure_value():
    cfg = RewardConfig(
        functions={"tests.rewards.faults:crash_on_request": 1.0, "tests.rewards.faults:raise_on_request": 1.0,
                   "tests.rewards.faults:inf_on_request": 1.0},
        num_workers=1, timeout_s=5.0, on_failure="nan",
    )
    with RewardPool(cfg) as pool:
        pid = pool.worker_pids[0]
        result = pool.score(["a", "RAISE", "CRASH", "b"], [{}] * 4)
        assert result.failed.tolist() == [False, True, True, False]
        assert (result.num_crashes, result.num_errors, result.num_timeouts) == (1, 1, 0)
        assert result.rewards[0].tolist() == [1.0, 2.0, 3.0] and result.rewards[3].tolist() == [1.0, 2.0, 3.0]
        assert result.rewards[1, 0].item() == 1.0 and math.isnan(result.rewards[1, 1])  # only the raising column
        assert torch.isnan(result.rewards[2]).all()  # the crashed sample: on_failure=nan everywhere
        assert result.messages[0] == "sample 1: tests.rewards.faults:raise_on_request: ValueError: asked to raise"
        assert result.messages[1] == f"sample 2: reward worker pid {pid} died (exit code 7); replaced"
        assert pool.worker_pids[0] != pid
        assert pool.score(["c"], [{}]).rewards.tolist() == [[1.0, 2.0, 3.0]]
        # +-inf is a failure of that function for that sample (on_failure value, counted, flagged); NaN is not.
        result = pool.score(["INF", "-INF", "NAN"], [{}] * 3)
        assert result.failed.tolist() == [True, True, False] and result.num_errors == 2
        assert result.rewards[:2, :2].tolist() == [[1.0, 2.0], [1.0, 2.0]] and torch.isnan(result.rewards[:, 2]).all()
        assert result.messages == [
            "sample 0: tests.rewards.faults:inf_on_request: returned inf (a reward must be finite; NaN means "
            "'does not apply')",
            "sample 1: tests.rewards.faults:inf_on_request: returned -inf (a reward must be finite; NaN means "
            "'does not apply')"]
        assert torch.isfinite(result.total()).all()  # nothing non-finite reaches the advantages


def test_pool_input_errors():
    with pytest.raises(RewardError, match="unknown reward function 'formatt' \\(did you mean 'format'\\?\\)"):
        RewardPool(RewardConfig(functions={"formatt": 1.0}))
    with pytest.raises(RewardError, match="reward.functions is empty"):
        RewardPool(RewardConfig(functions={}))
    cfg = RewardConfig(functions={"cosine_length": 1.0}, num_workers=1,
                       options={"cosine_length": {"length_unit": "tokens"}})
    with RewardPool(cfg) as pool:
        with pytest.raises(RewardError, match="score\\(\\) got 2 completions but 1 samples"):
            pool.score(["a", "b"], [{}])
        with pytest.raises(RewardError, match="needs score\\(..., num_tokens=...\\)"):
            pool.score(["a"], [{}])
        result = pool.score(["\\boxed{2}", "\\boxed{3}"], [{"answer": "2"}] * 2, num_tokens=[500, 1000])
        assert result.rewards[:, 0].tolist() == pytest.approx([0.75, -0.5])
        assert pool.score([], [], num_tokens=[]).rewards.shape == (0, 1)


def test_workers_are_light_and_exit_with_the_pool():
    pool = RewardPool(RewardConfig(functions={"tests.rewards.faults:torch_imported": 1.0}, num_workers=2))
    pool.wait_ready()
    assert pool.score(["a", "b"], [{}, {}]).rewards.tolist() == [[0.0], [0.0]]  # no torch in the workers
    procs = [w.proc for w in pool._workers]
    pool.close()
    assert all(p.poll() is not None for p in procs)
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


def test_reasoning_gym_prompts_through_the_pool():
    from aapo_megatron.data.reasoning_gym_source import generate_reasoning_gym

    rows = generate_reasoning_gym("basic_arithmetic", {}, 4, seed=3)
    samples = [{"answer": r["answer"], "reasoning_gym": r["reasoning_gym"]} for r in rows]
    texts = [f"<answer>{r['answer']}</answer>" for r in rows[:2]] + ["<answer>nope</answer>", "no tags"]
    cfg = RewardConfig(functions={"reasoning_gym": 1.0, "accuracy": 0.5}, num_workers=1, answer_tag="answer")
    with RewardPool(cfg) as pool:
        result = pool.score(texts, samples)
    assert result.rewards.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert not result.failed.any()


def test_a_worker_that_cannot_start_is_an_error():
    with pytest.raises(RewardError) as err:
        with RewardPool(RewardConfig(functions={"tests.rewards.faults:fails_to_warm_up": 1.0}, num_workers=1)) as pool:
            pool.score(["x"], [{}])
    assert str(err.value).startswith("reward worker could not start:\nTraceback")
    assert str(err.value).rstrip().endswith("RuntimeError: model file missing")
