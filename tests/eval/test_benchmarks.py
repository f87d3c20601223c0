"""Benchmark loading: the named column layouts, auto-detection, jsonl and parquet, and clear errors."""

import json

import pytest

from aapo_megatron.eval.benchmarks import BenchmarkSpec, EvalInputError, load_benchmark, load_benchmarks
from aapo_megatron.eval.config import EvalDataConfig
from tests.eval.conftest import copy_rows, write_jsonl, write_parquet

# The published column names of each benchmark (HF hub versions), with one row each.
LAYOUT_ROWS = {
    "math500": {"problem": "Copy 1 2", "solution": "... \\boxed{12}", "answer": "12", "subject": "x", "level": 1},
    "aime24": {"ID": "2024-I-1", "Problem": "Copy 1 2", "Solution": "...", "Answer": 12},
    "amc23": {"id": 0, "question": "Copy 1 2", "answer": 12.0, "url": "u"},
    "minerva": {"question": "Copy 1 2", "answer": "12"},
    "olympiadbench": {"id": 1, "question": "Copy 1 2", "final_answer": ["$12$"], "is_multiple_answer": False},
}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from aapo_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _cfg(**kw):
    return EvalDataConfig(chat_template="plain", **kw)


@pytest.mark.parametrize("layout", sorted(LAYOUT_ROWS))
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_each_layout_loads_by_name_and_by_auto_detection(tmp_path, tok, layout, fmt):
    rows = [LAYOUT_ROWS[layout], {**LAYOUT_ROWS[layout]}]
    path = str(tmp_path / f"{layout}.{fmt}")
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    for chosen in (layout, "auto"):
        bench = load_benchmark(BenchmarkSpec.parse(path), _cfg(layout=chosen), tok)
        assert bench.spec.name == layout
        assert len(bench.prompts) == 2 and [p.row for p in bench.prompts] == [1, 2]
        p = bench.prompts[0]
        assert p.messages[-1]["content"] == "Copy 1 2"
        assert p.input_ids == tok(p.text, add_special_tokens=True)["input_ids"]
        # list answers (OlympiadBench) take their element; numbers become text
        assert p.answer in ("12", "12.0", "$12$"), p.answer


def test_explicit_columns_override_the_layout_and_name_is_taken(tmp_path, tok):
    path = write_jsonl(str(tmp_path / "x.jsonl"), [{"q": {"text": "Copy 3 4"}, "gold": "34"}])
    bench = load_benchmark(BenchmarkSpec.parse(f"mine={path}"), _cfg(layout="custom", prompt_key="q.text",
                                                                      answer_key="gold"), tok)
    assert bench.spec.name == "mine" and (bench.prompt_key, bench.answer_key) == ("q.text", "gold")
    assert bench.prompts[0].answer == "34"


def test_unknown_column_names_the_column_and_the_file_columns(tmp_path, tok):
    path = write_jsonl(str(tmp_path / "b.jsonl"), copy_rows(3, 0))
    with pytest.raises(EvalInputError, match=r"benchmark 'b' \(.*b\.jsonl\): unknown answer column 'gold'; "
                                             r"the file has columns: problem, answer"):
        load_benchmark(BenchmarkSpec.parse(path), _cfg(answer_key="gold"), tok)
    with pytest.raises(EvalInputError, match=r"no prompt/answer columns of layout 'aime24' \(looked for "
                                             r"problem/answer or Problem/Answer\)"):
        write_jsonl(path, [{"question": "q", "answer": "1"}])
        load_benchmark(BenchmarkSpec.parse(path), _cfg(layout="aime24"), tok)
    with pytest.raises(EvalInputError, match="unknown benchmark layout 'aime2024'"):
        load_benchmark(BenchmarkSpec.parse(path), _cfg(layout="aime2024"), tok)


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(EvalInputError, match=r"benchmark 'nope' \(.*nope\.jsonl\): file not found"):
        load_benchmark(BenchmarkSpec.parse(str(tmp_path / "nope.jsonl")), _cfg(), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalInputError, match=r"benchmark 'empty' \(.*\) is empty: it has no readable rows"):
        load_benchmark(BenchmarkSpec.parse(str(empty)), _cfg(), tok)
    blank = write_jsonl(str(tmp_path / "blank.jsonl"), [{"problem": "", "answer": "1"}, {"problem": "x", "answer": ""}])
    with pytest.raises(EvalInputError, match=r"every row was skipped: skipped 2 of 2 rows"):
        load_benchmark(BenchmarkSpec.parse(blank), _cfg(), tok)


def test_skipped_rows_are_counted_and_max_items_cuts(tmp_path, tok):
    rows = copy_rows(5, 1)
    rows.insert(2, {"problem": "Copy 1 1", "answer": None})
    path = write_jsonl(str(tmp_path / "s.jsonl"), rows)
    bench = load_benchmark(BenchmarkSpec.parse(path), _cfg(), tok)
    assert [p.row for p in bench.prompts] == [1, 2, 4, 5, 6] and bench.skipped == 1
    assert "row 3: empty answer" in bench.skipped_detail
    cut = load_benchmark(BenchmarkSpec.parse(path), _cfg(max_items=2), tok)
    assert [p.row for p in cut.prompts] == [1, 2]
    assert cut.fingerprint == bench.fingerprint  # a first-N run can be continued by a full one
    other = write_jsonl(str(tmp_path / "s2.jsonl"), rows[:-1] + [{"problem": "Copy 9 9", "answer": "98"}])
    assert load_benchmark(BenchmarkSpec.parse(other), _cfg(), tok).fingerprint != bench.fingerprint


def test_duplicate_names_and_no_files(tmp_path, tok):
    path = write_jsonl(str(tmp_path / "a.jsonl"), copy_rows(2, 0))
    with pytest.raises(EvalInputError, match=r"benchmark name\(s\) \['a'\] given twice"):
        load_benchmarks([BenchmarkSpec.parse(path), BenchmarkSpec.parse(f"a={path}")], _cfg(), tok)
    with pytest.raises(EvalInputError, match="no benchmark files"):
        load_benchmarks([], _cfg(), tok)
    json.dumps(LAYOUT_ROWS)  # the fixture rows are plain JSON
