"""Cross-host weight sync over gloo vs a raw gloo broadcast of the same bytes, between two simulated hosts.

Two network namespaces joined by a veth pair stand in for two hosts (host A 10.232.0.1, host B 10.232.0.2 in a
/24 this script creates and removes). Host B runs a real `aapo-rollout-server` (policy role, bearer token,
bound to B's address) on a random ~100M-parameter Llama; host A runs the trainer side, `RemoteRolloutEngine`
with `weight_transport="gloo"`, pushing the model's HF-named tensors (in the served dtype) over the network.
In the same run, between the same namespaces, a raw `torch.distributed` gloo broadcast sends the same total
bytes from A to one process on B in buckets of the sync's bucket size (`rollout.weight_sync_bucket_mb`), and,
for reference, once more tensor by tensor (the sync's own broadcast granularity). Each arm runs once to warm
up, then --repeats times, the arms interleaved (their order alternates); each raw round ends with a 1-element
reply from B, so it times delivery, not just the sender's writes. The sync's time is the wall time of
`update_weights` (HTTP session, broadcasts, the server's staging and its reload into vLLM).
Target: median sync / median raw <= 1.5x.

    .venv/bin/python benchmarks/bench_sync_network.py [--repeats 5] [--layers 6] [--hidden 768]

Needs root (ip netns) and iproute2 + util-linux. Exit codes: 0 measured (whether or not the target is met), 1 a
failure while running, 2 bad arguments or a machine that cannot run it, 130 interrupted. Everything it creates
(the namespaces, which take the veth pair with them, the model directory, the processes, ended by pid) is
removed on every exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

SUBNET = "10.232.0"
NETNS = {"a": "aapo-bench-a", "b": "aapo-bench-b"}
ADDR = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}
SERVER_PORT = 8100
RAW_PORT = 29632
TOKEN_ENV = "AAPO_ROLLOUT_TOKEN"
HEADS = 12
TARGET = 1.5
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- host B: raw peer

def run_receiver(master: str, port: int) -> int:
    """Rank 1 of the raw group: per round a header (chunk count, 0 = stop), the chunk sizes, the chunks; replies."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=1, world_size=2)
    buf = torch.empty(0, dtype=torch.uint8)
    try:
        while True:
            head = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(head, src=0)
            if int(head) == 0:
                return 0
            sizes = torch.zeros(int(head), dtype=torch.int64)
            dist.broadcast(sizes, src=0)
            total = int(sizes.sum())
            if buf.numel() < total:
                buf = torch.empty(total, dtype=torch.uint8)
            offset = 0
            for n in sizes.tolist():
                dist.broadcast(buf[offset:offset + n], src=0)
                offset += n
            dist.broadcast(torch.ones(1, dtype=torch.int64), src=1)  # delivered
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- host A: trainer

def wait_health(url: str, timeout_s: float) -> None:
    """Poll `url`/health until it answers 200 (RuntimeError after timeout_s seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the rollout server at {url} did not answer /health within {timeout_s:.0f} s")
        time.sleep(0.5)


def raw_round(dist, flat, sizes: list[int]) -> float:
    """Seconds to broadcast `flat` (uint8) to rank 1 in chunks of `sizes` bytes, until rank 1's reply."""
    import torch

    t0 = time.perf_counter()
    dist.broadcast(torch.tensor([len(sizes)], dtype=torch.int64), src=0)
    dist.broadcast(torch.tensor(sizes, dtype=torch.int64), src=0)
    offset = 0
    for n in sizes:
        dist.broadcast(flat[offset:offset + n], src=0)
        offset += n
    dist.broadcast(torch.zeros(1, dtype=torch.int64), src=1)
    return time.perf_counter() - t0


