"""benchmarks/bench_vs_trl.py and trl_driver.py without TRL: the environment check, arguments, the prompt file,
reward parity between the TRL-side reward and ours, and the summary arithmetic. CI never installs TRL."""

import importlib.util
import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    try:
        yield _load("bench_vs_trl")
    finally:
        sys.modules.pop("bench_vs_trl", None)


@pytest.fixture(scope="module")
def driver():
    try:
        yield _load("trl_driver")
    finally:
        sys.modules.pop("trl_driver", None)


@pytest.fixture(scope="module")
def small_setup(bench, tmp_path_factory):
    """The bench config on a small training split, its trained tokenizer and a 2-step prompts.jsonl."""
    from aapo_megatron.data.tokenizer import tokenizer_for_config

    work = tmp_path_factory.mktemp("bvt")
    cfg = bench.load_bench_config(bench.QUICKSTART, ["data.train_size=300", "data.eval_size=0",
                                                     "data.prompts_per_step=4"])
    tok = tokenizer_for_config(cfg, str(work / "tokenizer"))
    path = str(work / "prompts.jsonl")
    n = bench.write_prompts(cfg, tok, 2, path)
    rows = [json.loads(line) for line in open(path)]
    return cfg, tok, rows, n


def test_missing_trl_env_is_a_clear_error(bench, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "bin" / "python")
    with pytest.raises(bench.TrlEnvError) as err:
        bench.check_trl_env(missing)
    assert str(err.value) == (f"TRL environment not found: {missing} does not exist; create it with "
                              f"`bash benchmarks/setup_trl_env.sh` (or pass --trl-python PATH)")
    assert bench.main(["--trl-python", missing, "--steps", "2"]) == 2  # before any run starts
    assert "bench_vs_trl: TRL environment not found" in capsys.readouterr().err


def test_env_without_trl_names_the_missing_module(bench):
    with pytest.raises(bench.TrlEnvError) as err:  # the product's .venv: TRL must never be installed there
        bench.check_trl_env(sys.executable)
    msg = str(err.value)
    assert f"TRL environment {sys.executable} cannot import TRL and its dependencies" in msg
    assert "No module named 'trl'" in msg and "setup_trl_env.sh" in msg


