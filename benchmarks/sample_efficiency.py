"""Sample efficiency: AAPO vs GRPO vs Dr. GRPO from one SFT warm start, several seeds each (issue 11).

    .venv/bin/python benchmarks/sample_efficiency.py [--steps 60] [--eval-every 10] [--seeds 1,2,3]
        [--algorithms aapo,grpo,dr_grpo] [--sft-steps 200] [--out runs/sample_efficiency] [--report-only]
        [--set KEY=VALUE ...]

1. One SFT warm start on the quickstart task (`configs/quickstart_cpu.yaml`, `trainer.mode=sft`), exported
   to `<out>/sft/hf_final` (weights + the trained tokenizer).
2. For every algorithm and seed, an RL run from that export (`model.path`, no further SFT) with the same
   lr / steps / batch; the seed sets `rollout.seed` and `trainer.seed`, so only the RL sampling differs. The
   prompt order and the train/held-out split (`data.seed`) are the same in every run. Runs go one after
   another, each into `<out>/<algorithm>_seed<k>/`.
3. A report from the runs' `metrics.jsonl`: held-out greedy accuracy vs step (mean, std, min, max over
   seeds), the first step at which each algorithm's mean reaches GRPO's final mean accuracy, the zero-variance
   group fraction over training and the final accuracy mean +- std. Printed, and written to
   `<out>/report.md`, `<out>/results.json` and `<out>/sample_efficiency.png`.

Re-running the same command skips finished runs and resumes an interrupted one from its last checkpoint
(`--resume auto`; checkpoints every `--eval-every` steps). A run directory made with different settings is
an error, never silently reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALGORITHMS = ("aapo", "grpo", "dr_grpo")
BASELINE = "grpo"
SPEC_FILE = "sweep_spec.json"
EVAL_KEY = "eval/accuracy"
ZERO_VAR_KEY = "adv/zero_variance_group_fraction"


class SweepError(RuntimeError):
    """The sweep cannot go on (the message names the run and what to do)."""


# ====================================================================== report arithmetic (pure)
@dataclass(frozen=True)
class CurvePoint:
    """Accuracy at one step aggregated over seeds."""

    step: int
    mean: float
    std: float
    """Sample std over seeds (ddof=1); 0 with one seed."""
    min: float
    max: float
    n: int
    """Seeds that have this step."""


def eval_curve(records: Sequence[dict]) -> dict[int, float]:
    """{step: held-out accuracy} of one run's metric records (the last record of a step wins)."""
    return {int(r["step"]): float(r[EVAL_KEY]) for r in records if isinstance(r.get(EVAL_KEY), (int, float))}


