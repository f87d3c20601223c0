"""Converted checkpoints load into Megatron at TP=2, TP=1 and PP=2 (real gloo ranks, real dist_checkpointing).

For every tiny model (Llama with llama3 rope, Qwen2 tied and untied, Qwen3, and a Qwen2 with an
odd vocabulary that Megatron pads to 98 rows at TP=2, so the two checkpoints differ in rows): the conversion
workers (PP=2 stages) write the checkpoint; it loads at TP=2 with HF's logits; the TP=2
model is saved again (as training would) and that checkpoint loads at TP=1 and at PP=2
with the same logits; finally the TP=2-saved checkpoint is exported to HF and compared
bitwise with the original safetensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_ranks


def _forward(model, ids, pad, vocab_size):
    """Last-stage logits [B, S, V] without Megatron's vocab padding (None on other stages)."""
    from aapo_megatron.models.gpt import attention_mask_and_position_ids
    from tests.models.tiny_hf import gather_vocab, pipeline_forward

    mask, pos = attention_mask_and_position_ids(pad)
    with torch.no_grad():
        out = pipeline_forward(model, ids, pos, mask)
    logits = out[0] if isinstance(out, tuple) else out
    return None if logits is None else gather_vocab(logits, vocab_size)


def _load(spec, ckpt, tp, pp):
    from aapo_megatron.checkpoint.mcore import load_mcore_checkpoint
    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.models.gpt import build_reference
    from aapo_megatron.distributed import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, backend="gloo"))
    model = build_reference(spec, dtype="float32")
    load_mcore_checkpoint(model, ckpt)
    return model


def _layouts_body(rank: int, world: int, cases: dict, root: str) -> dict:
    import torch.distributed as dist

    from aapo_megatron.checkpoint.hf_writer import finalize_shards, write_config
    from aapo_megatron.checkpoint.mcore import save_mcore_checkpoint
    from aapo_megatron.checkpoint.conversion.hf_to_mcore import _hf_to_mcore_worker
    from aapo_megatron.checkpoint.conversion.mcore_to_hf import _mcore_to_hf_worker
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.distributed import teardown_distributed

    results = {}
    for kind, (hf_dir, ids, pad) in cases.items():
        mc, mc_tp2, hf_out = (os.path.join(root, kind, d) for d in ("mcore", "mcore_tp2", "hf"))
        spec = ArchSpec.from_hf_dir(hf_dir)
        # 1. the converter itself, as stage `rank` of a TP=1 PP=2 job
        _hf_to_mcore_worker(rank, world, hf_dir, mc, "float32", False)
        # 2. load at TP=2, compare with HF; save again at TP=2
        model = _load(spec, mc, tp=2, pp=1)
        r = {"tp2": _forward(model, ids, pad, spec.vocab_size)}
        save_mcore_checkpoint(model, mc_tp2)
        # 3. the TP=2 checkpoint at TP=1 (2 data-parallel replicas) and at PP=2
        r["tp1"] = _forward(_load(spec, mc_tp2, tp=1, pp=1), ids, pad, spec.vocab_size)
        r["pp2"] = _forward(_load(spec, mc_tp2, tp=1, pp=2), ids, pad, spec.vocab_size)
        # 4. export the TP=2 checkpoint back to HF with the converter's stage workers
        import json

        config = json.load(open(os.path.join(hf_dir, "config.json")))
        parts = _mcore_to_hf_worker(rank, world, mc_tp2, hf_out, config, "float32", 30_000, False)["parts"]
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
        if rank == 0:
            finalize_shards(hf_out, [p for rank_parts in gathered for p in rank_parts])
            write_config(hf_out, config)
        dist.barrier()
        if rank == 0:
            from aapo_megatron.checkpoint.mcore import checkpoint_tensors

            r["rows"] = (checkpoint_tensors(mc)["embedding.word_embeddings.weight"][0][0],
                         checkpoint_tensors(mc_tp2)["embedding.word_embeddings.weight"][0][0])
        results[kind] = r
    teardown_distributed()
    return results


@pytest.mark.slow
def test_checkpoint_loads_at_tp2_tp1_pp2_and_round_trips(tiny_hf_dirs, tmp_path):
    from aapo_megatron.checkpoint.hf import HFCheckpointReader

    cases = {}
    for kind, (hf_dir, _, ids, pad, _) in tiny_hf_dirs.items():
        for d in ("mcore", "mcore_tp2", "hf"):
            os.makedirs(tmp_path / kind / d)
        cases[kind] = (hf_dir, ids, pad)
    per_rank = run_ranks(_layouts_body, 2, (cases, str(tmp_path)), env={"OMP_NUM_THREADS": "1"}, timeout_s=600)
    for kind, (hf_dir, sd, ids, pad, hf_logits) in tiny_hf_dirs.items():
        valid = pad.bool()
        r0, r1 = per_rank[0][kind], per_rank[1][kind]
        ref = hf_logits[valid]
        assert ref.abs().max() > 0.1
        vocab = sd["model.embed_tokens.weight"].shape[0]
        assert r0["rows"] == (vocab, vocab + vocab % 2)  # the TP=2 save pads an odd vocabulary
        # TP=2 from the converted checkpoint: both TP ranks hold the gathered logits
        for r in (r0, r1):
            diff = (r["tp2"][valid] - ref).abs().max().item()
            assert diff < 1e-4, f"{kind}: TP=2 logits differ from HF by {diff:.2e}"
        # the TP=2-saved checkpoint at TP=1 (both replicas) and PP=2 (last stage = rank 1)
        assert r0["pp2"] is None and r1["pp2"] is not None
        assert torch.equal(r0["tp1"], r1["tp1"])
        assert torch.equal(r1["pp2"], r0["tp1"]), f"{kind}: PP=2 and TP=1 logits differ"
        diff = (r0["tp1"][valid] - r0["tp2"][valid]).abs().max().item()
        assert diff < 1e-5, f"{kind}: TP=1 vs TP=2 logits differ by {diff:.2e}"
        # HF -> Megatron (PP=2) -> Megatron (TP=2) -> HF is bitwise identical
        back = HFCheckpointReader(str(tmp_path / kind / "hf"))
        assert sorted(back.names()) == sorted(sd)
        got = back.load(back.names())
        for name, tensor in sd.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{kind}: {name} differs"
