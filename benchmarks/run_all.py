"""`make bench`: run the quick benchmarks one after another and print one summary table.

Each benchmark prints its own side-by-side ratios (measured in the same run); this driver shows
their output as it comes and ends with a table of what ran, how long it took, and whether it passed.

    .venv/bin/python benchmarks/run_all.py [--only logprob,rewards,rollout,step]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

QUICK = {
    "logprob": ["bench_logprob.py", "--iters", "3"],
    "rewards": ["bench_rewards.py", "--n", "1000", "--repeats", "1"],
    "rollout": ["bench_rollout.py"],
    "step": ["bench_step.py", "--steps", "6"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(QUICK), help="comma-separated subset of " + ", ".join(QUICK))
    args = ap.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        if name not in QUICK:
            print(f"unknown benchmark {name!r}; choose from {', '.join(QUICK)}", file=sys.stderr)
            return 2
        script, *extra = QUICK[name]
        cmd = [sys.executable, os.path.join(HERE, script), *extra]
        print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        rows.append((name, time.perf_counter() - t0, code))
    print("\n===== summary")
    print(f"{'benchmark':<12}{'wall s':>9}  status")
    for name, secs, code in rows:
        print(f"{name:<12}{secs:>9.1f}  {'ok' if code == 0 else f'FAILED (exit {code})'}")
    return 0 if all(code == 0 for _, _, code in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