def series(records: Sequence[dict], key: str) -> dict[int, float]:
    """{step: value} of a numeric per-step metric over the RL steps (step >= 1) of one run."""
    return {int(r["step"]): float(r[key]) for r in records
            if r.get("step", 0) >= 1 and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(curves: Sequence[dict[int, float]]) -> list[CurvePoint]:
    """Mean / std / min / max over seeds at every step that all seeds have, in step order."""
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for s in steps:
        vals = [c[s] for c in curves]
        out.append(CurvePoint(s, statistics.fmean(vals), _std(vals), min(vals), max(vals), len(vals)))
    return out


def steps_to_reach(points: Sequence[tuple[int, float]], target: float, tol: float = 1e-9) -> Optional[int]:
    """First step whose value is >= target (within tol), or None if it never gets there; points are (step, value)."""
    for step, value in sorted(points):
        if value >= target - tol:
            return step
    return None


def window_mean(values: dict[int, float], lo: int, hi: int) -> float:
    """Mean of the values at steps lo..hi (inclusive); NaN if none."""
    vals = [v for s, v in values.items() if lo <= s <= hi]
    return statistics.fmean(vals) if vals else math.nan


def summarize(runs: dict[str, dict[int, list[dict]]], steps: int, baseline: str = BASELINE) -> dict:
    """The report as data: runs[algorithm][seed] = that run's metric records; `steps` = RL steps per run."""
    report: dict = {"steps": steps, "baseline": baseline, "algorithms": {}}
    curves = {a: aggregate([eval_curve(recs) for recs in by_seed.values()]) for a, by_seed in runs.items()}
    target = curves[baseline][-1].mean if curves.get(baseline) else None
    report["target"] = target
    third = max(1, steps // 3)
    for algo, by_seed in runs.items():
        pts = curves[algo]
        finals = {seed: eval_curve(recs).get(steps, math.nan) for seed, recs in by_seed.items()}
        zv = {seed: series(recs, ZERO_VAR_KEY) for seed, recs in by_seed.items()}
        zv_mean = aggregate(list(zv.values()))
        times = [v for recs in by_seed.values() for s, v in series(recs, "time/step").items() if s >= 2]
        entry = {
            "seeds": sorted(by_seed),
            "curve": [p.__dict__ for p in pts],
            "final_by_seed": finals,
            "final_mean": statistics.fmean(finals.values()) if finals else math.nan,
            "final_std": _std(list(finals.values())),
            "start_mean": pts[0].mean if pts else math.nan,
            "best_mean": max((p.mean for p in pts), default=math.nan),
            "zero_variance_curve": [(p.step, p.mean) for p in zv_mean],
            "zero_variance_first_third": window_mean({p.step: p.mean for p in zv_mean}, 1, third),
            "zero_variance_last_third": window_mean({p.step: p.mean for p in zv_mean}, steps - third + 1, steps),
            "zero_variance_mean": statistics.fmean(p.mean for p in zv_mean) if zv_mean else math.nan,
            "median_step_seconds": statistics.median(times) if times else math.nan,
        }
        if target is not None:
            entry["steps_to_target"] = steps_to_reach([(p.step, p.mean) for p in pts], target)
            entry["steps_to_target_by_seed"] = {
                seed: steps_to_reach(sorted(eval_curve(recs).items()), target) for seed, recs in by_seed.items()}
        report["algorithms"][algo] = entry
    return report


def _fmt_steps(value: Optional[int]) -> str:
    return "never" if value is None else str(value)


def format_report(report: dict) -> str:
    """Markdown tables of a `summarize` result (accuracy vs step, then the summary per algorithm)."""
    algos = list(report["algorithms"])
    lines = ["Held-out greedy accuracy vs RL step (mean +- std over seeds, [min, max]):", ""]
    lines.append("| step | " + " | ".join(algos) + " |")
    lines.append("|---" * (len(algos) + 1) + "|")
    by_step: dict[int, dict[str, dict]] = {}
    for a in algos:
        for p in report["algorithms"][a]["curve"]:
            by_step.setdefault(p["step"], {})[a] = p
    for step in sorted(by_step):
        cells = []
        for a in algos:
            p = by_step[step].get(a)
            cells.append("" if p is None else f"{p['mean']:.3f} +- {p['std']:.3f} [{p['min']:.3f}, {p['max']:.3f}]")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    target = report.get("target")
    steps = report["steps"]
    third = max(1, steps // 3)
    lines += ["", ("Target = GRPO's final mean accuracy " + (f"{target:.3f}" if target is not None else "(GRPO not run)")
                   + f"; zero-variance fraction = share of prompt groups whose G rewards are all equal, "
                     f"mean over seeds, steps 1-{third} and {steps - third + 1}-{steps}."), ""]
    lines.append("| algorithm | final acc (mean +- std) | per seed | first step mean >= target | per seed "
                 "| zero-var first / last third | median s/step |")
    lines.append("|---|---|---|---|---|---|---|")
    for a in algos:
        e = report["algorithms"][a]
        per_seed = ", ".join(f"{v:.3f}" for _, v in sorted(e["final_by_seed"].items()))
        reach = _fmt_steps(e.get("steps_to_target")) if target is not None else "-"
        reach_seed = (", ".join(_fmt_steps(v) for _, v in sorted(e["steps_to_target_by_seed"].items()))
                      if target is not None else "-")
        lines.append(f"| {a} | {e['final_mean']:.3f} +- {e['final_std']:.3f} | {per_seed} | {reach} | {reach_seed} "
                     f"| {e['zero_variance_first_third']:.3f} / {e['zero_variance_last_third']:.3f} "
                     f"| {e['median_step_seconds']:.2f} |")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> str:
    """Accuracy vs step (mean, min-max band) and the zero-variance fraction (5-step moving mean) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for a, e in report["algorithms"].items():
        xs = [p["step"] for p in e["curve"]]
        line, = ax1.plot(xs, [p["mean"] for p in e["curve"]], marker="o", markersize=3,
                         label=f"{a} (final {e['final_mean']:.3f} +- {e['final_std']:.3f})")
        ax1.fill_between(xs, [p["min"] for p in e["curve"]], [p["max"] for p in e["curve"]], alpha=0.15,
                         color=line.get_color())
        zs, zv = zip(*e["zero_variance_curve"]) if e["zero_variance_curve"] else ((), ())
        smooth = [statistics.fmean(zv[max(0, i - 4): i + 1]) for i in range(len(zv))]
        ax2.plot(zs, smooth, label=a, color=line.get_color())
    if report.get("target") is not None:
        ax1.axhline(report["target"], color="gray", linestyle="--", linewidth=1, label="GRPO final mean")
    n_seeds = max(len(e["seeds"]) for e in report["algorithms"].values())
    ax1.set_ylabel("held-out accuracy")
    ax1.set_title(f"mean over {n_seeds} seeds, band = min..max")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("zero-variance group fraction\n(5-step moving mean)")
    ax2.set_xlabel("RL step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ====================================================================== running the sweep
def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _check_spec(run_dir: str, spec: dict) -> None:
    """Record `spec` in a new run dir, or fail if the dir was made with a different one."""
    path = os.path.join(run_dir, SPEC_FILE)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != spec:
            diff = sorted(set(old.get("overrides", [])) ^ set(spec.get("overrides", [])))
            raise SweepError(f"{run_dir} was made with different settings (differing overrides: {diff}); "
                             f"pass another --out or delete that directory")
    else:
        os.makedirs(run_dir, exist_ok=True)
        _write_json(path, spec)


def _train(config: str, overrides: list[str], run_dir: str, resume: bool) -> float:
    """Run aapo-train (output appended to <run_dir>/train.log); returns wall seconds, raises SweepError on failure."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "aapo-train"), "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd += ["--resume", "auto"]
    log_path = os.path.join(run_dir, "train.log")
    print(f"  $ {' '.join(cmd)}\n    log: {log_path}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log_path) as fh:
            tail = fh.read()[-2000:]
        raise SweepError(f"aapo-train exited with code {code} for {run_dir}; last lines of {log_path}:\n{tail}")
    return time.perf_counter() - t0


def sft_overrides(out: str, sft_steps: int) -> list[str]:
    """Overrides of the one SFT warm start (trainer.mode=sft exports <out>/sft/hf_final)."""
    return [f"trainer.run_dir={os.path.join(out, 'sft')}", "trainer.mode=sft", f"trainer.sft_steps={sft_steps}",
            "checkpoint.save_every=0", "logging.plots=false", "logging.tensorboard=false"]


def rl_overrides(out: str, algorithm: str, seed: int, steps: int, eval_every: int, extra: Sequence[str]) -> list[str]:
    """Overrides of one RL run from the warm start; the seed changes only the RL sampling."""
    warm = os.path.join(out, "sft", "hf_final")
    return [f"trainer.run_dir={run_dir_of(out, algorithm, seed)}", f"model.path={warm}", "data.train_tokenizer=false",
            "trainer.sft_steps=0", f"algorithm.name={algorithm}", f"trainer.steps={steps}",
            f"trainer.eval_every={eval_every}", f"checkpoint.save_every={eval_every}", "checkpoint.keep_last=1",
            f"rollout.seed={seed}", f"trainer.seed={seed}", "logging.plots=false", "logging.tensorboard=false",
            *extra]


def run_dir_of(out: str, algorithm: str, seed: int) -> str:
    """<out>/<algorithm>_seed<seed>."""
    return os.path.join(out, f"{algorithm}_seed{seed}")


def run_finished(run_dir: str, steps: int, eval_every: int) -> bool:
    """True when the run's metrics hold every RL step and the held-out eval at the last step."""
    from aapo_megatron.trainer.metrics import read_metrics

    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    done_steps = {r["step"] for r in recs if isinstance(r.get("time/step"), (int, float))}
    evals = eval_curve(recs)
    return done_steps >= set(range(1, steps + 1)) and (eval_every == 0 or steps in evals)


def ensure_warm_start(out: str, config: str, sft_steps: int) -> str:
    """Run the SFT warm start unless <out>/sft/hf_final already exists for the same settings; returns that dir."""
    run_dir = os.path.join(out, "sft")
    hf_final = os.path.join(run_dir, "hf_final")
    overrides = sft_overrides(out, sft_steps)
    _check_spec(run_dir, {"config": os.path.abspath(config), "overrides": overrides})
    if os.path.isfile(os.path.join(hf_final, "config.json")):
        print(f"warm start: reusing {hf_final}", flush=True)
        return hf_final
    print(f"warm start: {sft_steps} SFT steps -> {hf_final}", flush=True)
    secs = _train(config, overrides, run_dir, resume=False)
    if not os.path.isfile(os.path.join(hf_final, "config.json")):
        raise SweepError(f"the SFT warm start finished but wrote no {hf_final}/config.json")
    print(f"warm start done in {secs:.0f}s", flush=True)
    return hf_final


def run_sweep(args) -> None:
    """The warm start, then every (algorithm, seed) run not finished yet, one after another."""
    os.makedirs(args.out, exist_ok=True)
    ensure_warm_start(args.out, args.config, args.sft_steps)
    todo = [(a, s) for s in args.seeds for a in args.algorithms]  # interleaved, so a partial sweep is balanced
    for i, (algo, seed) in enumerate(todo, 1):
        run_dir = run_dir_of(args.out, algo, seed)
        overrides = rl_overrides(args.out, algo, seed, args.steps, args.eval_every, args.overrides)
        _check_spec(run_dir, {"config": os.path.abspath(args.config), "overrides": overrides})
        if run_finished(run_dir, args.steps, args.eval_every):
            print(f"[{i}/{len(todo)}] {algo} seed {seed}: finished earlier, skipped", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {algo} seed {seed}: {args.steps} RL steps", flush=True)
        secs = _train(args.config, overrides, run_dir, resume=True)
        if not run_finished(run_dir, args.steps, args.eval_every):
            raise SweepError(f"{run_dir}: aapo-train exited 0 but its metrics.jsonl lacks steps or the final eval")
        print(f"[{i}/{len(todo)}] {algo} seed {seed}: done in {secs:.0f}s", flush=True)


def collect(out: str, algorithms: Sequence[str], seeds: Sequence[int], steps: int, eval_every: int) -> dict:
    """runs[algorithm][seed] = metric records of every finished run (unfinished ones are reported and left out)."""
    from aapo_megatron.trainer.metrics import read_metrics

    runs: dict[str, dict[int, list[dict]]] = {}
    for algo in algorithms:
        for seed in seeds:
            run_dir = run_dir_of(out, algo, seed)
            if not run_finished(run_dir, steps, eval_every):
                print(f"note: {run_dir} is not finished; left out of the report", file=sys.stderr)
                continue
            runs.setdefault(algo, {})[seed] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return runs


def _parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=60, help="RL steps per run")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out eval (and checkpoint) every N RL steps")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (rollout.seed = trainer.seed = seed)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of aapo,grpo,dr_grpo")
    ap.add_argument("--sft-steps", type=int, default=200, help="SFT warm-start steps (done once, shared)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sample_efficiency"), help="output directory")
    ap.add_argument("--report-only", action="store_true", help="only build the report from finished runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra aapo-train override for every RL run (e.g. data.eval_size=100)")
    args = ap.parse_args(argv)
    args.algorithms = _parse_list(args.algorithms)
    args.seeds = _parse_list(args.seeds, int)
    args.out = os.path.abspath(args.out)
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad or not args.algorithms:
        ap.error(f"--algorithms: unknown {bad}; choose from {', '.join(ALGORITHMS)}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds must be distinct integers, got {args.seeds}")
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every != 0:
        ap.error(f"--eval-every ({args.eval_every}) must be >= 1 and divide --steps ({args.steps})")
    if args.sft_steps < 1:
        ap.error("--sft-steps must be >= 1 (the runs start from the shared SFT warm start)")

    t0 = time.perf_counter()
    if not args.report_only:
        try:
            run_sweep(args)
        except SweepError as exc:
            print(f"sample_efficiency: {exc}", file=sys.stderr)
            return 1
    runs = collect(args.out, args.algorithms, args.seeds, args.steps, args.eval_every)
    if not runs:
        print(f"sample_efficiency: no finished runs under {args.out}", file=sys.stderr)
        return 1
    baseline = BASELINE if BASELINE in runs else next(iter(runs))
    report = summarize(runs, args.steps, baseline=baseline)
    report["command"] = " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/sample_efficiency.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    text = format_report(report)
    if baseline != BASELINE:
        text += f"\n\n(GRPO not among the finished runs: the target is {baseline}'s final mean accuracy.)"
    print("\n" + text)
    _write_json(os.path.join(args.out, "results.json"), report)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(text + "\n")
    png = write_plot(report, os.path.join(args.out, "sample_efficiency.png"))
    print(f"\nwrote {os.path.join(args.out, 'report.md')}, results.json and {png} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
