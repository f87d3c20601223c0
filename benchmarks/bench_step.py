"""RL step-time breakdown and tokens/s of the quickstart model, measured from a real `aapo-train` run.

    .venv/bin/python benchmarks/bench_step.py [--steps 6] [--tp 1] [--keep DIR]
    .venv/bin/python benchmarks/bench_step.py --train-phase [--rounds 5] [--set model.scratch.hidden_size=512 ...]
    .venv/bin/python benchmarks/bench_step.py --train-phase --model .cache/models/smollm2-135m-instruct \
        --dtypes float32,bfloat16 --variants +fused --rounds 3

Runs the quickstart config (short SFT warm start, then `--steps` AAPO steps) and reports, from the run's
metrics.jsonl, the median over steps 2.. (step 1 includes engine warm-up) of each phase and its share
of the step.

--train-phase times only the Megatron update (fwd/bwd over all micro-batches + Adam) in one process, no
engines, on a synthetic batch of the config's shape (prompts_per_step x num_generations samples, prompts of
20-40 tokens, completions of max_new_tokens for 3 in 4 samples, shorter for the rest). Each variant has its
own model and optimizer (same init, same batch) and the variants run interleaved, round after round:
  padded     one sample per row, rows = micro_batch_tokens // longest (the trainer before packing)
  balanced   one sample per row, rows spread evenly over the micro-batches
  packed     several samples per row (trainer.pack_sequences), Megatron's attention, torch's default Adam
  +sdpa      packed, torch SDPA core attention (models/attention.py)
  +fused     packed, SDPA, fused CPU Adam: the trainer's default
--dtypes runs every variant in each dtype (bfloat16: bf16 weights, fp32 main weights and grads), interleaved
too; --model DIR takes the architecture and weights from an HF directory instead of model.scratch.
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

# The phases a step is made of, one after the other (their shares add up to the step, with "other").
PHASES = ("time/generate", "time/reward", "time/advantage", "time/train", "time/sync")
# Inside "generate": each engine's own time. They overlap each other, and the reference's may also overlap the
# previous step's train phase (rollout.prefetch_reference), so they do not add up.
GENERATE_PARTS = ("time/rollout", "time/reference", "time/reference_wait")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="AAPO steps to run (>= 2)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (runs torchrun when > 1)")
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra aapo-train overrides")
    ap.add_argument("--train-phase", action="store_true", help="time the train phase alone, A/B over the optimisations")
    ap.add_argument("--rounds", type=int, default=5, help="--train-phase: interleaved rounds per variant")
    ap.add_argument("--variants", default="padded,balanced,packed,+sdpa,+fused", help="--train-phase: which variants")
    ap.add_argument("--dtypes", default="float32", help="--train-phase: parameter dtypes, e.g. float32,bfloat16")
    ap.add_argument("--model", default=None, help="--train-phase: HF directory (default: the config's model.scratch)")
    args = ap.parse_args(argv)
    if args.train_phase:
        return train_phase(args.overrides, args.rounds, args.variants.split(","), args.dtypes.split(","), args.model)

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
    print(f"{'phase':<20}{'seconds':>10}{'share':>9}")
    medians = {key: statistics.median(r[key] for r in records if key in r)
               for key in PHASES + GENERATE_PARTS if any(key in r for r in records)}
    for key in PHASES:
        if key in medians:
            print(f"{key[5:]:<20}{medians[key]:>10.3f}{medians[key] / step:>9.1%}")
        if key == "time/generate":
            for part in GENERATE_PARTS:
                if part in medians:
                    print(f"  {part[5:]:<18}{medians[part]:>10.3f}")
    other = step - sum(medians.get(k, 0.0) for k in PHASES)
    print(f"{'other':<20}{other:>10.3f}{other / step:>9.1%}")
    print(f"{'step':<20}{step:>10.3f}{1:>9.0%}")
    prefetched = [r["reference/prefetched"] for r in records if "reference/prefetched" in r]
    if prefetched:
        print(f"reference samples prefetched during the previous step: {sum(prefetched):.0f}/{len(prefetched)} steps")
    tok = statistics.median(r["tokens_per_s"] for r in records)
    gen = statistics.median(r["rollout/tokens"] for r in records)
    print(f"\ngenerated policy tokens per step: {gen:.0f}   end-to-end tokens/s: {tok:.1f}")
    return 0


# variant -> (rows layout, SDPA attention, fused CPU Adam)
VARIANTS = {"padded": ("padded", False, False), "balanced": ("balanced", False, False),
            "packed": ("packed", False, False), "+sdpa": ("packed", True, False), "+fused": ("packed", True, True)}


def _synthetic_batch(cfg, vocab: int, seed: int = 0):
    import random

    import torch

    from aapo_megatron.trainer.batch import RolloutBatch

    rng = random.Random(seed)
    n, new = cfg.data.prompts_per_step * cfg.rollout.num_generations, cfg.rollout.max_new_tokens
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(20, 41))] for _ in range(n)]
    lengths = [new if rng.random() < 0.75 else rng.randrange(max(1, new // 3), new + 1) for _ in range(n)]
    comps = [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return RolloutBatch(prompts, comps, adv, rollout_logprobs=[[-1.0] * len(c) for c in comps])


def _load_hf_weights(model, spec, model_dir: str) -> None:
    from aapo_megatron.checkpoint.hf import HFCheckpointReader
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.models.weights import load_hf_weights, model_naming

    reader = HFCheckpointReader(model_dir)
    load_hf_weights(model, WeightMapping(spec, naming=model_naming(model)), lambda name: reader.load([name])[name])


def train_phase(overrides: list[str], rounds: int, variants: list[str], dtypes: tuple[str, ...] = ("float32",),
                model_dir: str | None = None) -> int:
    """Interleaved A/B of the train-phase optimisations (see the module docstring); prints medians and ratios."""
    import time

    import torch

    from aapo_megatron.validation import load_config
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.trainer.batch import make_micro_batches, micro_batch_shape
    from aapo_megatron.trainer.losses import build_loss_fn
    from aapo_megatron.trainer.optim import build_optimizer, build_scheduler, torch_optimizers, wrap_ddp
    from aapo_megatron.trainer.train_step import micro_batcher, run_update

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or (model_dir is not None and not os.path.isfile(os.path.join(model_dir, "config.json"))):
        print(f"--dtypes takes float32,bfloat16 (got {bad})" if bad else f"--model {model_dir}: no config.json there",
              file=sys.stderr)
        return 2
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart_cpu.yaml"), overrides)
    init_distributed(cfg)
    spec = ArchSpec.from_hf_dir(model_dir) if model_dir else ArchSpec.from_scratch(cfg.model.scratch)
    vocab = spec.vocab_size
    batch = _synthetic_batch(cfg, vocab)
    budget = cfg.trainer.micro_batch_tokens
    loss_fn = build_loss_fn("aapo_ce", cfg.algorithm, track_mismatch=True, on_policy=True)
    n = len(batch)
    real = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    print(f"model H={spec.hidden_size} L={spec.num_layers}, {n} samples, {real} real tokens, "
          f"micro_batch_tokens={budget}, torch threads {torch.get_num_threads()}")
    setups = {}
    runs = [(v, d) for v in variants for d in dtypes]
    names = {(v, d): v if len(dtypes) == 1 else f"{v} {d}" for v, d in runs}
    for v, dtype in runs:
        layout, sdpa, fused = VARIANTS[v]
        seed_everything(cfg.trainer.seed)
        model = build_policy(spec, dtype=dtype, sdpa_attention=sdpa)
        if model_dir:
            _load_hf_weights(model, spec, model_dir)
        chunks = wrap_ddp([model], use_distributed_optimizer=False)
        opt = build_optimizer(chunks, cfg.optim, bf16=dtype == "bfloat16", use_distributed_optimizer=False)
        if not fused:
            for group in (g for o in torch_optimizers(opt) for g in o.param_groups):
                group["fused"] = None
        if layout == "padded":
            rows, seq = micro_batch_shape(batch, budget)
            micro = make_micro_batches(batch, range(n), rows, seq)
        else:
            micro = micro_batcher(batch, budget, pack=layout == "packed", pack_factor=cfg.trainer.pack_factor)(range(n))
        computed = sum(m.tokens.numel() for m in micro)
        v = names[(v, dtype)]
        print(f"  {v:<18} {len(micro)} micro-batches of {tuple(micro[0].tokens.shape)}, {computed} tokens computed "
              f"({computed / real:.2f}x the real ones)")
        setups[v] = (chunks, opt, build_scheduler(opt, cfg.optim, 10 * (rounds + 1)), micro)
        run_update(chunks, opt, setups[v][2], micro, loss_fn, cfg.optim.clip_grad)  # warm-up
    variants = [names[r] for r in runs]
    times = {v: [] for v in variants}
    losses = {v: [] for v in variants}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for v in variants:
            chunks, opt, sched, micro = setups[v]
            t0 = time.perf_counter()
            stats = run_update(chunks, opt, sched, micro, loss_fn, cfg.optim.clip_grad)
            times[v].append(time.perf_counter() - t0)
            losses[v].append(stats.loss)
        load.append(os.getloadavg()[0])
    ref = statistics.median(times[variants[0]])
    print(f"\ntrain phase (one update), {rounds} interleaved rounds, load average {min(load):.1f}-{max(load):.1f}")
    print(f"{'variant':<19}{'median s':>10}{'min s':>9}{'vs ' + variants[0]:>24}   loss of rounds 1-3")
    for v in variants:
        med = statistics.median(times[v])
        print(f"{v:<19}{med:>10.3f}{min(times[v]):>9.3f}{med / ref:>24.2f}   "
              + " ".join(f"{x:.6f}" for x in losses[v][:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
