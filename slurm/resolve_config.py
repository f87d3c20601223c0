"""Resolve a run config the way aapo-train will, for the Slurm launcher (slurm/common.sh).

    python slurm/resolve_config.py --config FILE [--set section.key=value ...] [other trainer args, ignored]

Prints KEY=VALUE lines (placement, tp, pp, run_dir, ckpt_dir, the rollout URLs and what an in-job
aapo-rollout-server needs) and exits 0,
or prints the ConfigError naming the bad key and exits 2, before any rank or GPU is started.
"""

from __future__ import annotations

import argparse
import os
import sys


def _hf_weights_dir(*candidates: str | None) -> str:
    """The first candidate directory holding an HF checkpoint (config.json + safetensors), else ''."""
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "config.json")) and any(
                name.endswith(".safetensors") for name in os.listdir(path)):
            return path
    return ""


def main(argv: list[str] | None = None) -> int:
    """Parse the trainer-style arguments, load + validate the config, print the launcher's values."""
    parser = argparse.ArgumentParser(prog="resolve_config.py", add_help=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args, _ = parser.parse_known_args(argv)
    sys.path.insert(0, os.getcwd())
    import importlib.util

    from aapo_megatron.algorithms.temperature import engine_logprobs_mode
    from aapo_megatron.config import ConfigError
    from aapo_megatron.validation import load_config

    # In a container job this runs on the host's python, which may lack torch: the algorithm and loss names are
    # then checked by aapo-train when it starts (still exit 2 before any work), everything else here.
    registries = importlib.util.find_spec("torch") is not None
    try:
        cfg = load_config(args.config, args.overrides, registries=registries)
    except ConfigError as exc:
        print(f"config error in {args.config}: {exc}", file=sys.stderr)
        return 2
    run_dir = cfg.trainer.run_dir
    dtype = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else cfg.model.dtype
    values = {
        "placement": cfg.rollout.placement,
        "tp": cfg.parallel.tensor_model_parallel_size,
        "pp": cfg.parallel.pipeline_model_parallel_size,
        "run_dir": run_dir,
        "ckpt_dir": cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"),
        "server_url": cfg.rollout.server_url or "",
        "reference_server_url": cfg.rollout.reference_server_url or "",
        # What an in-job aapo-rollout-server needs: HF weights of the starting model and the engine settings.
        "hf_model": _hf_weights_dir(cfg.model.path, cfg.model.tokenizer),
        "rollout_dtype": dtype,
        "max_model_len": cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
        "rollout_seed": cfg.rollout.seed,
        "token_env": cfg.rollout.token_env,
        "logprobs_mode": engine_logprobs_mode(cfg),  # the servers' log-probs are those the trainer compares with
    }
    for key, value in values.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
