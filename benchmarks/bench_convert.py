"""Checkpoint conversion: wall time and peak RSS of `aapo-convert` on a ~1 GB model, against the memory bound.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_convert.py [--workers 1,2,4] [--shard-size 200MB]

A random Llama (H=2048, 8 layers, GQA 16/4, vocab 32000: 492M parameters, 0.98 GB in bf16)
is built with transformers from a config and saved with `max_shard_size`, so it has several
shards. The benchmark polls the VmHWM (kernel peak-RSS high-water mark) of every process in
its tree. Printed per run:

    bound = 2 x largest shard + model size / workers     (the issue's budget for one worker)
    peak  = the largest peak RSS (VmHWM) of any worker process
    base  = the largest RSS a worker of that same run reported once set up (imports, process group,
            empty model), right before it read its first weight (ConversionResult.worker_base_rss)
    live  = the most bytes of converted tensors one worker held at once (ConversionResult.peak_live_bytes)

and the ratios peak / bound and (peak - base) / bound. For mcore-to-hf the "shard" is the
output shard cap. Each conversion runs through the Python API (`convert_hf_to_mcore` /
`convert_mcore_to_hf`, what the CLI calls) in a fresh subprocess, so its result comes back too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
)


def _hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM) of a live process, bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def run_measured(argv: list[str]) -> tuple[float, int, int, int, str]:
    """Run argv; return (seconds, parent peak RSS, largest descendant peak RSS, peak of the tree's summed PSS, stdout).

    Peak RSS per process is the kernel's VmHWM (exact). The tree total uses PSS, sampled every ~0.25 s:
    dist_checkpointing forks writer processes that share the model's pages, which RSS would count twice.
    """
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    tree_peak = 0
    tick = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            hwm = _hwm_bytes(p.pid)
            if hwm:
                peaks[p.pid] = max(peaks.get(p.pid, 0), hwm)
            if tick % 5 == 0:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        tree_peak = max(tree_peak, total)
        tick += 1
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    parent = peaks.pop(proc.pid, 0)
    return seconds, parent, max(peaks.values(), default=0), tree_peak, out


DRIVER = """
import dataclasses, json, sys
if __name__ == "__main__":
    direction, kwargs = sys.argv[1], json.loads(sys.argv[2])
    if direction == "hf-to-mcore":
        from aapo_megatron.checkpoint.conversion.hf_to_mcore import convert_hf_to_mcore as convert
    else:
        from aapo_megatron.checkpoint.conversion.mcore_to_hf import convert_mcore_to_hf as convert
    print(json.dumps(dataclasses.asdict(convert(**kwargs))))
"""


def convert(direction: str, **kwargs) -> tuple[float, int, int, int, dict]:
    """Run one conversion through the Python API in a fresh process; run_measured's numbers + its ConversionResult."""
    argv = [sys.executable, "-W", "ignore", "-c", DRIVER, direction, json.dumps(dict(kwargs, progress=False))]
    s, parent, peak, tree, out = run_measured(argv)
    return s, parent, peak, tree, json.loads(out.strip().splitlines()[-1])


def build_model(path: str, shard_size: str) -> None:
    """Random bf16 Llama of MODEL saved as sharded safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**MODEL)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard_size)
    del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (each divides 8 layers)")
    ap.add_argument("--shard-size", default="200MB", help="max_shard_size of the input (and output) shards")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, deleted at the end)")
    args = ap.parse_args()

    from aapo_megatron.checkpoint.hf import HFCheckpointReader, parse_size

    work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    hf = os.path.join(work, "hf")
    try:
        if not os.path.isfile(os.path.join(hf, "config.json")):
            t0 = time.perf_counter()
            build_model(hf, args.shard_size)
            print(f"built the model in {time.perf_counter() - t0:.1f} s")
        reader = HFCheckpointReader(hf)
        model_bytes, shard_bytes = reader.total_bytes, reader.max_shard_bytes
        print(f"model: {model_bytes / 1e9:.3f} GB bf16 in {len(reader.files)} shards, "
              f"largest {shard_bytes / 1e6:.0f} MB; {os.cpu_count()} CPUs, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
        rows = []
        for w in (int(x) for x in args.workers.split(",")):
            mc, back = os.path.join(work, f"mcore_w{w}"), os.path.join(work, f"hf_w{w}")
            s, parent, peak, tree, res = convert("hf-to-mcore", hf_dir=hf, out_dir=mc, workers=w, force=True)
            rows.append(("hf-to-mcore", w, s, shard_bytes, model_bytes, parent, peak, tree, res))
            out_shard = parse_size(args.shard_size)
            s, parent, peak, tree, res = convert("mcore-to-hf", ckpt_dir=mc, out_dir=back, workers=w,
                                                 max_shard_size=args.shard_size, force=True)
            rows.append(("mcore-to-hf", w, s, out_shard, model_bytes, parent, peak, tree, res))
            # sanity: the round trip is exact
            a, b = HFCheckpointReader(hf), HFCheckpointReader(back)
            for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "lm_head.weight"):
                import torch

                assert torch.equal(a.read(name), b.read(name)), name
            shutil.rmtree(back)
            shutil.rmtree(mc)

        mib = lambda b: f"{b / 2**20:7.0f}"  # noqa: E731
        print(f"{'direction':<12} {'W':>2} {'time s':>7} {'bound MiB':>9} {'peak MiB':>8} {'base':>5} "
              f"{'peak/bound':>10} {'(peak-base)/bound':>17} {'live MiB':>8} {'parent MiB':>10} {'tree PSS MiB':>12}")
        results = []
        for direction, w, s, shard, model, parent, peak, tree, res in rows:
            bound = 2 * shard + model / w
            base, live = res["worker_base_rss"], res["peak_live_bytes"]
            print(f"{direction:<12} {w:>2} {s:7.1f} {mib(bound):>9} {mib(peak):>8} {mib(base)[-5:]:>5} "
                  f"{peak / bound:10.2f} {(peak - base) / bound:17.2f} {mib(live):>8} {mib(parent):>10} "
                  f"{mib(tree):>12}")
            results.append(dict(direction=direction, workers=w, seconds=round(s, 2), bound_bytes=int(bound),
                                peak_worker_rss=peak, worker_baseline_rss=base, peak_live_bytes=live,
                                parent_peak_rss=parent, tree_peak_pss=tree, ratio=round(peak / bound, 3),
                                ratio_minus_baseline=round((peak - base) / bound, 3)))
        print("\n" + json.dumps({"model_bytes": model_bytes, "largest_shard_bytes": shard_bytes, "runs": results}))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
