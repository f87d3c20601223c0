"""PromptDataset: the common math layouts, chat templates, length filtering and bad-row handling."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aapo_megatron.config import DataConfig, RewardConfig
from aapo_megatron.data import SYSTEM_PROMPTS, DataError, PromptDataset, load_tokenizer
from aapo_megatron.rewards import RewardInput, resolve_reward

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path, rows, raw_lines=None):
    lines = [json.dumps(r) for r in rows] if raw_lines is None else raw_lines
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def cfg(**kw):
    """DataConfig with room for the long paper system prompts under the tiny demo vocabulary."""
    kw.setdefault("max_prompt_tokens", 4096)
    return DataConfig(**kw)


def accuracy(prompt, completion):
    return resolve_reward("accuracy")(RewardInput(completion, prompt.reward_sample(), RewardConfig()))


# --------------------------------------------------------------------------- layouts


def simplerl_rows():
    template = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}."
                "<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    rows = []
    for i, (q, a) in enumerate([("Compute $\\frac{3}{6}$.", "\\frac{1}{2}"), ("What is $2^{10}$?", "1024")]):
        rows.append({
            "gt_answer": a, "subject": "Algebra", "level": 3, "question": q, "target": a, "data_source": "math",
            "prompt": [{"content": template.format(q=q), "role": "user"}], "ability": "math",
            "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"index": i, "split": "train"},
        })
    return rows


def test_simplerl_zoo_parquet(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "train.parquet", simplerl_rows())
    config = cfg(source="parquet", train_path=path, prompt_key="question", answer_key="gt_answer",
                 chat_template=CHATML, system_prompt="aapo_open_r1")
    ds = PromptDataset.from_config(config, tokenizer)
    assert len(ds) == 2 and ds.bad_rows.count == 0
    assert ds[0].text == (f"<|im_start|>system\n{SYSTEM_PROMPTS['aapo_open_r1']}<|im_end|>\n"
                          "<|im_start|>user\nCompute $\\frac{3}{6}$.<|im_end|>\n<|im_start|>assistant\n")
    assert ds[0].input_ids == tokenizer(ds[0].text, add_special_tokens=False)["input_ids"]
    assert accuracy(ds[0], "\\boxed{0.5}") == 1.0 and accuracy(ds[1], "\\boxed{2^{10}}") == 1.0
    # The paper's own setup: the pre-templated "prompt" column used verbatim, the answer from a nested field.
    raw = PromptDataset.from_config(cfg(source="parquet", train_path=path, prompt_key="prompt",
                                        answer_key="reward_model.ground_truth", chat_template="raw"), tokenizer)
    assert raw[1].text == simplerl_rows()[1]["prompt"][0]["content"] and raw[1].answer == "1024"


def test_open_rs_parquet_with_the_paper_system_prompt(tmp_path, tokenizer):
    rows = [{"problem": "Find $x$ if $2x = 7$.", "solution": "Divide: $x = \\boxed{\\frac{7}{2}}$.", "answer": "\\frac{7}{2}",
             "level": "Level 2"}]
    path = write_parquet(tmp_path / "open_rs.parquet", rows)
    ds = PromptDataset.from_config(cfg(source="parquet", train_path=path, system_prompt="aapo_open_rs"), tokenizer)
    assert ds[0].messages == [{"role": "system", "content": SYSTEM_PROMPTS["aapo_open_rs"]},
                              {"role": "user", "content": rows[0]["problem"]}]
    assert "put your final answer within \\boxed{{}} ." in ds[0].text  # verbatim from the authors' YAML
    assert ds[0].text.startswith("<s>A conversation between User and Assistant.")  # the tokenizer's own template
    assert ds[0].text.endswith("\nUser: Find $x$ if $2x = 7$.\nAssistant:")
    assert accuracy(ds[0], "<think>\n...\n</think>\n<answer>\n$\\boxed{3.5}$\n</answer>") == 1.0
    # The worked solution column works as ground truth too (its last \boxed{}).
    sol = PromptDataset.from_config(cfg(source="parquet", train_path=path, answer_key="solution"), tokenizer)
    assert accuracy(sol[0], "\\boxed{7/2}") == 1.0 and accuracy(sol[0], "\\boxed{7}") == 0.0


def test_math_and_gsm8k_jsonl(tmp_path, tokenizer):
    math_rows = [{"problem": "What is $1+1$?", "level": "Level 1", "type": "Prealgebra",
                  "solution": "We have $1+1=\\boxed{2}$."}]
    gsm_rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
                 "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"}]
    m_cfg = cfg(source="jsonl", train_path=write_jsonl(tmp_path / "math.jsonl", math_rows), answer_key="solution",
                chat_template="plain")
    m = PromptDataset.from_config(m_cfg, tokenizer)
    assert m[0].text == "What is $1+1$?\n" and accuracy(m[0], "\\boxed{2}") == 1.0
    g_cfg = cfg(source="jsonl", train_path=write_jsonl(tmp_path / "gsm8k.jsonl", gsm_rows), prompt_key="question",
                chat_template="plain", system_prompt="Be brief.")
    g = PromptDataset.from_config(g_cfg, tokenizer)
    assert g[0].text == f"Be brief.\n\n{gsm_rows[0]['question']}\n"
    assert accuracy(g[0], "\\boxed{72}") == 1.0 and accuracy(g[0], "\\boxed{24}") == 0.0


def test_chat_template_from_file_and_missing_template(tmp_path, tokenizer_dir):
    rows = [{"problem": "2+2?", "answer": "4"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    tok = load_tokenizer(tokenizer_dir)
    ds = PromptDataset.from_config(cfg(source="jsonl", train_path=path, chat_template=str(tmp_path / "chatml.jinja")), tok)
    assert ds[0].text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    with pytest.raises(DataError, match="p.jsonl: the tokenizer has no chat template; set data.chat_template to "
                                        "'plain', 'raw' or a Jinja template"):
        PromptDataset.from_config(cfg(source="jsonl", train_path=path), tok)
    with pytest.raises(DataError, match="data.chat_template 'chatml' is neither 'plain', 'raw', a Jinja template nor a file"):
        PromptDataset.from_config(cfg(source="jsonl", train_path=path, chat_template="chatml"), tok)


# --------------------------------------------------------------------------- length filtering


def test_length_filter_boundary(tmp_path, tokenizer):
    rows = [{"problem": "short?", "answer": "1"}, {"problem": "a much longer question " * 5, "answer": "2"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    full = PromptDataset.from_config(DataConfig(source="jsonl", train_path=path, max_prompt_tokens=10_000), tokenizer)
    n_long = len(full[1].input_ids)
    assert n_long == len(tokenizer(full[1].text, add_special_tokens=False)["input_ids"]) > len(full[0].input_ids)
    kept = PromptDataset.from_config(DataConfig(source="jsonl", train_path=path, max_prompt_tokens=n_long), tokenizer)
    assert len(kept) == 2
    cut = PromptDataset.from_config(DataConfig(source="jsonl", train_path=path, max_prompt_tokens=n_long - 1), tokenizer)
    assert [p.row for p in cut] == [1]
    assert cut.bad_rows.examples == [f"row 2: prompt is {n_long} tokens, over data.max_prompt_tokens={n_long - 1}"]


# --------------------------------------------------------------------------- bad rows


def test_bad_rows_are_skipped_counted_and_reported(tmp_path, tokenizer, caplog):
    lines = [
        json.dumps({"problem": "ok one?", "answer": "1"}),  # row 1
        '{"problem": "broken", "answer": ',  # row 2: invalid JSON
        json.dumps({"problem": "no answer column"}),  # row 3
        json.dumps({"problem": "empty answer", "answer": "  "}),  # row 4
        "",  # blank line: not a row
        json.dumps({"problem": "word " * 400, "answer": "5"}),  # row 6: too long
        json.dumps({"problem": "", "answer": "7"}),  # row 7: empty prompt
        json.dumps(["not", "an", "object"]),  # row 8
        json.dumps({"question": "GSM8K row with no answer after the mark", "problem": "q?", "answer": "work... #### "}),  # 9
        json.dumps({"problem": [{"role": "user"}], "answer": "3"}),  # row 10: malformed messages
        json.dumps({"problem": "ok two?", "answer": 2}),  # row 11
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", None, raw_lines=lines)
    cfg = DataConfig(source="jsonl", train_path=path, max_prompt_tokens=64, max_bad_row_reports=5, chat_template="plain")
    with caplog.at_level(logging.WARNING, logger="aapo_megatron.data.dataset"):
        ds = PromptDataset.from_config(cfg, tokenizer)
    assert [p.row for p in ds] == [1, 11] and [p.answer for p in ds] == ["1", "2"]
    bad = ds.bad_rows
    assert (bad.total, bad.count) == (10, 8)
    assert dict(bad.reasons) == {"unreadable": 2, "empty answer": 2, "missing column": 1, "too long": 1,
                                 "empty prompt": 1, "bad prompt": 1}
    assert bad.examples == [
        "row 2: invalid JSON (Expecting value at column 32)",
        "row 3: missing column 'answer' (row has: problem)",
        "row 4: empty answer in column 'answer' ('  ')",
        f"row 6: prompt is {len(tokenizer('word ' * 400 + chr(10))['input_ids'])} tokens, over data.max_prompt_tokens=64",
        "row 7: empty prompt in column 'problem'",
    ]
    summary = bad.summary()
    assert summary.startswith("skipped 8 of 10 rows (unreadable: 2, empty answer: 2, missing column: 1, empty prompt: 1, "
                              "bad prompt: 1, too long: 1); row 2: invalid JSON")
    assert summary.endswith("row 7: empty prompt in column 'problem' (and 3 more)")
    assert caplog.records[-1].getMessage() == f"{path}: {summary}"
    # The rows not listed are still classified exactly.
    assert sorted(bad._entries)[5:] == [(8, "not a JSON object (got list)"),
                                        (9, "empty answer in column 'answer' ('work... #### ')"),
                                        (10, "message 0 is not a {'role': str, 'content': str} dict in column 'problem'")]


def test_a_source_where_every_row_is_bad_is_an_error(tmp_path, tokenizer):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(DataError) as err:
        PromptDataset.from_config(DataConfig(source="jsonl", train_path=path, chat_template="plain"), tokenizer)
    assert str(err.value) == (
        f"{path}: every row was skipped: skipped 3 of 3 rows (missing column: 3); "
        "row 1: missing column 'problem' (row has: question, answer); "
        "row 2: missing column 'problem' (row has: question, answer); "
        "row 3: missing column 'problem' (row has: question, answer). Check data.prompt_key / data.answer_key."
    )


def test_unusable_sources(tmp_path, tokenizer):
    plain = dict(chat_template="plain")
    with pytest.raises(DataError, match="prompt file not found: .*missing.jsonl"):
        PromptDataset.from_config(DataConfig(source="jsonl", train_path=str(tmp_path / "missing.jsonl"), **plain), tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        PromptDataset.from_config(DataConfig(source="jsonl", train_path=str(tmp_path / "empty.jsonl"), **plain), tokenizer)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        PromptDataset.from_config(DataConfig(source="parquet", train_path=str(tmp_path / "bad.parquet"), **plain), tokenizer)
    with pytest.raises(DataError, match="data.eval_path is not set \\(data.source='jsonl'\\)"):
        PromptDataset.from_config(DataConfig(source="jsonl", train_path="x.jsonl", **plain), tokenizer, split="eval")
