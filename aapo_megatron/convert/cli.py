"""`aapo-convert`: HF <-> Megatron checkpoint conversion from the command line.

    aapo-convert hf-to-mcore --hf-dir /ckpt/Qwen2.5-7B --out /ckpt/qwen-mcore [--dtype bfloat16] [--workers 4] [--force]
    aapo-convert mcore-to-hf --ckpt /ckpt/qwen-mcore --out /ckpt/qwen-hf [--hf-config config.json] [--force]
    aapo-convert gguf-to-hf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /ckpt/smollm2-hf [--dtype float32] [--force]

Errors (unsupported architecture, missing/mismatched tensor, corrupt shard, existing
output) are printed as one line naming the culprit, exit code 1; nothing is left at --out.
gguf-to-hf exits 2 for a missing/unreadable GGUF or an unsupported architecture (checked before any work).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from aapo_megatron.checkpoint.conversion.hf_to_mcore import DTYPES


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the two sub-commands."""
    parser = argparse.ArgumentParser(prog="aapo-convert", description="Convert checkpoints between HF and Megatron.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-mcore,mcore-to-hf,gguf-to-hf}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output directory (written atomically)")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="dtype of the output weights (default: the checkpoint's own)")
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes = pipeline stages used for the conversion; must divide the number of "
                            "layers (default: >= 2 GiB of weights each, at most one per available core)")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron dist_checkpointing directory")
    h2m.add_argument("--hf-dir", required=True, help="HF directory: config.json + model.safetensors or index + shards")
    common(h2m)

    m2h = sub.add_parser("mcore-to-hf", help="Megatron dist_checkpointing directory -> HF safetensors directory")
    m2h.add_argument("--ckpt", required=True, help="Megatron checkpoint directory (from hf-to-mcore or training)")
    m2h.add_argument("--hf-config", default=None,
                     help="HF config.json describing the model (default: the one stored in the checkpoint)")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    common(m2h)

    g2h = sub.add_parser("gguf-to-hf", help="GGUF file (Llama or Qwen2, any quantization) -> HF safetensors directory")
    g2h.add_argument("--gguf", required=True, help="the .gguf file (dequantized by transformers' GGUF loader)")
    g2h.add_argument("--out", required=True, help="output directory (written atomically)")
    g2h.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="dtype of the output weights (default bfloat16)")
    g2h.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _gguf_to_hf(args: argparse.Namespace) -> int:
    from aapo_megatron.checkpoint.errors import ConversionError
    from aapo_megatron.convert.gguf_to_hf import GGUFInputError, check_gguf_input, convert_gguf_to_hf

    try:
        check_gguf_input(args.gguf)
    except GGUFInputError as exc:
        print(f"aapo-convert: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = convert_gguf_to_hf(args.gguf, args.out, dtype=args.dtype, force=args.force)
    except ConversionError as exc:
        print(f"aapo-convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"aapo-convert: wrote HF checkpoint ({result.architecture}) to {result.out_dir} ({result.num_tensors} "
          f"tensors, {result.bytes_written / 2**20:.1f} MiB, {result.seconds:.1f} s)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run aapo-convert with `argv` (default sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "gguf-to-hf":
        return _gguf_to_hf(args)
    from aapo_megatron.checkpoint.errors import ConversionError
    from aapo_megatron.models.arch import UnsupportedArchitectureError
    from aapo_megatron.models.mapping import MappingError

    try:
        if args.command == "hf-to-mcore":
            from aapo_megatron.checkpoint.conversion.hf_to_mcore import convert_hf_to_mcore

            result = convert_hf_to_mcore(args.hf_dir, args.out, dtype=args.dtype, workers=args.workers,
                                         force=args.force, progress=not args.no_progress)
            what = "Megatron checkpoint"
        else:
            from aapo_megatron.checkpoint.conversion.mcore_to_hf import convert_mcore_to_hf

            result = convert_mcore_to_hf(args.ckpt, args.out, hf_config=args.hf_config, dtype=args.dtype,
                                         workers=args.workers, max_shard_size=args.max_shard_size,
                                         force=args.force, progress=not args.no_progress)
            what = "HF checkpoint"
    except (ConversionError, UnsupportedArchitectureError, MappingError) as exc:
        print(f"aapo-convert: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a config.json missing a required key, a bad --max-shard-size
        print(f"aapo-convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aapo-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"aapo-convert: wrote {what} to {result.out_dir} ({result.num_tensors} HF tensors, "
          f"{result.bytes_written / 2**20:.1f} MiB, {result.workers} worker(s), {result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
