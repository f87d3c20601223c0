"""The real tokenizer and chat template of SmolLM2-135M-Instruct through the data and eval paths, and the reward.

The data pipeline (`PromptDataset` on a jsonl file, the model's own template) must give exactly what transformers'
`apply_chat_template(..., add_generation_prompt=True)` gives, text and ids, with and without a system prompt
(SmolLM2's template inserts its default system message when there is none). Eval's benchmark loader gives the
same ids. The accuracy reward reads the \\boxed{} answer out of the engine's decoded greedy completion (`slow`:
those tests use the TP=1 job of conftest.py; the others need only the tokenizer).
"""

from __future__ import annotations

import json

import pytest

from aapo_megatron.config import DataConfig
from aapo_megatron.data.dataset import PromptDataset
from aapo_megatron.data.templates import SYSTEM_PROMPTS
from aapo_megatron.data.tokenizer import load_tokenizer
from aapo_megatron.eval.benchmarks import BenchmarkSpec, load_benchmark
from aapo_megatron.eval.config import EvalDataConfig
from tests.real_model.conftest import ROWS, messages_of


def _expected(hf_tokenizer, problem, system: str | None) -> tuple[str, list[int]]:
    messages = messages_of(problem)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    return text, list(ids)


@pytest.mark.parametrize("system_prompt", [None, "aapo_open_r1"])
def test_data_pipeline_prompt_equals_apply_chat_template(smollm2_dir, hf_tokenizer, bench_file, system_prompt):
    cfg = DataConfig(source="jsonl", train_path=bench_file, prompt_key="problem", answer_key="answer",
                     system_prompt=system_prompt)
    ds = PromptDataset.from_config(cfg, load_tokenizer(smollm2_dir), split="train")
    assert [p.answer for p in ds] == [r["answer"] for r in ROWS] and ds.bad_rows.count == 0
    system = SYSTEM_PROMPTS.get(system_prompt)
    for p, row in zip(ds, ROWS):
        text, ids = _expected(hf_tokenizer, row["problem"], system)
        assert p.text == text
        assert p.input_ids == ids
        head = "<|im_start|>system\n" + (system or "You are a helpful AI assistant named SmolLM")
        assert text.startswith(head) and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_eval_prompt_ids_equal_data_pipeline(smollm2_dir, hf_tokenizer, bench_file):
    tokenizer = load_tokenizer(smollm2_dir)
    bench = load_benchmark(BenchmarkSpec.parse(bench_file), EvalDataConfig(), tokenizer)
    assert (bench.prompt_key, bench.answer_key, bench.skipped) == ("problem", "answer", 0)
    assert [p.input_ids for p in bench.prompts] == [_expected(hf_tokenizer, r["problem"], None)[1] for r in ROWS]


@pytest.mark.slow
def test_engine_ran_the_eval_prompt_ids(engine_run, hf_tokenizer):
    """The ids the TP=1 job's eval path sent to vLLM are transformers' chat-template ids."""
    assert engine_run["prompt_ids"] == [_expected(hf_tokenizer, r["problem"], None)[1] for r in ROWS]


@pytest.mark.slow
def test_reward_reads_boxed_answer_of_a_real_completion(engine_run, hf_greedy_of, hf_tokenizer):
    scored = [group[0] for group in engine_run["scored"]]
    first = scored[0]
    print(json.dumps([s["completion"] for s in scored], indent=1))
    assert "\\boxed{12}" in first["completion"], first["completion"]
    # The decoded completion is the model's own greedy answer (HF, fp32), special tokens dropped.
    want = hf_greedy_of(engine_run["prompt_ids"][0])
    assert first["completion"] == hf_tokenizer.decode(want, skip_special_tokens=True)
    assert (first["correct"], first["reward"], first["finish_reason"]) == (True, 1.0, "stop")
    # Row 4: the same prompt, so the same completion, scored against a wrong gold answer.
    assert scored[3]["completion"] == first["completion"]
    assert (scored[3]["correct"], scored[3]["reward"]) == (False, 0.0)
    assert not any(s["reward_failed"] for s in scored)
