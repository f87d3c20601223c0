"""`make demo`: held-out accuracy of a pretrained model before and after RL, with 95% Wilson intervals.

    python tools/demo.py --config configs/demo_smollm2.yaml [--set key=value ...] [--overwrite]

1. Writes the run's held-out prompts to <run_dir>/held_out.jsonl: the reasoning-gym eval split of
   `data` (the prompts aapo-train keeps out of training), or `data.eval_path` for file data.
2. `aapo-eval` on `model.path`: greedy, `rollout.max_new_tokens`, the run's reward, template and system prompt.
3. `aapo-train --config ...` with the same overrides.
4. `aapo-eval` on the trained model, <run_dir>/hf_final, with the same settings and prompts.
5. Prints a table (accuracy before and after, Wilson intervals, the items that changed, the time taken) and
   writes it with <run_dir>/demo.json and <run_dir>/rewards.png (policy and reference reward per step).

Exit codes: 0 done; 2 bad input (config, missing model, a run directory in the way); otherwise the failing
tool's exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

from aapo_megatron.config import Config, ConfigError
from aapo_megatron.validation import load_config
from aapo_megatron.errors import EXIT_BAD_INPUT, EXIT_OK
from aapo_megatron.eval.metrics import wilson_interval
from aapo_megatron.eval.outputs import completed_items, read_responses, write_json_atomic
from aapo_megatron.trainer.metrics import METRICS_FILE, read_metrics

BENCHMARK = "held_out"
TABLE_FILE = "demo_table.txt"
SUMMARY_FILE = "demo.json"
PLOT_FILE = "rewards.png"


class DemoError(Exception):
    """A step of the demo failed; `exit_code` is the process exit code to return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def tool(name: str) -> str:
    """Path of one of the project's console scripts (aapo-train, aapo-eval), next to this interpreter first."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    found = path if os.path.isfile(path) else shutil.which(name)
    if found is None:
        raise DemoError(f"{name} not found next to {sys.executable} or on PATH: run `make build`", EXIT_BAD_INPUT)
    return found


def prepare_run_dir(run_dir: str, overwrite: bool) -> None:
    """An empty run directory; with `overwrite`, a previous run's (it holds config.yaml) is removed first."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise DemoError(f"run directory {run_dir} is not empty: pass --overwrite or set trainer.run_dir",
                            EXIT_BAD_INPUT)
        if not any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.yaml", SUMMARY_FILE, "held_out.jsonl")):
            raise DemoError(f"run directory {run_dir} holds files that are not a run's: refusing to remove it",
                            EXIT_BAD_INPUT)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def write_held_out(cfg: Config, run_dir: str) -> tuple[str, str, str]:
    """(path, prompt column, answer column) of the held-out prompts the evaluations use."""
    if cfg.data.source != "reasoning_gym":
        if not cfg.data.eval_path:
            raise DemoError("data.eval_path must be set: the demo evaluates on the run's held-out prompts",
                            EXIT_BAD_INPUT)
        return cfg.data.eval_path, cfg.data.prompt_key, cfg.data.answer_key
    from aapo_megatron.data.reasoning_gym_source import reasoning_gym_splits

    _, rows = reasoning_gym_splits(cfg.data)
    if not rows:
        raise DemoError("data.eval_size must be > 0: the demo evaluates on the held-out split", EXIT_BAD_INPUT)
    path = os.path.join(run_dir, "held_out.jsonl")
    with open(path, "w") as fh:
        for row in rows:  # with its reasoning-gym entry, so the task's own reward can score it too
            fh.write(json.dumps(row, default=str) + "\n")
    return path, "question", "answer"


def eval_config(cfg: Config, held_out: tuple[str, str, str]) -> dict[str, Any]:
    """The aapo-eval config (sections model, data, sampling, reward, output) matching the run's prompts,
    decoding length and reward; greedy."""
    path, prompt_key, answer_key = held_out
    dtype = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else cfg.model.dtype
    return {
        "model": {"dtype": dtype, "memory_fraction": cfg.rollout.memory_fraction},
        "data": {"files": [f"{BENCHMARK}={path}"], "layout": "custom", "prompt_key": prompt_key,
                 "answer_key": answer_key, "system_prompt": cfg.data.system_prompt,
                 "chat_template": cfg.data.chat_template, "max_prompt_tokens": cfg.data.max_prompt_tokens},
        "sampling": {"n": 1, "temperature": 0.0, "max_new_tokens": cfg.rollout.max_new_tokens},
        "reward": dataclasses.asdict(cfg.reward),
        "output": {"progress_bar": False, "overwrite": True},
    }


