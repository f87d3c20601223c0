"""Trainer checkpoints (real Megatron dist checkpoint of a tiny policy + Adam, gloo) on a disk that fills up or
turns read-only: the save fails with the path named, and the previous checkpoint stays intact and `latest`."""

import os
import subprocess

from tests.distributed import run_ranks


def _tiny_job():
    """A 1-rank tiny policy, DDP and Megatron Adam (what TrainingJob._build_optimizer builds on CPU)."""
    from aapo_megatron.config import OptimConfig
    from aapo_megatron.validation import load_config
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.distributed import init_distributed, seed_everything
    from aapo_megatron.trainer.optim import build_optimizer, wrap_ddp

    cfg = load_config(None, ["model.scratch.vocab_size=64", "model.scratch.hidden_size=32",
                             "model.scratch.ffn_hidden_size=64", "model.scratch.num_layers=1"])
    init_distributed(cfg)
    seed_everything(0)
    chunks = wrap_ddp([build_policy(ArchSpec.from_scratch(cfg.model.scratch), dtype="float32")], False)
    return chunks, build_optimizer(chunks, OptimConfig(), bf16=False, use_distributed_optimizer=False)


def _save(mgr, step, chunks, opt):
    from aapo_megatron.trainer.state import MODEL_DIR, save_model_and_optimizer, save_rng, save_trainer_state

    def write(tmp):
        save_model_and_optimizer(os.path.join(tmp, MODEL_DIR), chunks, opt)
        save_rng(tmp)
        save_trainer_state(tmp, {"loop": {"step": step}})

    return mgr.save(step, write)


def _fill(mount, leave_bytes):
    """Fill the file system at `mount` up to `leave_bytes` of free space."""
    st = os.statvfs(mount)
    with open(os.path.join(mount, "filler"), "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))


def _faults_body(rank, world, mount):
    from aapo_megatron.checkpoint.errors import CheckpointSaveError
    from aapo_megatron.checkpoint.manager import CheckpointManager, verify

    chunks, opt = _tiny_job()
    root = os.path.join(mount, "checkpoints")
    mgr = CheckpointManager(root, keep_last=3)
    first = _save(mgr, 1, chunks, opt).path
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(first) for f in fs)
    out = {"first_bytes": size}

    _fill(mount, leave_bytes=size // 4)  # room for part of the next checkpoint only
    try:
        _save(mgr, 2, chunks, opt)
        out["full"] = None
    except CheckpointSaveError as exc:
        out["full"] = str(exc)

    out["after_full"] = (mgr.latest().path, verify(first).step, sorted(os.listdir(root)))
    os.remove(os.path.join(mount, "filler"))

    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    try:
        _save(mgr, 3, chunks, opt)
        out["ro"] = None
    except CheckpointSaveError as exc:
        out["ro"] = str(exc)
    finally:
        out["after_ro"] = (mgr.latest().path, verify(first).step, sorted(os.listdir(root)))
        subprocess.run(["mount", "-o", "remount,rw", mount], check=True)
    out["first"] = first
    return out


def test_disk_full_and_read_only_keep_the_previous_checkpoint(tmp_path):
    mount = str(tmp_path / "small_fs")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount], check=True)
    try:
        out = run_ranks(_faults_body, 1, args=(mount,), env={"OMP_NUM_THREADS": "1"})[0]
    finally:
        subprocess.run(["umount", mount], check=True)
    root = os.path.join(mount, "checkpoints")
    assert out["first_bytes"] > 50_000  # a real model + Adam checkpoint, not an empty directory
    assert out["full"] is not None, "the save on a full disk did not fail"
    assert "saving the checkpoint of step 2 failed at " + os.path.join(root, "step_00000002.tmp") in out["full"]
    assert "No space left on device" in out["full"]
    assert f"the previous checkpoint {out['first']} is kept and stays latest" in out["full"]
    # The partial directory is gone (it held the space), the previous checkpoint verifies and is latest.
    assert out["after_full"] == (out["first"], 1, ["latest", "step_00000001"])
    assert out["ro"] is not None, "the save on a read-only file system did not fail"
    assert f"failed at {os.path.join(root, 'step_00000003.tmp')}: Read-only file system [errno 30]" in out["ro"]
    assert out["after_ro"] == (out["first"], 1, ["latest", "step_00000001"])
