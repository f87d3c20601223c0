"""Static checks and dry runs of the job scripts in slurm/ (no cluster needed).

`AAPO_DRY_RUN=1` makes a script print the srun commands it would run, from Slurm-like variables set by the
test, so the multi-node GPU layouts (which cannot run here) are checked through the real script logic.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess

import pytest

from tests.slurm.cluster import SlurmUnavailable, apt_install, which

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "slurm", "*.sh")))


def test_every_expected_script_exists():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"aapo_70b.sh", "aapo_7b.sh", "aapo_1.5b.sh", "convert_hf.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slurm
def test_shellcheck_clean():
    try:
        apt_install(("shellcheck",), ("shellcheck",))
    except SlurmUnavailable as exc:
        pytest.skip(f"shellcheck unavailable: {exc}")
    rel = [os.path.relpath(p, REPO) for p in SCRIPTS] + [".ci/slurm_setup.sh", "tools/gpu_check.sh"]
    proc = subprocess.run([which("shellcheck"), "-x", "--severity=style", *rel], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dry_run(script: str, slurm_env: dict, *args: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "AAPO_", "MASTER_"))}
    full_env.update({"AAPO_DRY_RUN": "1", "AAPO_HOME": REPO, **slurm_env, **env})
    full_env["PATH"] = "/usr/bin:/bin"  # no scontrol needed: the dry run expands plain host lists itself
    return subprocess.run(["bash", os.path.join(REPO, "slurm", script), *args], env=full_env, cwd="/",
                          capture_output=True, text=True, timeout=120)


def _srun_lines(proc) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[len("DRY-RUN:"):]) for line in proc.stdout.splitlines() if line.startswith("DRY-RUN:")]


def _opt(argv: list[str], name: str):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def _trainer_args(argv: list[str]) -> list[str]:
    return argv[argv.index("aapo-train") + 1:]


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


GPU_6_NODES = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu1,gpu2,gpu3,gpu4,gpu5,gpu6", SLURM_GPUS_ON_NODE="8",
                   SLURM_NTASKS="48", SLURM_CPUS_ON_NODE="96")


def test_70b_layout_four_training_nodes_and_two_rollout_servers():
    lines = _srun_lines(_dry_run("aapo_70b.sh", GPU_6_NODES, "--set", "trainer.steps=3",
                                 AAPO_ROLLOUT_MODEL="/ckpt/hf/Llama-3.1-70B-Instruct"))
    assert len(lines) == 3
    policy, reference, trainer = lines
    for argv, role, host in ((policy, "policy", "gpu5"), (reference, "reference", "gpu6")):
        assert _opt(argv, "nodelist") == host and _opt(argv, "ntasks") == "1"
        assert _opt(argv, "gpus-per-node") == "8" and _opt(argv, "cpus-per-task") == "96"
        # vLLM TP=8 over the node's GPUs; context = max_prompt_tokens 1024 + max_new_tokens 3072.
        assert argv[argv.index("aapo-rollout-server") + 1:] == [
            "--role", role, "--model", "/ckpt/hf/Llama-3.1-70B-Instruct", "--host", "0.0.0.0", "--port", "8000",
            "--tensor-parallel-size", "8", "--dtype", "bfloat16", "--max-model-len", "4096", "--seed", "0",
            "--token-env", "AAPO_ROLLOUT_TOKEN", "--logprobs-mode", "processed_logprobs", "--memory-fraction", "0.85"]
    # TP=8 x PP=4 = 32 ranks, one per GPU, 8 per node on the first four nodes.
    assert _opt(trainer, "nodes") == "4" and _opt(trainer, "ntasks") == "32"
    assert _opt(trainer, "ntasks-per-node") == "8" and _opt(trainer, "nodelist") == "gpu1,gpu2,gpu3,gpu4"
    assert _opt(trainer, "cpus-per-task") == "12"
    args = _trainer_args(trainer)
    assert args[:2] == ["--config", "configs/llama3_70b.yaml"]
    assert "trainer.steps=3" in _sets(args)
    assert args[args.index("--resume") + 1] == "auto"
    assert {"rollout.server_url=http://gpu5:8000", "rollout.reference_server_url=http://gpu6:8000"} <= set(_sets(args))
    # Every task runs under the signal shield (SIGUSR1 to the trainer's handler only, never to its helpers).
    assert trainer[trainer.index("aapo-train") - 2:trainer.index("aapo-train")] == [
        "python3", os.path.join(REPO, "slurm", "signal_shield.py")]


def test_70b_layout_with_both_servers_on_one_rollout_node():
    """AAPO_ROLLOUT_NODES=1: the policy and the reference share the last node, half its GPUs and CPUs each."""
    env = dict(GPU_6_NODES, SLURM_JOB_NODELIST="gpu1,gpu2,gpu3,gpu4,gpu5", SLURM_NTASKS="40")
    lines = _srun_lines(_dry_run("aapo_70b.sh", env, AAPO_ROLLOUT_NODES="1",
                                 AAPO_ROLLOUT_MODEL="/ckpt/hf/Llama-3.1-70B-Instruct"))
    policy, reference, trainer = lines
    for argv, role, port in ((policy, "policy", "8000"), (reference, "reference", "8001")):
        assert _opt(argv, "nodelist") == "gpu5" and _opt(argv, "gpus-per-node") == "4"
        assert _opt(argv, "cpus-per-task") == "48"
        server = argv[argv.index("aapo-rollout-server") + 1:]
        assert server[:8] == ["--role", role, "--model", "/ckpt/hf/Llama-3.1-70B-Instruct", "--host", "0.0.0.0",
                              "--port", port]
        assert server[8:10] == ["--tensor-parallel-size", "4"]
    assert _opt(trainer, "nodes") == "4" and _opt(trainer, "nodelist") == "gpu1,gpu2,gpu3,gpu4"
    assert {"rollout.server_url=http://gpu5:8000", "rollout.reference_server_url=http://gpu5:8001"} <= set(
        _sets(_trainer_args(trainer)))


def test_70b_colocated_and_env_overrides():
    env = dict(GPU_6_NODES, SLURM_JOB_NODELIST="gpu1,gpu2,gpu3,gpu4", SLURM_NTASKS="32")
    proc = _dry_run("aapo_70b.sh", env, AAPO_ROLLOUT_PLACEMENT="colocated", AAPO_RUN_DIR="/scratch/run",
                    AAPO_CKPT_DIR="/ckpt/aapo", AAPO_RESUME="none", AAPO_EXTRA_ARGS="--set trainer.steps=7")
    (trainer,) = _srun_lines(proc)
    assert _opt(trainer, "nodes") == "4" and _opt(trainer, "ntasks") == "32" and _opt(trainer, "nodelist") is None
    args = _trainer_args(trainer)
    assert _sets(args) == ["trainer.run_dir=/scratch/run", "checkpoint.dir=/ckpt/aapo", "rollout.placement=colocated",
                           "trainer.steps=7"]
    assert "--resume" not in args
    assert "run dir /scratch/run, checkpoints /ckpt/aapo, rollout placement colocated" in proc.stderr


def test_7b_and_1p5b_one_node_eight_ranks():
    env = dict(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="gpu1", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS="8",
               SLURM_CPUS_ON_NODE="64")
    for script, config in (("aapo_7b.sh", "configs/qwen2.5_math_7b.yaml"),
                           ("aapo_1.5b.sh", "configs/deepseek_r1_distill_qwen_1.5b.yaml")):
        proc = _dry_run(script, env)
        (trainer,) = _srun_lines(proc)
        assert _opt(trainer, "ntasks") == "8" and _opt(trainer, "ntasks-per-node") == "8", script
        assert _trainer_args(trainer)[:2] == ["--config", config]


def test_container_runtimes():
    env = dict(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="gpu1", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS="8",
               SLURM_CPUS_ON_NODE="64")
    (pyxis,) = _srun_lines(_dry_run("aapo_7b.sh", env, AAPO_CONTAINER="/images/aapo.sqsh"))
    assert _opt(pyxis, "container-image") == "/images/aapo.sqsh"
    assert _opt(pyxis, "container-mounts") == f"{REPO}:{REPO}"
    (appt,) = _srun_lines(_dry_run("aapo_7b.sh", env, AAPO_CONTAINER="/images/aapo.sif",
                                   AAPO_CONTAINER_RUNTIME="apptainer", AAPO_CONTAINER_MOUNTS="/data:/data"))
    i = appt.index("apptainer")
    assert appt[i:i + 8] == ["apptainer", "exec", "--nv", "--pwd", REPO, "--bind", "/data:/data", "/images/aapo.sif"]


def test_layout_errors_are_named():
    env = dict(GPU_6_NODES, SLURM_JOB_NODELIST="gpu1,gpu2,gpu3", SLURM_NTASKS="24")
    proc = _dry_run("aapo_70b.sh", env, AAPO_ROLLOUT_NODES="0")
    assert proc.returncode == 2
    assert "world size 24 (3 nodes x 8 ranks) is not a multiple of TP*PP = 8*4 from configs/llama3_70b.yaml" \
        in proc.stderr
    proc = _dry_run("aapo_70b.sh", GPU_6_NODES)
    assert proc.returncode == 2 and "the in-job rollout servers need the starting model's HF weights: set " \
        "AAPO_ROLLOUT_MODEL" in proc.stderr
    proc = _dry_run("aapo_70b.sh", dict(GPU_6_NODES, SLURM_JOB_NODELIST="gpu1,gpu2"))
    assert proc.returncode == 2 and "AAPO_ROLLOUT_NODES=2 leaves no training node in a 2-node job" in proc.stderr
    proc = _dry_run("aapo_70b.sh", GPU_6_NODES, AAPO_CONFIG="configs/nope.yaml")
    assert proc.returncode == 2 and "config file not found: configs/nope.yaml" in proc.stderr
    proc = _dry_run("aapo_70b.sh", GPU_6_NODES, "--set", "parallel.tensor_model_parallel_size=three")
    assert proc.returncode == 2 and "parallel.tensor_model_parallel_size" in proc.stderr
    proc = _dry_run("aapo_70b.sh", {}, AAPO_DRY_RUN="0")
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


def test_convert_script_arguments():
    env = dict(SLURM_JOB_ID="9", SLURM_JOB_NODELIST="cpu1", SLURM_CPUS_PER_TASK="16")
    (srun,) = _srun_lines(_dry_run("convert_hf.sh", env, "configs", "/ckpt/out", "--dtype", "bfloat16",
                                   AAPO_CONVERT_WORKERS="4"))
    assert _opt(srun, "cpus-per-task") == "16" and _opt(srun, "ntasks") == "1"
    assert srun[srun.index("aapo-convert"):] == [
        "aapo-convert", "hf-to-mcore", "--hf-dir", "configs", "--out", "/ckpt/out", "--no-progress",
        "--workers", "4", "--dtype", "bfloat16"]
    proc = _dry_run("convert_hf.sh", env)
    assert proc.returncode == 2 and "usage: sbatch slurm/convert_hf.sh HF_DIR OUT_DIR" in proc.stderr
    proc = _dry_run("convert_hf.sh", env, "/no/such/hf", "/ckpt/out")
    assert proc.returncode == 2 and "HF checkpoint directory not found: /no/such/hf" in proc.stderr
