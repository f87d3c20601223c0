"""A rank program for checking the Slurm launcher without the trainer (tests/slurm/test_launcher.py).

Launched by slurm/aapo_70b.sh in place of aapo-train (AAPO_TRAIN_CMD). Each rank initialises the project's
distributed setup from Slurm's environment (aapo_megatron.distributed.init_distributed: SLURM_PROCID,
SLURM_NTASKS, MASTER_ADDR/MASTER_PORT from the script), all-reduces its rank + 1, and writes one JSON line per
rank to <trainer.run_dir>/ranks.jsonl. It then follows the trainer's signal contract: with --wait-for-signal,
on the first run of the job (SLURM_RESTART_COUNT unset or 0) it waits for SIGUSR1/SIGTERM and exits 3
("stopped by signal, checkpoint saved"); otherwise it exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    """Run one rank; exit code 0 (done), 3 (stopped by a signal) or 1 (timed out waiting for the signal)."""
    # The launcher's signal shield blocks SIGUSR1 for this process tree and calls our handler from a thread.
    usr1_blocked_at_start = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    stop = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume")
    parser.add_argument("--wait-for-signal", action="store_true")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from aapo_megatron.validation import load_config
    from aapo_megatron.distributed import init_distributed

    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.parallel)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    record = {
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "launcher": env.launcher,
        "master": f"{env.master_addr}:{env.master_port}", "sum": total.item(), "restart": restart,
        "resume": args.resume, "run_dir": cfg.trainer.run_dir, "omp": os.environ.get("OMP_NUM_THREADS"),
        "usr1_blocked_at_start": usr1_blocked_at_start,
    }
    os.makedirs(cfg.trainer.run_dir, exist_ok=True)
    rc = 0
    if args.wait_for_signal and restart == 0:
        # A helper process started after our handler, like the trainer's vLLM engine: Slurm signals it too.
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        deadline = time.monotonic() + 120
        while not stop and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # let a signal sent to the whole step reach the helper too
        rc = 3 if stop else 1
        record["signal"] = stop[0] if stop else None
        record["helper_survived"] = helper.poll() is None
        helper.kill()
        helper.wait()
    dist.barrier()
    with open(os.path.join(cfg.trainer.run_dir, "ranks.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
