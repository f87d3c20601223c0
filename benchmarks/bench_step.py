"""RL step-time breakdown and tokens/s of the quickstart model, measured from a real `aapo-train` run.

    .venv/bin/python benchmarks/bench_step.py [--steps 6] [--tp 1] [--keep DIR]

Runs the quickstart config (short SFT warm start, then `--steps` AAPO steps) and reports, from the run's
metrics.jsonl, the median over steps 2.. (step 1 includes engine warm-up) of each phase and its share
of the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("time/rollout", "time/reference", "time/reward", "time/train", "time/sync")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="AAPO steps to run (>= 2)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (runs torchrun when > 1)")
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra aapo-train overrides")
    args = ap.parse_args(argv)

    from aapo_megatron.trainer.metrics import read_metrics

    bindir = os.path.dirname(sys.executable)
    run_dir = args.keep or tempfile.mkdtemp(prefix="bench_step_")
    cmd = [os.path.join(bindir, "aapo-train"), "--config", os.path.join(ROOT, "configs", "quickstart_cpu.yaml"),
           "--set", f"trainer.run_dir={run_dir}", "--set", f"trainer.steps={args.steps}", "--set", "trainer.sft_steps=20",
           "--set", "trainer.eval_every=0", "--set", "checkpoint.save_every=0", "--set", "logging.plots=false",
           "--set", f"parallel.tensor_model_parallel_size={args.tp}"]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.tp > 1:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [os.path.join(bindir, "torchrun"), f"--master-port={port}", f"--nproc-per-node={args.tp}",
               "--no-python"] + cmd
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("step", 0) >= 2]
    if not records:
        print("no steps after warm-up were recorded", file=sys.stderr)
        return 1
    step = statistics.median(r["time/step"] for r in records)
    print(f"\nquickstart model, TP={args.tp}, median over steps 2..{args.steps}")
    print(f"{'phase':<16}{'seconds':>10}{'share':>9}")
    for key in PHASES:
        vals = [r[key] for r in records if key in r]
        if vals:
            med = statistics.median(vals)
            print(f"{key[5:]:<16}{med:>10.3f}{med / step:>9.1%}")
    print(f"{'step':<16}{step:>10.3f}{1:>9.0%}")
    tok = statistics.median(r["tokens_per_s"] for r in records)
    gen = statistics.median(r["rollout/tokens"] for r in records)
    print(f"\ngenerated policy tokens per step: {gen:.0f}   end-to-end tokens/s: {tok:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
