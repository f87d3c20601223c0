"""Report arithmetic of benchmarks/sample_efficiency.py on given metric records (no training)."""

import importlib.util
import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("sample_efficiency", os.path.join(ROOT, "benchmarks",
                                                                                     "sample_efficiency.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _records(evals: dict, zero_var: list, step_s: float = 1.0) -> list:
    """Metric rows the way the trainer writes them: one training row per step, eval rows at some steps."""
    rows = [{"step": 0, "eval/accuracy": evals[0], "eval/reward": evals[0]}]
    for s, z in enumerate(zero_var, 1):
        rows.append({"step": s, "adv/zero_variance_group_fraction": z, "time/step": step_s, "loss": 0.1})
        if s in evals:
            rows.append({"step": s, "eval/accuracy": evals[s]})
    return rows


def test_steps_to_reach_first_crossing_and_never(se):
    pts = [(0, 0.3), (10, 0.45), (20, 0.5), (30, 0.49), (40, 0.6)]
    assert se.steps_to_reach(pts, 0.5) == 20
    assert se.steps_to_reach(list(reversed(pts)), 0.5) == 20  # order of the input does not matter
    assert se.steps_to_reach(pts, 0.3) == 0
    assert se.steps_to_reach(pts, 0.61) is None


def test_aggregate_mean_sample_std_min_max_on_common_steps(se):
    a = {0: 0.2, 10: 0.4, 20: 0.6}
    b = {0: 0.2, 10: 0.5, 20: 0.7}
    c = {0: 0.2, 10: 0.9}  # missing step 20: only steps every seed has are aggregated
    pts = se.aggregate([a, b, c])
    assert [p.step for p in pts] == [0, 10]
    p10 = pts[1]
    assert p10.mean == pytest.approx(0.6)
    assert p10.std == pytest.approx(statistics.stdev([0.4, 0.5, 0.9]))  # ddof=1
    assert (p10.min, p10.max, p10.n) == (0.4, 0.9, 3)
    one = se.aggregate([a])
    assert [p.std for p in one] == [0.0, 0.0, 0.0]


def test_summarize_targets_grpo_final_mean_and_zero_variance_windows(se):
    steps = 6
    runs = {
        "grpo": {1: _records({0: 0.4, 3: 0.45, 6: 0.5}, [0.5] * 6, 2.0),
                 2: _records({0: 0.4, 3: 0.5, 6: 0.6}, [0.3] * 6, 4.0)},
        "aapo": {1: _records({0: 0.4, 3: 0.6, 6: 0.7}, [0.6, 0.6, 0.4, 0.4, 0.2, 0.2]),
                 2: _records({0: 0.4, 3: 0.5, 6: 0.5}, [0.4, 0.4, 0.4, 0.4, 0.0, 0.0])},
        "dr_grpo": {1: _records({0: 0.4, 3: 0.4, 6: 0.45}, [0.1] * 6),
                    2: _records({0: 0.4, 3: 0.42, 6: 0.5}, [0.1] * 6)},
    }
    rep = se.summarize(runs, steps)
    assert rep["target"] == pytest.approx(0.55)  # GRPO's final mean
    aapo, grpo, dr = (rep["algorithms"][k] for k in ("aapo", "grpo", "dr_grpo"))
    assert aapo["steps_to_target"] == 3  # mean 0.55 at step 3
    assert aapo["steps_to_target_by_seed"] == {1: 3, 2: None}
    assert grpo["steps_to_target"] == 6
    assert grpo["steps_to_target_by_seed"] == {1: None, 2: 6}
    assert dr["steps_to_target"] is None
    assert aapo["final_mean"] == pytest.approx(0.6)
    assert aapo["final_std"] == pytest.approx(statistics.stdev([0.7, 0.5]))
    assert aapo["final_by_seed"] == {1: 0.7, 2: 0.5}
    # zero-variance: mean over seeds per step, then over steps 1-2 and 5-6
    assert aapo["zero_variance_first_third"] == pytest.approx(0.5)
    assert aapo["zero_variance_last_third"] == pytest.approx(0.1)
    assert grpo["zero_variance_mean"] == pytest.approx(0.4)
    assert grpo["median_step_seconds"] == pytest.approx(3.0)  # steps >= 2 of both seeds: 2.0 and 4.0

    text = se.format_report(rep)
    assert "| step | grpo | aapo | dr_grpo |" in text  # columns in the order of the runs
    assert ("| 3 | 0.475 +- 0.035 [0.450, 0.500] | 0.550 +- 0.071 [0.500, 0.600] | 0.410 +- 0.014 [0.400, 0.420] |"
            in text)
    assert "| aapo | 0.600 +- 0.141 | 0.700, 0.500 | 3 | 3, never | 0.500 / 0.100 |" in text
    assert "| dr_grpo | 0.475 +- 0.035 | 0.450, 0.500 | never | never, never |" in text
    json.dumps(rep)  # results.json must be serialisable


def test_summarize_without_grpo_has_no_target(se):
    runs = {"aapo": {1: _records({0: 0.4, 2: 0.5}, [0.2, 0.2])}}
    rep = se.summarize(runs, 2)
    assert rep["target"] is None
    assert "steps_to_target" not in rep["algorithms"]["aapo"]
    assert "| aapo | 0.500 +- 0.000 | 0.500 | - | - |" in se.format_report(rep)


def test_run_finished_needs_every_step_and_the_final_eval(se, tmp_path):
    def write(rows):
        with open(tmp_path / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    full = _records({0: 0.4, 2: 0.5, 4: 0.6}, [0.1] * 4)
    write(full)
    assert se.run_finished(str(tmp_path), 4, 2)
    assert not se.run_finished(str(tmp_path), 6, 2)  # a longer sweep: not finished
    write([r for r in full if not (r["step"] == 4 and "eval/accuracy" in r)])
    assert not se.run_finished(str(tmp_path), 4, 2)  # killed between the last step and its eval
    assert not se.run_finished(str(tmp_path / "missing"), 4, 2)


def test_changed_settings_in_an_existing_run_dir_are_refused(se, tmp_path):
    run = str(tmp_path / "aapo_seed1")
    se._check_spec(run, {"config": "c.yaml", "overrides": ["trainer.steps=60"]})
    se._check_spec(run, {"config": "c.yaml", "overrides": ["trainer.steps=60"]})  # same settings: fine
    with pytest.raises(se.SweepError, match=r"aapo_seed1 was made with different settings \(differing overrides: "
                                            r"\['trainer.steps=60', 'trainer.steps=80'\]\)"):
        se._check_spec(run, {"config": "c.yaml", "overrides": ["trainer.steps=80"]})


def test_rl_runs_share_the_warm_start_and_differ_only_in_algorithm_and_seed(se):
    a = se.rl_overrides("/o", "aapo", 1, 60, 10, [])
    b = se.rl_overrides("/o", "grpo", 2, 60, 10, [])
    diff = sorted(set(a) ^ set(b))
    assert diff == sorted(["trainer.run_dir=/o/aapo_seed1", "trainer.run_dir=/o/grpo_seed2", "algorithm.name=aapo",
                           "algorithm.name=grpo", "rollout.seed=1", "rollout.seed=2", "trainer.seed=1",
                           "trainer.seed=2"])
    assert "model.path=/o/sft/hf_final" in a and "trainer.sft_steps=0" in a
    assert not any(o.startswith("data.seed") for o in a)  # same prompts and held-out split for every run
