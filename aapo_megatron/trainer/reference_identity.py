"""The frozen reference's identity: a sha256 of `<run_dir>/hf_init`, kept in every checkpoint and checked on resume.

`hf_init` (the policy at the start of RL: `model.path` or the scratch init, after the SFT warm start if any) is
what the reference engine serves and what a restarted policy engine starts from. A resume must never change it:

- fresh start: export hf_init, store its hash in the trainer state;
- resume with hf_init present: its hash must equal the stored one, else exit 2 naming both;
- resume with hf_init missing (a node-local run_dir after a requeue onto another node): without an SFT warm
  start it is rebuilt from the initial weights before the checkpoint is loaded, and must hash to the stored
  value; after an SFT warm start it cannot be rebuilt (SFT is not reproduced), so the resume is refused.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from typing import Optional

import torch.distributed as dist

from aapo_megatron.config import ConfigError
from aapo_megatron.trainer.rank_zero import broadcast_object

log = logging.getLogger(__name__)


def reference_sha256(hf_dir: str) -> str:
    """Hex sha256 over every tensor in an HF directory's safetensors: name, dtype, shape and bytes, by name."""
    import torch
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConfigError(f"{hf_dir} holds no *.safetensors files")
    handles = [safe_open(f, framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    digest = hashlib.sha256()
    for name in sorted(where):
        tensor = where[name].get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rebuildable(cfg) -> bool:
    """Whether hf_init can be re-made from the config alone (no SFT warm start precedes RL)."""
    return cfg.trainer.sft_steps == 0


def rebuild_if_missing(job, hf_init: str) -> bool:
    """Collective, before a resume loads its checkpoint: export the still-initial policy to a missing hf_init
    when that is reproducible. True if it was exported."""
    missing = broadcast_object(not os.path.isdir(hf_init) if job.is_rank0 else None, dist.group.WORLD)
    if not missing or not rebuildable(job.cfg) or job.cfg.trainer.mode == "sft":
        return False
    log.info("%s is missing: rebuilding the frozen reference from the initial weights (%s)", hf_init,
             job.cfg.model.path or "scratch init, trainer.seed")
    job.export_hf(hf_init)
    return True


def settle(job, hf_init: str, resumed_step: Optional[int], rebuilt: bool) -> None:
    """Collective, after hf_init exists or should: record its hash (fresh start) or check it against the
    checkpoint's (resume); a mismatch or an unrebuildable hf_init is a ConfigError (exit 2) on every rank."""
    error = None
    if job.is_rank0:
        try:
            _settle_rank0(job, hf_init, resumed_step, rebuilt)
        except ConfigError as exc:
            error = str(exc)
    error = broadcast_object(error, dist.group.WORLD)
    if error is not None:
        raise ConfigError(error)


def _settle_rank0(job, hf_init: str, resumed_step: Optional[int], rebuilt: bool) -> None:
    stored = job.state.reference_sha256
    ckpt = f"the checkpoint of step {resumed_step} in {job.ckpt_dir}"
    if resumed_step is not None and not os.path.isdir(hf_init):
        raise ConfigError(
            f"{hf_init} (the frozen reference, sha256 {stored or 'not recorded'}) is missing and cannot be rebuilt: "
            f"it is the policy after the SFT warm start (trainer.sft_steps={job.cfg.trainer.sft_steps}), which is "
            f"not reproduced on resume. Copy hf_init from the original run directory into {job.run_dir}, or start "
            f"a new run (a new trainer.run_dir)")
    actual = reference_sha256(hf_init)
    if resumed_step is None or stored is None:
        if resumed_step is not None:
            log.warning("%s records no reference hash (an older checkpoint): trusting %s (sha256 %s)", ckpt, hf_init,
                        actual)
        job.state.reference_sha256 = actual
        return
    if actual != stored:
        how = "rebuilt from the initial weights" if rebuilt else "found"
        raise ConfigError(
            f"the frozen reference changed: {hf_init} ({how}) has sha256 {actual}, but {ckpt} was trained against "
            f"sha256 {stored}. Resuming would compare the policy with a different reference; restore the original "
            f"hf_init (or model.path / trainer.seed / model.dtype the run started with)")
    log.info("frozen reference %s verified (sha256 %s)", hf_init, actual)
