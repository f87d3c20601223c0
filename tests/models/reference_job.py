"""The frozen reference model's checks, run inside each layout's gloo job (tests/models/layouts.py).

A tiny tied Qwen2 is saved as an HF directory; the reference is built from it in the job's TP/PP layout, and the
policy from the same directory. Returned per rank: the reference's per-sample completion log-probs and HF's
(log_softmax of transformers' logits), the kl/reference metric of two consecutive updates of a policy trained with
kl_beta > 0, and the frozen-model facts (grads, optimizer, weights after training). test_reference.py asserts.
"""

from __future__ import annotations

import tempfile

import torch

from tests.models.tiny_hf import hf_state_dict, tiny_hf_model

KIND = "qwen2_tied"


def _rollouts(vocab_size: int):
    from aapo_megatron.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(5)
    prompts = [[int(t) for t in torch.randint(4, vocab_size, (n,), generator=g)] for n in (3, 5, 2, 4, 6, 3)]
    completions = [[int(t) for t in torch.randint(4, vocab_size, (n,), generator=g)] for n in (4, 2, 5, 3, 1, 6)]
    return RolloutBatch(prompts, completions, torch.randn(6, generator=g))


def _per_sample(micro, values, n: int) -> list[list[float]]:
    """Completion log-probs per sample from per-micro-batch [b, S] tensors (positions in order)."""
    out: list[list[float]] = [[] for _ in range(n)]
    for mb, v in zip(micro, values):
        idx = mb.sample_index if mb.sample_index.dim() == 2 else mb.sample_index[:, None].expand_as(mb.loss_mask)
        for i in range(n):
            out[i] += v[(idx == i) & (mb.loss_mask > 0)].tolist()
    return out


def _hf_logprobs(hf, batch) -> list[list[float]]:
    """log_softmax(HF logits) at each completion token, per sample (one unpadded forward each)."""
    out = []
    with torch.no_grad():
        for p, c in zip(batch.prompt_ids, batch.completion_ids):
            logits = hf(input_ids=torch.tensor([p + c])).logits[0]  # [P + C, V]
            logp = torch.log_softmax(logits.float(), dim=-1)[len(p) - 1: len(p) - 1 + len(c)]  # [C, V]
            out.append(logp.gather(1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def _save_hf_dir(out_dir: str, spec, sd: dict) -> None:
    """Write `sd` as an HF directory the way the trainer writes hf_init (safetensors shards + config.json)."""
    from aapo_megatron.checkpoint.hf_writer import SafetensorsShardWriter, finalize_shards, write_config
    from aapo_megatron.models.arch import to_hf_config

    writer = SafetensorsShardWriter(out_dir, max_shard_bytes=1 << 30)
    for name, tensor in sd.items():
        writer.add(name, tensor)
    finalize_shards(out_dir, writer.close())
    write_config(out_dir, to_hf_config(spec))


def reference_checks() -> dict:
    """Run the reference checks in the current layout (parallel_state initialised); picklable facts."""
    from megatron.core import parallel_state as ps

    from aapo_megatron.checkpoint.hf import HFCheckpointReader
    from aapo_megatron.config import AlgorithmConfig, OptimConfig
    from aapo_megatron.models.arch import ArchSpec
    from aapo_megatron.models.gpt import build_policy
    from aapo_megatron.models.mapping import WeightMapping
    from aapo_megatron.trainer.reference import ReferenceModel
    from aapo_megatron.models.weights import gather_hf_state_dict, load_hf_weights, model_naming
    from aapo_megatron.trainer.losses import build_loss_fn
    from aapo_megatron.trainer.optim import build_optimizer, build_scheduler, torch_optimizers, wrap_ddp
    from aapo_megatron.trainer.train_step import micro_batcher, run_update

    hf = tiny_hf_model(KIND)
    sd = hf_state_dict(hf)
    spec = ArchSpec.from_hf_config(hf.config.to_dict())
    batch = _rollouts(spec.vocab_size)
    micro = micro_batcher(batch, 24, pack=True)(range(len(batch)))
    with tempfile.TemporaryDirectory() as hf_dir:
        _save_hf_dir(hf_dir, spec, sd)
        policy = build_policy(spec, dtype="float32")
        reader = HFCheckpointReader(hf_dir)
        load_hf_weights(policy, WeightMapping(spec, naming=model_naming(policy)), lambda n: reader.load([n])[n])
        reference = ReferenceModel.from_hf_dir(spec, hf_dir, policy_config=policy.config)

    last = ps.is_pipeline_last_stage()
    ref_lp = reference.logprobs(micro)
    out = {"last_stage": last, "micro_batches": len(micro),
           "ref_logp": _per_sample(micro, ref_lp, len(batch)) if last else None,
           "ref_logp_grad": any(t is not None and t.requires_grad for t in ref_lp)}
    if last and ps.get_tensor_model_parallel_rank() == 0:
        out["hf_logp"] = _hf_logprobs(hf, batch)

    # Train the policy with the k3 KL for two updates: kl/reference of update 1 (policy == reference) and 2.
    chunks = wrap_ddp([policy], use_distributed_optimizer=False)
    ocfg = OptimConfig(lr=1e-2, clip_grad=1.0)
    opt = build_optimizer(chunks, ocfg, bf16=False, use_distributed_optimizer=False)
    sched = build_scheduler(opt, ocfg, 10)
    loss_fn = build_loss_fn("aapo_ce", AlgorithmConfig(name="aapo", kl_beta=0.1))
    out["kl"] = []
    for _ in range(2):
        reference.fill_ref_logprobs(micro)
        out["kl"].append(run_update(chunks, opt, sched, micro, loss_fn, ocfg.clip_grad).metrics["kl/reference"])

    ref_params = list(reference.model.parameters())
    optimized = {id(p) for o in torch_optimizers(opt) for g in o.param_groups for p in g["params"]}
    mapping = WeightMapping(spec, naming=model_naming(reference.model))
    back = gather_hf_state_dict(reference.model, mapping)
    out.update(
        requires_grad=any(p.requires_grad for p in ref_params),
        has_grad=any(p.grad is not None for p in ref_params),
        training=reference.model.training,
        in_optimizer=any(id(p) in optimized for p in ref_params),
        wrapped=type(reference.model).__name__,
        unchanged=back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd),
    )
    return out
