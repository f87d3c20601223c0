"""Console entry points: aapo-train, aapo-convert, aapo-eval, aapo-rollout-server.

Exit codes of aapo-train: 0 finished; 2 bad configuration or input; 3 stopped by SIGTERM/SIGUSR1
after saving a checkpoint (Slurm scripts requeue on 3); 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from aapo_megatron.errors import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, AapoError  # noqa: F401 (re-exported)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aapo-train",
        description="AAPO / GRPO / SFT training on Megatron-Core with vLLM rollouts.",
        epilog="Example: aapo-train --config configs/quickstart_cpu.yaml --set algorithm.delta_high=0.3",
    )
    p.add_argument("--config", help="YAML config file (sections: model, parallel, algorithm, rollout, reward, data, "
                                    "optim, trainer, checkpoint, logging)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set rollout.temperature=0.7")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint, if any) or a checkpoint directory; "
                                    "shorthand for --set checkpoint.resume=...")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and doc")
    p.add_argument("--plan", action="store_true", help="print the memory plan per device and exit (2 if it does not "
                                                       "fit); plan.* keys set the device, platform and reserve")
    p.add_argument("--world-size", type=int, help="--plan: ranks of the run (default: WORLD_SIZE / SLURM_NTASKS, "
                                                  "else TP x PP)")
    return p


def train_main(argv: Optional[list[str]] = None) -> int:
    """aapo-train --config X.yaml [--set k=v ...] [--resume auto]."""
    from aapo_megatron.config import ConfigError, describe
    from aapo_megatron.validation import check_input_files, load_config

    args = _train_parser().parse_args(argv)
    if args.help_config:
        from aapo_megatron.rewards.registry import options_class, registered_rewards

        rows = describe()
        for name in registered_rewards():  # each function's own reward.options.<name> keys
            if options_class(name) is not None:
                rows += describe(options_class(name), prefix=f"reward.options.{name}.")
        for key, tp, default, doc in rows:
            print(f"{key} ({tp}, default {default!r})\n    {doc}")
        return EXIT_OK
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"aapo-train: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _quiet_known_warnings()
    from aapo_megatron.trainer.memory_plan import check_plan, launch_world_size

    if args.plan:  # plans a run whose data and checkpoint may not exist yet
        return _print_plan(cfg, args.world_size or launch_world_size())
    from aapo_megatron.rollout.layout import check_job_fits

    try:
        check_input_files(cfg)  # data files exist and open, before any rank loads a tokenizer or a model
        check_job_fits(cfg)  # rollout TP x DP against this job's GPUs / cores
        if cfg.plan.enforce:
            check_plan(cfg)
    except ConfigError as exc:
        print(f"aapo-train: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AapoError as exc:  # e.g. a data file that does not parse (BadInputError: exit 2)
        print(f"aapo-train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    from aapo_megatron.trainer.loop import run_training

    return run_training(cfg)


def _print_plan(cfg, world_size: Optional[int]) -> int:
    """aapo-train --plan: the table on stdout; exit 0 if it fits, 2 if not (or the model cannot be read)."""
    from aapo_megatron.config import ConfigError
    from aapo_megatron.trainer.memory_plan import arch_for_plan, plan_memory

    try:
        plan = plan_memory(cfg, arch_for_plan(cfg), world_size)
    except ConfigError as exc:
        print(f"aapo-train: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(plan.table())
    return EXIT_OK if plan.fits else EXIT_BAD_INPUT


def _quiet_known_warnings() -> None:
    """Megatron warns at import that Transformer Engine / Apex are absent: expected on CPU, noise in the log."""
    import warnings

    for text in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def convert_main(argv: Optional[list[str]] = None) -> int:
    """aapo-convert hf-to-mcore | mcore-to-hf."""
    from aapo_megatron.convert.cli import main

    return main(argv)


def eval_main(argv: Optional[list[str]] = None) -> int:
    """aapo-eval --model DIR --data FILE [FILE ...]."""
    _quiet_known_warnings()
    from aapo_megatron.eval.cli import main

    return main(argv)


def rollout_server_main(argv: Optional[list[str]] = None) -> int:
    """aapo-rollout-server."""
    from aapo_megatron.rollout.server import main

    return main(argv)
