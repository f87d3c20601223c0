"""A resume never changes the frozen reference (`hf_init`): a real TrainingJob (gloo, 1 rank) saves a step-1
checkpoint whose policy differs from hf_init; resumes then rebuild a missing hf_init from the initial weights (not
the step-1 policy), refuse a changed one, and refuse a missing one that came from an SFT warm start (exit 2).
The engines are not started: `_start_components` is replaced by a stop right after the reference is settled."""

import os
import shutil

import torch

from tests.distributed import run_ranks
from tests.trainer.test_e2e import CONFIG, TINY


class _Reached(Exception):
    """The run got to starting the engines (everything about the reference is settled by then)."""


def _cfg(run_dir, *extra):
    from aapo_megatron.validation import load_config

    return load_config(CONFIG, TINY + [f"trainer.run_dir={run_dir}", "trainer.sft_steps=0", "trainer.steps=2",
                                       "model.scratch.hidden_size=32", "model.scratch.ffn_hidden_size=64",
                                       "model.scratch.num_layers=1", *extra])


def _resume(cfg):
    """Run a resumed job up to the engine start; return (its state, the ConfigError text or None)."""
    from aapo_megatron.config import ConfigError
    from aapo_megatron.trainer.loop import TrainingJob

    job = TrainingJob(cfg)

    def stop(hf_init):
        raise _Reached(hf_init)

    job._start_components = stop
    try:
        job.run()
    except _Reached:
        return job.state, None
    except ConfigError as exc:
        return job.state, str(exc)
    finally:
        job.close()
    raise AssertionError("run() neither started the engines nor refused")


def _body(rank, world, run_dir):
    from safetensors.torch import load_file, save_file

    from aapo_megatron.data.sampler import ResumableSampler
    from aapo_megatron.trainer import reference_identity
    from aapo_megatron.trainer.batch import RolloutBatch
    from aapo_megatron.trainer.loop import TrainingJob

    hf_init = os.path.join(run_dir, "hf_init")
    job = TrainingJob(_cfg(run_dir))
    job.tokenizer = job._tokenizer()
    job._build_models()
    job._build_optimizer(total_updates=2)
    job.export_hf(hf_init)
    reference_identity.settle(job, hf_init, None, False)
    out = {"stored": job.state.reference_sha256, "init": load_file(os.path.join(hf_init, "model.safetensors"))}
    results = job._updates(RolloutBatch([[5, 6, 7], [9, 4]], [[8, 9], [3]], torch.ones(2)), 1, "sft_ce")
    assert results[0].update.applied  # one real Adam step: the step-1 policy differs from the reference
    job.state.step = 1
    job.sampler, job.reference_cache = ResumableSampler(8, seed=0), None
    job.save_checkpoint()
    job.close()

    resume = _cfg(run_dir, "checkpoint.resume=auto")
    shutil.rmtree(hf_init)  # e.g. a node-local run_dir after a requeue onto another node
    state, out["rebuilt_error"] = _resume(resume)
    out["rebuilt_step"], out["rebuilt_sha"] = state.step, state.reference_sha256
    out["rebuilt"] = load_file(os.path.join(hf_init, "model.safetensors"))

    changed = dict(out["rebuilt"])
    name = sorted(changed)[0]
    changed[name] = changed[name] + 1e-3
    save_file(changed, os.path.join(hf_init, "model.safetensors"), metadata={"format": "pt"})
    out["changed_sha"] = reference_identity.reference_sha256(hf_init)
    _, out["changed_error"] = _resume(resume)

    shutil.rmtree(hf_init)
    _, out["sft_error"] = _resume(_cfg(run_dir, "checkpoint.resume=auto", "trainer.sft_steps=1"))
    out["sft_left_hf_init"] = os.path.isdir(hf_init)
    return out


def test_resume_keeps_the_frozen_reference(tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_ranks(_body, 1, args=(run_dir,), env={"OMP_NUM_THREADS": "1"})[0]
    hf_init = os.path.join(run_dir, "hf_init")
    assert out["stored"] and len(out["stored"]) == 64
    # Missing hf_init, no SFT: rebuilt from the initial weights, bit for bit, and its hash checked.
    assert out["rebuilt_error"] is None and out["rebuilt_step"] == 1
    assert out["rebuilt"].keys() == out["init"].keys()
    for k in out["init"]:
        assert torch.equal(out["rebuilt"][k], out["init"][k]), f"hf_init.{k} is not the initial weight"
    assert out["rebuilt_sha"] == out["stored"]
    # A changed hf_init is refused, both hashes and the paths named.
    assert out["changed_error"] is not None
    for part in ("the frozen reference changed", hf_init, out["changed_sha"], out["stored"], "step 1"):
        assert part in out["changed_error"], part
    # Missing hf_init after an SFT warm start: not reproducible, refused with what to do; nothing exported.
    assert out["sft_error"] is not None and "is missing and cannot be rebuilt" in out["sft_error"]
    assert "Copy hf_init from the original run directory" in out["sft_error"] and out["stored"] in out["sft_error"]
    assert not out["sft_left_hf_init"]