def run_trainer(args) -> int:
    """Sync and raw arms, interleaved; prints one `RESULT {json}` line."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from aapo_megatron.rollout.client import RemoteRolloutEngine
    from aapo_megatron.rollout.transport.base import hf_named_tensors

    url = f"http://{ADDR['b']}:{SERVER_PORT}"
    wait_health(url, args.server_wait_s)
    client = RemoteRolloutEngine(url, token=os.environ[TOKEN_ENV], weight_sync_bucket_mb=args.bucket_mb,
                                 weight_sync_timeout_s=600.0, weight_transport="gloo")
    client.use_server_info(client.request("GET", "/version"))
    if client.transport != "gloo" or client.dtype is None:
        raise RuntimeError(f"the server offers transport {client.transport!r}, dtype {client.dtype}: expected gloo")
    model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    # The trainer's tensors, already in the served dtype, so both arms move the same bytes (no cast timed).
    named = [(n, t.to(client.dtype).contiguous()) for n, t in hf_named_tensors(model)]
    del model
    tensor_bytes = [t.numel() * t.element_size() for _, t in named]
    total = sum(tensor_bytes)
    bucket = client.bucket_bytes
    bucket_sizes = [min(bucket, total - o) for o in range(0, total, bucket)]
    flat = torch.empty(total, dtype=torch.uint8)
    offset = 0
    for (_, t), n in zip(named, tensor_bytes):
        flat[offset:offset + n] = t.view(-1).view(torch.uint8)
        offset += n

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR['a']}:{RAW_PORT}", rank=0, world_size=2)
    times: dict[str, list[float]] = {"sync": [], "raw": [], "raw_per_tensor": []}
    try:
        def sync() -> float:
            t0 = time.perf_counter()
            client.update_weights(iter(named))
            return time.perf_counter() - t0

        arms = {"sync": sync, "raw": lambda: raw_round(dist, flat, bucket_sizes),
                "raw_per_tensor": lambda: raw_round(dist, flat, tensor_bytes)}
        first_sync_s = sync()  # warm-up: opens the gloo group with the server's workers
        arms["raw"](), arms["raw_per_tensor"]()
        if client.last_sync.num_bytes != total:
            raise RuntimeError(f"the sync moved {client.last_sync.num_bytes} bytes, the raw arm {total}")
        for i in range(args.repeats):
            for name in (list(arms) if i % 2 == 0 else list(reversed(arms))):
                times[name].append(arms[name]())
        stats = client.last_sync
        dist.broadcast(torch.zeros(1, dtype=torch.int64), src=0)  # the receiver stops
    finally:
        client.close()
        dist.destroy_process_group()
    print("RESULT " + json.dumps({"bytes": total, "tensors": len(named), "bucket_bytes": bucket,
                                  "buckets": stats.num_buckets, "dtype": str(client.dtype).replace("torch.", ""),
                                  "first_sync_s": first_sync_s, "times": times,
                                  "stage_seconds": stats.stage_seconds}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- orchestrator

def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGV` (RuntimeError with its stderr when check and it fails)."""
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def make_network(made: list[str]) -> None:
    """Namespaces A and B, a veth pair eth0<->eth0 between them, addresses, default routes (for vLLM's get_ip)."""
    if f" {SUBNET}." in ip("-o", "addr", "show").stdout:
        raise RuntimeError(f"{SUBNET}.0/24 is already in use on this machine: refusing to create the network there")
    existing = ip("netns", "list").stdout.split()
    for name in NETNS.values():
        if name in existing:
            raise RuntimeError(f"network namespace {name} exists (another run, or a leftover: `ip netns del {name}`)")
    for side in ("a", "b"):
        ip("netns", "add", NETNS[side])
        made.append(NETNS[side])
    ip("-n", NETNS["a"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", NETNS["b"])
    for side, peer in (("a", "b"), ("b", "a")):
        ns = NETNS[side]
        ip("-n", ns, "addr", "add", f"{ADDR[side]}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "default", "via", ADDR[peer])


def spawn(side: str, argv: list[str], log_path: str, env: dict) -> subprocess.Popen:
    """Start `argv` in host `side`'s network namespace (nsenter --net: /sys stays as it is), its own session."""
    with open(log_path, "w") as log:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{NETNS[side]}", "--", *argv], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def end(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM `proc`'s process group (its pid), SIGKILL after grace_s; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # any child the leader left behind in its group
    except ProcessLookupError:
        pass


def tail(path: str, n: int = 3000) -> str:
    """The last n characters of a log file."""
    with open(path, errors="replace") as fh:
        return fh.read()[-n:]


def report(res: dict, args, n_params: int, load: str) -> None:
    """Print the table."""
    t = res["times"]
    med = {k: statistics.median(v) for k, v in t.items()}
    gb = res["bytes"] / 1e9
    ratio = med["sync"] / med["raw"]
    print(f"\nmodel: Llama hidden {args.hidden}, {args.layers} layers, vocab 32000: {n_params:,} parameters; "
          f"{res['tensors']} tensors, {res['bytes']:,} bytes ({res['dtype']}); bucket {res['bucket_bytes'] / 2**20:g} "
          f"MiB ({res['buckets']} bucket(s)); {args.repeats} repeats after one warm-up, interleaved; load {load}")
    print("\n| Arm (A -> B over veth, gloo) | median s | min-max s | GB/s |\n|---|---|---|---|")
    rows = (("weight sync (`RemoteRolloutEngine.update_weights`, gloo)", "sync"),
            ("raw gloo broadcast, sync's bucket size", "raw"),
            ("raw gloo broadcast, tensor by tensor (reference)", "raw_per_tensor"))
    for label, k in rows:
        print(f"| {label} | {med[k]:.3f} | {min(t[k]):.3f}-{max(t[k]):.3f} | {gb / med[k]:.2f} |")
    print(f"\nfirst sync (opens the group): {res['first_sync_s']:.3f} s; last sync's stages: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in res["stage_seconds"].items()))
    print(f"sync / raw = {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"sync / raw per tensor = {med['sync'] / med['raw_per_tensor']:.2f}x")


def check_machine() -> str:
    """'' when this machine can run the benchmark, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    missing = [t for t in ("ip", "nsenter") if shutil.which(t) is None]
    return f"{', '.join(missing)} not found (iproute2, util-linux)" if missing else ""


def run(args) -> int:
    """Build the two hosts, run the trainer to completion, print the table; removes everything it made."""
    sys.path.insert(0, HERE)
    from bench_rollout import make_llama

    made: list[str] = []
    procs: list[subprocess.Popen] = []
    workdir = tempfile.mkdtemp(prefix="aapo-bench-net-")
    try:
        model_dir = os.path.join(workdir, "model")
        model = make_llama(model_dir, args.hidden, args.layers, 32000, args.hidden * 4, HEADS, seed=1)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        make_network(made)
        env = dict(os.environ, **{TOKEN_ENV: secrets.token_hex(16)}, GLOO_SOCKET_IFNAME="eth0")
        py = sys.executable
        me = os.path.abspath(__file__)
        server = spawn("b", [py, "-m", "aapo_megatron.rollout.server", "--model", model_dir, "--role", "policy",
                             "--host", ADDR["b"], "--port", str(SERVER_PORT), "--dtype", args.dtype,
                             "--max-model-len", "256", "--kv-cache-mb", "64"],
                       os.path.join(workdir, "server.log"), dict(env, VLLM_HOST_IP=ADDR["b"]))
        procs.append(server)
        receiver = spawn("b", [py, me, "--role", "receiver"], os.path.join(workdir, "receiver.log"), env)
        procs.append(receiver)
        trainer = spawn("a", [py, me, "--role", "trainer", "--model-dir", model_dir, "--repeats", str(args.repeats),
                              "--bucket-mb", str(args.bucket_mb), "--server-wait-s", str(args.server_wait_s)],
                        os.path.join(workdir, "trainer.log"), env)
        procs.append(trainer)
        while trainer.poll() is None:
            for name, proc in (("rollout server", server), ("raw receiver", receiver)):
                if proc.poll() is not None and (proc is server or proc.returncode != 0):
                    raise RuntimeError(f"the {name} exited {proc.returncode}:\n"
                                       f"{tail(os.path.join(workdir, name.split()[-1] + '.log'))}")
            time.sleep(1.0)
        out = tail(os.path.join(workdir, "trainer.log"), 10**6)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if trainer.returncode != 0 or not lines:
            raise RuntimeError(f"the trainer side exited {trainer.returncode}:\n{out[-3000:]}")
        receiver.wait(timeout=60)
        report(json.loads(lines[-1][len("RESULT "):]), args, n_params, os.getloadavg().__repr__())
        return 0
    finally:
        for proc in reversed(procs):
            end(proc)
        for name in reversed(made):
            ip("netns", "del", name, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per arm, after one warm-up")
    p.add_argument("--layers", type=int, default=6, help="Llama layers (6 at hidden 768: ~100M parameters)")
    p.add_argument("--hidden", type=int, default=768, help=f"hidden size, a multiple of {HEADS} (the heads)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the served dtype")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="bucket size, MiB (default: rollout.weight_sync_bucket_mb's default)")
    p.add_argument("--server-wait-s", type=float, default=600.0, help="how long the server may take to start")
    p.add_argument("--role", choices=("main", "trainer", "receiver"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "receiver":
        return run_receiver(ADDR["a"], RAW_PORT)
    if args.bucket_mb is None:
        from aapo_megatron.config.schema import RolloutConfig

        args.bucket_mb = float(RolloutConfig().weight_sync_bucket_mb)
    if args.role == "trainer":
        return run_trainer(args)
    for name, value, low in (("--repeats", args.repeats, 1), ("--layers", args.layers, 1),
                             ("--hidden", args.hidden, HEADS), ("--bucket-mb", args.bucket_mb, 1e-3)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.hidden % HEADS:
        p.error(f"--hidden must be a multiple of {HEADS} (the attention heads), got {args.hidden}")
    why = check_machine()
    if why:
        print(f"bench_sync_network: {why}", file=sys.stderr)
        return 2

    def on_term(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bench_sync_network: interrupted; removed what it created", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench_sync_network: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