def run_tool(argv: list[str], what: str, capture: Optional[list[str]]) -> float:
    """Run one of the project's tools; its output goes to this terminal (or into `capture`). Returns seconds."""
    print(f"\n== demo: {what}\n   {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    if capture is None:
        code = subprocess.run(argv).returncode
    else:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        capture.append(proc.stdout)
        code = proc.returncode
    if code != 0:
        raise DemoError(f"{what} failed (exit {code}): {' '.join(argv)}", code)
    return time.perf_counter() - t0


def evaluate(model: str, out_dir: str, config_path: str, what: str, capture: Optional[list[str]]) -> float:
    """aapo-eval of `model` into `out_dir`; returns seconds."""
    return run_tool([tool("aapo-eval"), "--config", config_path, "--model", model, "--out", out_dir], what, capture)


def correctness(out_dir: str) -> dict[int, bool]:
    """Held-out row number -> greedy answer correct, from an aapo-eval output directory."""
    records = read_responses(os.path.join(out_dir, "responses.jsonl"))
    return {row: bool(samples[0]["correct"]) for row, samples in completed_items(records, BENCHMARK, 1).items()}


def accuracy_row(correct: dict[int, bool]) -> dict[str, Any]:
    """{"correct", "n", "accuracy", "ci95": [low, high]} of one evaluation."""
    k, n = sum(correct.values()), len(correct)
    return {"correct": k, "n": n, "accuracy": k / n, "ci95": list(wilson_interval(k, n))}


def compare(before: dict[int, bool], after: dict[int, bool]) -> dict[str, Any]:
    """Both evaluations' accuracy rows and the paired changes; DemoError if they scored different prompts."""
    if not before or set(before) != set(after):
        raise DemoError(f"the evaluations scored different held-out prompts ({len(before)} before, {len(after)} "
                        f"after, {len(set(before) ^ set(after))} not in both)", 1)
    return {"before": accuracy_row(before), "after": accuracy_row(after),
            "now_right": sum(after[i] and not before[i] for i in before),
            "now_wrong": sum(before[i] and not after[i] for i in before)}


def format_table(result: dict[str, Any]) -> str:
    """The before/after table with intervals, the paired changes and the time taken."""
    b, a, s = result["before"], result["after"], result["seconds"]
    lines = [f"held-out accuracy on {b['n']} prompts ({result['task']}; greedy, {result['max_new_tokens']} new "
             f"tokens), {result['steps']} {result['algorithm']} steps",
             f"{'':<8}{'correct':>10}{'accuracy':>10}   95% Wilson interval"]
    for name, row in (("before", b), ("after", a)):
        lo, hi = row["ci95"]
        lines.append(f"{name:<8}{row['correct']:>6}/{row['n']:<3}{row['accuracy']:>10.3f}   [{lo:.3f}, {hi:.3f}]")
    lines.append(f"{'change':<8}{'':>10}{a['accuracy'] - b['accuracy']:>+10.3f}   "
                 f"(now right: {result['now_right']}, now wrong: {result['now_wrong']})")
    lines.append(f"time: eval before {s['eval_before']:.0f} s, train {s['train']:.0f} s, eval after "
                 f"{s['eval_after']:.0f} s, total {s['total']:.0f} s")
    return "\n".join(lines)


def plot_rewards(run_dir: str, path: str) -> Optional[str]:
    """Policy and reference mean reward per RL step on one axis (PNG); None without RL records."""
    records = [r for r in read_metrics(os.path.join(run_dir, METRICS_FILE)) if r.get("step", 0) >= 1]
    series = [(key, label, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))])
              for key, label in (("reward/mean", "policy"), ("reward/ref_mean", "reference (frozen start)"))]
    series = [s for s in series if s[2]]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for _, label, pts in series:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward per sample")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(config: str, overrides: list[str], overwrite: bool, capture: Optional[list[str]] = None) -> dict[str, Any]:
    """The whole demo; returns what demo.json holds. `capture` collects the tools' output instead of printing it."""
    t0 = time.perf_counter()
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise DemoError(f"config error: {exc}", EXIT_BAD_INPUT) from None
    if not cfg.model.path or not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise DemoError(f"model.path {cfg.model.path!r} is not an HF model directory: the demo starts from a "
                        f"pretrained model (`make model-smollm2` builds .cache/models/smollm2-135m-instruct)",
                        EXIT_BAD_INPUT)
    run_dir = os.path.abspath(cfg.trainer.run_dir)
    prepare_run_dir(run_dir, overwrite)
    eval_cfg = os.path.join(run_dir, "demo_eval.yaml")
    with open(eval_cfg, "w") as fh:
        json.dump(eval_config(cfg, write_held_out(cfg, run_dir)), fh, indent=1)  # JSON is YAML
    seconds = {"eval_before": evaluate(cfg.model.path, os.path.join(run_dir, "eval_before"), eval_cfg,
                                       "held-out eval of the starting model (aapo-eval)", capture)}
    train = [tool("aapo-train"), "--config", config] + [a for o in overrides for a in ("--set", o)]
    seconds["train"] = run_tool(train, f"{cfg.trainer.steps} steps of {cfg.algorithm.name} (aapo-train)", capture)
    seconds["eval_after"] = evaluate(os.path.join(run_dir, "hf_final"), os.path.join(run_dir, "eval_after"),
                                     eval_cfg, "held-out eval of the trained model (aapo-eval)", capture)
    result = compare(correctness(os.path.join(run_dir, "eval_before")),
                     correctness(os.path.join(run_dir, "eval_after")))
    task = cfg.data.reasoning_gym_task if cfg.data.source == "reasoning_gym" else os.path.basename(cfg.data.eval_path)
    result.update(task=task, model=cfg.model.path, algorithm=cfg.algorithm.name, steps=cfg.trainer.steps,
                  max_new_tokens=cfg.rollout.max_new_tokens, dtype=cfg.model.dtype,
                  plot=plot_rewards(run_dir, os.path.join(run_dir, PLOT_FILE)))
    seconds["total"] = time.perf_counter() - t0
    result["seconds"] = seconds
    table = format_table(result)
    with open(os.path.join(run_dir, TABLE_FILE), "w") as fh:
        fh.write(table + "\n")
    write_json_atomic(os.path.join(run_dir, SUMMARY_FILE), result)
    print(f"\n{table}\nplot: {result['plot']}\nresults: {os.path.join(run_dir, SUMMARY_FILE)}", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """Command line; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo_smollm2.yaml", help="aapo-train config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override for the run, repeatable (aapo-train's --set)")
    p.add_argument("--overwrite", action="store_true", help="remove a previous run in trainer.run_dir first")
    args = p.parse_args(argv)
    try:
        run_demo(args.config, args.overrides, args.overwrite)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
