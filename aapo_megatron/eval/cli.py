"""`aapo-eval`: evaluate an HF model or a Megatron checkpoint on benchmark files with vLLM.

    aapo-eval --model runs/quickstart/hf_init --data math500=data/math500.jsonl aime24=data/aime24.parquet
    aapo-eval --model runs/quickstart --data held_out.jsonl --n 8 --temperature 0.6 --out eval_runs/q

Writes <out>/responses.jsonl (every response with its score), <out>/summary.json and prints one table per
benchmark. Interrupted runs continue where they stopped when rerun with the same arguments. Exit codes:
0 done; 2 bad input (missing model or file, unknown column, empty benchmark, bad option, results of a
different evaluation in --out); 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Optional

from aapo_megatron.errors import EXIT_BAD_INPUT, EXIT_OK, AapoError
from aapo_megatron.eval.config import EvalConfig, load_eval_config

log = logging.getLogger("aapo_megatron.eval")


# flag -> dotted config key
_FLAG_KEYS = {
    "model": "model.path", "tokenizer": "model.tokenizer", "hf_config": "model.hf_config", "data": "data.files",
    "layout": "data.layout", "prompt_key": "data.prompt_key", "answer_key": "data.answer_key",
    "chat_template": "data.chat_template", "system_prompt": "data.system_prompt", "max_items": "data.max_items",
    "n": "sampling.n", "temperature": "sampling.temperature", "top_p": "sampling.top_p",
    "max_new_tokens": "sampling.max_new_tokens", "seed": "sampling.seed", "k": "sampling.ks",
    "answer_tag": "reward.answer_tag", "out": "output.dir", "batch_size": "output.batch_size",
}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; every one is a shorthand for a config key (see --help-config)."""
    p = argparse.ArgumentParser(
        prog="aapo-eval", description="Benchmark evaluation (pass@1 greedy, pass@k / avg@k sampled) with vLLM.",
        epilog="Example: aapo-eval --model runs/quickstart --data math500=MATH500.jsonl aime24=aime24.parquet --n 8")
    p.add_argument("--model", help="HF model dir, or a Megatron checkpoint (trainer run dir, checkpoint dir)")
    p.add_argument("--data", nargs="+", metavar="[NAME=]FILE", help="benchmark files (.jsonl / .parquet)")
    p.add_argument("--out", help="output directory (default eval_runs/<model name>)")
    p.add_argument("--config", help="YAML file with sections model, data, sampling, reward, output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set reward.timeout_s=20")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the model's own, or the run's)")
    p.add_argument("--hf-config", help="HF config.json of a Megatron checkpoint (default: the run's hf_init)")
    p.add_argument("--layout", help="column layout: auto, math500, aime24, amc23, minerva, olympiadbench, custom")
    p.add_argument("--prompt-key", help="prompt column (overrides the layout)")
    p.add_argument("--answer-key", help="answer column (overrides the layout)")
    p.add_argument("--chat-template", help="'plain', 'raw', Jinja text or file (default: the tokenizer's)")
    p.add_argument("--system-prompt", help="system prompt text or preset name")
    p.add_argument("--answer-tag", help="read the answer from <TAG>...</TAG> instead of the last \\boxed{}")
    p.add_argument("--n", type=int, help="samples per item (default 1: greedy pass@1)")
    p.add_argument("--k", type=int, nargs="+", help="k values for pass@k (default 1, 2, 4, ... n)")
    p.add_argument("--temperature", type=float, help="default 0 for n=1, 0.6 for n>1")
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-items", type=int, help="only the first N items of each benchmark")
    p.add_argument("--batch-size", type=int, help="items per generate call (the unit of resume)")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from --config, --set and the shorthand flags (flags win)."""
    values: dict[str, Any] = {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items()
                              if getattr(args, flag) is not None}
    if args.overwrite:
        values["output.overwrite"] = True
    if args.no_progress:
        values["output.progress_bar"] = False
    return load_eval_config(args.config, args.overrides, values)


def default_out_dir(model_name: str) -> str:
    """eval_runs/<model name> ('/' in checkpoint labels becomes '_')."""
    return os.path.join("eval_runs", model_name.replace(os.sep, "_"))


def sampling_spec_for(cfg: EvalConfig, eos_token_id: int):
    """The SamplingSpec of the evaluation (seed set per batch by the runner)."""
    from aapo_megatron.rollout.engine import SamplingSpec

    greedy = cfg.greedy()
    s = cfg.sampling
    return SamplingSpec(n=s.n, temperature=cfg.effective_temperature(), top_p=1.0 if greedy else s.top_p,
                        top_k=-1 if greedy else s.top_k, max_tokens=s.max_new_tokens,
                        stop_token_ids=(eos_token_id,), seed=None, logprobs=False)


def format_table(name: str, metrics: dict[str, Any], info: dict[str, Any]) -> str:
    """A plain-text table of one benchmark's metrics."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"
             if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    rows += [(k, str(v)) for k, v in info.items()]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "-" * (width + vwidth + 3)
    body = "\n".join(f"{k:<{width}} | {v:>{vwidth}}" for k, v in rows)
    return f"{name}\n{line}\n{body}\n{line}"


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run one evaluation end to end; returns the summary (also written to <out>/summary.json)."""
    from aapo_megatron.data.readers import DataError
    from aapo_megatron.data.tokenizer import load_tokenizer
    from aapo_megatron.eval.benchmarks import BenchmarkSpec, EvalInputError, load_benchmarks
    from aapo_megatron.eval.metrics import default_ks
    from aapo_megatron.eval.model_source import model_config, resolve_model
    from aapo_megatron.eval.outputs import ResultsStore
    from aapo_megatron.eval.runner import pending_positions, run_benchmark, summarize_benchmark

    t0 = time.perf_counter()
    source = resolve_model(cfg.model.path, cfg.model.tokenizer, cfg.model.hf_config)
    if source.tokenizer_dir is None:
        raise EvalInputError(f"no tokenizer found for model {source.path}: set --tokenizer")
    try:
        tokenizer = load_tokenizer(source.tokenizer_dir)
    except DataError as exc:
        raise EvalInputError(str(exc)) from None
    if tokenizer.eos_token_id is None:
        raise EvalInputError(f"tokenizer {source.tokenizer_dir} has no EOS token: generation could not stop")
    benchmarks = load_benchmarks([BenchmarkSpec.parse(f) for f in cfg.data.files], cfg.data, tokenizer)
    spec = sampling_spec_for(cfg, tokenizer.eos_token_id)
    ks = list(cfg.sampling.ks) or default_ks(cfg.sampling.n)
    fingerprint = {
        "model": source.fingerprint,
        "sampling": {**spec.to_dict(), "seed": cfg.sampling.seed},
        "reward": dataclasses.asdict(cfg.reward),
        "benchmarks": {b.spec.name: b.fingerprint for b in benchmarks},
    }
    out_dir = cfg.output.dir or default_out_dir(source.name)
    store = ResultsStore.open(out_dir, fingerprint, cfg.output.overwrite)
    todo = {b.spec.name: len(pending_positions(b, store, spec.n)) for b in benchmarks}
    for b in benchmarks:
        done = len(b.prompts) - todo[b.spec.name]
        if done:
            log.info("%s: resuming, %d of %d items already in %s", b.spec.name, done, len(b.prompts), out_dir)
        if b.skipped:
            log.warning("%s: %s", b.spec.name, b.skipped_detail)
    generated = {b.spec.name: 0 for b in benchmarks}
    progress = cfg.output.progress_bar and sys.stderr.isatty()  # no bar redraws in log files
    if any(todo.values()):
        from aapo_megatron.rewards.pool import RewardPool
        from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

        max_len = cfg.model.max_model_len
        kv_bytes = None if cfg.model.kv_cache_mb is None else cfg.model.kv_cache_mb << 20
        with source.hf_dir(progress=progress) as hf_dir:
            log.info("starting vLLM on %s (%s)", hf_dir, source.kind)
            engine = VLLMRolloutEngine(hf_dir, role="reference", dtype=cfg.model.dtype,
                                       memory_fraction=cfg.model.memory_fraction, max_model_len=max_len,
                                       kv_cache_bytes=kv_bytes,
                                       seed=cfg.sampling.seed)
            pool = None
            try:
                pool = RewardPool(cfg.reward)
                for b in benchmarks:
                    if todo[b.spec.name]:
                        generated[b.spec.name] = run_benchmark(engine, tokenizer, pool, b, store, spec,
                                                                cfg.sampling.seed, cfg.output.batch_size,
                                                                progress=progress)
                        log.info("%s: %d items generated", b.spec.name, generated[b.spec.name])
            finally:
                if pool is not None:
                    pool.close()
                engine.close()
    summary: dict[str, Any] = {
        "model": {"path": source.path, "kind": source.kind, "name": source.name, "fingerprint": source.fingerprint,
                  "max_position_embeddings": model_config(source).get("max_position_embeddings")},
        "sampling": {**spec.to_dict(), "seed": cfg.sampling.seed, "greedy": cfg.greedy(), "ks": ks},
        "reward": {"functions": dict(cfg.reward.functions), "answer_tag": cfg.reward.answer_tag,
                   "answer_extractors": cfg.reward.answer_extractors},
        "benchmarks": {},
        "seconds": time.perf_counter() - t0,
    }
    for b in benchmarks:
        summary["benchmarks"][b.spec.name] = {
            "file": os.path.abspath(b.spec.path), "prompt_key": b.prompt_key, "answer_key": b.answer_key,
            "skipped_rows": b.skipped, "generated_items": generated[b.spec.name],
            "resumed_items": len(b.prompts) - todo[b.spec.name],
            "metrics": summarize_benchmark(b, store, spec.n, ks),
        }
    store.write_summary(summary)
    summary["out_dir"] = os.path.abspath(out_dir)
    return summary


def print_tables(summary: dict[str, Any], stream=sys.stdout) -> None:
    """One table per benchmark, then where the outputs are."""
    for name, b in summary["benchmarks"].items():
        info = {"model": summary["model"]["name"], "columns": f"{b['prompt_key']} / {b['answer_key']}",
                "skipped rows": b["skipped_rows"], "generated now": b["generated_items"],
                "resumed": b["resumed_items"]}
        print(format_table(name, b["metrics"], info), file=stream)
    print(f"responses: {os.path.join(summary['out_dir'], 'responses.jsonl')}\n"
          f"summary:   {os.path.join(summary['out_dir'], 'summary.json')}", file=stream)


def main(argv: Optional[list[str]] = None) -> int:
    """aapo-eval entry point; returns the exit code."""
    from aapo_megatron.checkpoint.errors import ConversionError
    from aapo_megatron.config import ConfigError, describe
    from aapo_megatron.eval.benchmarks import EvalInputError

    args = build_parser().parse_args(argv)
    if args.help_config:
        for key, tp, default, doc in describe(EvalConfig):
            print(f"{key} ({tp}, default {default!r})\n    {doc}")
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, format="aapo-eval: %(message)s", stream=sys.stderr)
    try:
        cfg = config_from_args(args)
        summary = run_eval(cfg)
    except (ConfigError, EvalInputError, ConversionError) as exc:  # a bad checkpoint is bad input too
        print(f"aapo-eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AapoError as exc:  # every other deliberate error carries its exit code
        print(f"aapo-eval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aapo-eval: interrupted; finished batches are kept, rerun the same command to continue",
              file=sys.stderr)
        return 130
    print_tables(summary)
    return EXIT_OK
