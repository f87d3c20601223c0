"""The results store: torn lines, complete items, fingerprint checks, atomic summary."""

import json
import os

import pytest

from aapo_megatron.eval.benchmarks import EvalInputError
from aapo_megatron.eval.outputs import (
    FINGERPRINT,
    RESPONSES,
    ResultsStore,
    completed_items,
    load_summary,
    read_responses,
)

FP = {"model": "m1", "sampling": {"n": 2, "seed": 0}, "reward": {"functions": {"accuracy": 1.0}},
      "benchmarks": {"a": "fa"}}


def _rec(bench, index, sample, correct=True):
    return {"benchmark": bench, "index": index, "sample": sample, "correct": correct, "reward": float(correct)}


def test_append_read_back_and_complete_items(tmp_path):
    out = str(tmp_path / "out")
    store = ResultsStore.open(out, FP)
    store.append([_rec("a", 1, 0), _rec("a", 1, 1, False), _rec("a", 2, 0)])
    again = ResultsStore.open(out, FP)
    assert again.records == store.records
    done = again.done("a", n=2)
    assert list(done) == [1]  # item 2 has one of its two samples: not done
    assert [r["correct"] for r in done[1]] == [True, False]
    # a later record for the same key replaces the earlier one
    again.append([_rec("a", 2, 1), _rec("a", 2, 0, False)])
    assert [r["correct"] for r in completed_items(again.records, "a", 2)[2]] == [False, True]


def test_a_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    out = str(tmp_path / "out")
    store = ResultsStore.open(out, FP)
    store.append([_rec("a", 1, 0), _rec("a", 1, 1)])
    path = os.path.join(out, RESPONSES)
    with open(path, "ab") as fh:
        fh.write(b'{"benchmark": "a", "index": 2, "sam')  # killed mid-write
    assert len(read_responses(path)) == 2
    store = ResultsStore.open(out, FP)
    store.append([_rec("a", 2, 0), _rec("a", 2, 1)])
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [1, 1, 2, 2]  # every line is whole
    # a corrupt line that is not the last one is an error, not silently skipped
    with open(path, "w") as fh:
        fh.write('{"bad json\n' + json.dumps(_rec("a", 1, 0)) + "\n")
    with pytest.raises(EvalInputError, match=r"responses.jsonl: line 1 is corrupt .*--overwrite"):
        read_responses(path)


def test_a_different_evaluation_is_refused_unless_overwrite(tmp_path):
    out = str(tmp_path / "out")
    ResultsStore.open(out, FP).append([_rec("a", 1, 0), _rec("a", 1, 1)])
    before = open(os.path.join(out, RESPONSES)).read()
    for change, named in (({"model": "m2"}, "model"), ({"sampling": {"n": 2, "seed": 1}}, "sampling"),
                          ({"benchmarks": {"a": "changed"}}, "benchmark 'a'")):
        with pytest.raises(EvalInputError, match=rf"holds results of a different evaluation \({named} changed\); "
                                                 "refusing to mix them: pass --overwrite"):
            ResultsStore.open(out, {**FP, **change})
    assert open(os.path.join(out, RESPONSES)).read() == before  # nothing touched
    # a new benchmark next to the old ones is fine, and both fingerprints are kept
    ResultsStore.open(out, {**FP, "benchmarks": {"b": "fb"}})
    with open(os.path.join(out, FINGERPRINT)) as fh:
        assert json.load(fh)["benchmarks"] == {"a": "fa", "b": "fb"}
    fresh = ResultsStore.open(out, {**FP, "model": "m2"}, overwrite=True)
    assert fresh.records == [] and not os.path.exists(os.path.join(out, RESPONSES))


def test_responses_without_fingerprint_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESPONSES).write_text(json.dumps(_rec("a", 1, 0)) + "\n")
    with pytest.raises(EvalInputError, match="has responses.jsonl but no fingerprint.json"):
        ResultsStore.open(str(out), FP)


def test_summary_is_written_atomically_with_nan_as_text(tmp_path):
    store = ResultsStore.open(str(tmp_path / "out"), FP)
    store.write_summary({"benchmarks": {"a": {"pass@1": 0.5, "reward_mean": float("nan")}}})
    assert load_summary(str(tmp_path / "out")) == {"benchmarks": {"a": {"pass@1": 0.5, "reward_mean": "nan"}}}
    assert sorted(os.listdir(tmp_path / "out")) == ["fingerprint.json", "summary.json"]  # no temp file left