@pytest.mark.parametrize("argv,message", [
    (["--steps", "3", "--warmup", "3"], "--warmup must be in [0, --steps) so that some steps are measured, got 3"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--algorithms", "aapo,ppo"], "--algorithms must name one or more of aapo, grpo, got 'aapo,ppo'"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--variant", "x=ppo:a=1"], "--variant must be LABEL=ALGO[:KEY=VALUE...] with ALGO one of aapo, grpo, got 'x=ppo:a=1'"),
    (["--variant", "x=aapo:novalue"], "--variant must be LABEL=ALGO[:KEY=VALUE...]"),
    (["--variant", "aapo=aapo:a=1"], "--variant label 'aapo' is already used"),
])
def test_bad_arguments(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_and_our_command(bench):
    args = bench.parse_args(["--algorithms", "grpo, aapo,grpo", "--set", "rollout.temperature=0.7"])
    assert args.algorithms == ["grpo", "aapo"] and args.steps == 8 and args.warmup == 1
    cmd = bench.ours_command("c.yaml", "/r", "grpo", 5, "/tok", args.overrides)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert cmd[1:3] == ["--config", "c.yaml"] and cmd[0].endswith("aapo-train")
    for want in ("trainer.steps=5", "trainer.sft_steps=0", "algorithm.name=grpo", "model.tokenizer=/tok",
                 "trainer.run_dir=/r", "checkpoint.save_every=0"):
        assert want in sets
    assert sets[-1] == "rollout.temperature=0.7"  # user overrides last: they win
    assert args.ours == [("grpo", "grpo", []), ("aapo", "aapo", [])]
    args = bench.parse_args(["--algorithms", "aapo", "--variant", "seq=aapo:rollout.prefetch_reference=false:a.b=1"])
    assert args.ours == [("aapo", "aapo", []), ("seq", "aapo", ["rollout.prefetch_reference=false", "a.b=1"])]


def test_trl_command_takes_every_setting_from_the_config(bench, small_setup):
    cfg = small_setup[0]
    cmd = bench.trl_command("/py", cfg, "/m", "/p.jsonl", "/o.json", 6, 2)
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[:2] == ["/py", bench.TRL_DRIVER]
    assert opts["--prompts-per-step"] == "4" and opts["--num-generations"] == str(cfg.rollout.num_generations)
    assert opts["--max-new-tokens"] == str(cfg.rollout.max_new_tokens) and float(opts["--lr"]) == cfg.optim.lr
    assert opts["--steps"] == "6" and opts["--threads"] == "2" and opts["--answer-tag"] == cfg.reward.answer_tag


def test_prompt_file_follows_the_trainer_sampler_and_tokenizes_back(bench, driver, small_setup):
    from aapo_megatron.data.dataset import PromptDataset
    from aapo_megatron.data.sampler import ResumableSampler

    cfg, tok, rows, n = small_setup
    assert n == len(rows) == 8
    ds = PromptDataset.from_config(cfg.data, tok, "train")
    sampler = ResumableSampler(len(ds), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    expect = [ds[i].input_ids for _ in range(2) for i in sampler.next_batch(4)]
    assert [r["input_ids"] for r in rows] == expect
    driver.check_prompt_ids(tok, rows)  # TRL's own tokenization of the text gives our ids
    bad = [dict(rows[0], input_ids=rows[0]["input_ids"][1:])]
    with pytest.raises(ValueError, match="prompt 0: TRL's tokenization .* differs from ours"):
        driver.check_prompt_ids(tok, bad)


def test_trl_reward_matches_ours(driver, small_setup):
    from aapo_megatron.rewards.functions import reasoning_gym_reward
    from aapo_megatron.rewards.registry import RewardInput

    cfg, _, rows, _ = small_setup
    completions, meta = [], []
    for r in rows[:4]:
        for text in (f"<answer>{r['answer']}</answer>", f"x <answer>{int(r['answer']) + 1}</answer>",
                     f"<answer>1</answer><answer>{r['answer']}</answer>", r["answer"], "<answer></answer>"):
            completions.append(text)
            meta.append(r)
    tokens, seconds = [], []
    fn = driver.make_reward(cfg.reward.answer_tag, tokens, seconds)
    theirs = fn(completions=completions, completion_ids=[[5] * 3] * len(completions),
                rg_task=[m["rg_task"] for m in meta], rg_args=[m["rg_args"] for m in meta],
                rg_entry=[m["rg_entry"] for m in meta], trainer_state=None)
    ours = [reasoning_gym_reward(RewardInput(c, {"answer": m["answer"], "reasoning_gym": {
        "task": m["rg_task"], "args": json.loads(m["rg_args"]), "entry": json.loads(m["rg_entry"])}}, cfg.reward))
        for c, m in zip(completions, meta)]
    assert theirs == ours
    assert theirs[:5] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert tokens == [3 * len(completions)] and len(seconds) == 1


def test_summary_skips_warmup_and_forms_ratios(bench):
    def run(name, rep, times, tokens=100):
        return bench.RunResult(name, rep, 10.0 * rep, [{"step": i + 1, "time": t, "tokens": tokens,
                                                        "time/train": t / 2, "time/generate": t / 4}
                                                       for i, t in enumerate(times)], 1.0)

    runs = [run("ours-aapo", 1, [9.0, 1.0, 2.0]), run("trl", 1, [50.0, 4.0, 6.0]),
            run("ours-aapo", 2, [9.0, 3.0, 4.0]), run("trl", 2, [50.0, 8.0, 10.0])]
    summ = bench.summarize(runs, warmup=1)
    assert summ["ours-aapo"]["step_s"] == 2.5 and summ["trl"]["step_s"] == 7.0
    assert (summ["ours-aapo"]["step_s_run_min"], summ["ours-aapo"]["step_s_run_max"]) == (1.5, 3.5)
    assert summ["ours-aapo"]["step_s_best"] == 1.0 and summ["trl"]["step_s_best"] == 4.0  # warm-up 50.0 skipped
    assert summ["ours-aapo"]["tokens_per_s"] == statistics.median([100 / t for t in (1.0, 2.0, 3.0, 4.0)])
    assert summ["ours-aapo"]["time/train"] == 1.25 and summ["trl"]["wall_s"] == 15.0
    rat = bench.ratios(summ)
    assert set(rat) == {"ours-aapo"}
    assert rat["ours-aapo"]["step_time_ours_over_trl"] == pytest.approx(2.5 / 7.0)
    info = {"model": "m", "task": "t", "batch": "b", "steps": 3, "repeats": 2, "warmup": 1, "threads": 2,
            "ours_versions": {"torch": "1", "megatron-core": "2", "vllm": "3"},
            "trl_versions": {"trl": "4", "transformers": "5", "torch": "1"}}
    text = bench.format_report(summ, rat, info)
    assert rat["ours-aapo"]["best_step_time_ours_over_trl"] == 0.25
    assert "ours-aapo / TRL: step time median 0.36x, best 0.25x; tokens/s 2.86x" in text
    assert "target median step time <= 0.5x: met" in text
    assert "ours-aapo generation phase alone: 0.09x TRL's whole step (0.625 s of 7.000 s)" in text
