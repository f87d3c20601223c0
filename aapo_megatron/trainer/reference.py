"""The frozen Megatron reference model: the policy's starting weights in the policy's TP/PP layout, forward only.

    reference = ReferenceModel.from_hf_dir(spec, "<run_dir>/hf_init", policy_config=policy.config)
    reference.fill_ref_logprobs(micro_batches)   # sets MicroBatch.ref_logprobs [b, S] on the last PP stage

It gives the reference log-probs of the k3 KL penalty (`algorithm.kl_beta > 0`) and of the `kl/reference`
metric. The forward is the policy's (the same GPTModel call and fused log-prob op, at the policy's log-prob
temperature, `algorithms.temperature`), run through Megatron's forward-only schedule, so PP
stages pass activations exactly as in training. Parameters have requires_grad=False; there is no DDP wrapper
and no optimizer. On CUDA, `HostOffload` keeps the weights in pinned host memory between uses.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from aapo_megatron.distributed import current_platform
from aapo_megatron.models.arch import ArchSpec


class HostOffload:
    """Keeps a frozen module's parameters in pinned host memory between uses (CUDA only; on CPU a no-op).

    The weights never change, so the host copy is made once: `offload()` only drops the device tensors and
    `load()` copies host -> device (asynchronously, on the current stream). Buffers (RoPE frequencies) stay put.
    """

    def __init__(self, module: torch.nn.Module, enabled: bool = True):
        platform = current_platform()
        self.enabled = bool(enabled) and platform.cuda
        self.params = list(module.parameters())
        self.host: list[torch.Tensor] = []
        self.device: Optional[torch.device] = None
        self.resident = True
        if self.enabled:
            self.device = self.params[0].device if self.params else platform.device
            for p in self.params:
                host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
                host.copy_(p.data)
                self.host.append(host)

    def offload(self) -> None:
        """Free the device copies (the parameters then point at the pinned host copies)."""
        if not self.enabled or not self.resident:
            return
        for p, host in zip(self.params, self.host):
            p.data = host
        self.resident = False

    def load(self) -> None:
        """Bring the parameters back to the device."""
        if not self.enabled or self.resident:
            return
        for p, host in zip(self.params, self.host):
            p.data = host.to(self.device, non_blocking=True)
        self.resident = True

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """Parameters on the device inside the block, offloaded again after it."""
        self.load()
        try:
            yield
        finally:
            self.offload()


class ReferenceModel:
    """This rank's shard of the frozen reference (eval mode, no grads, no optimizer state)."""

    def __init__(self, model: torch.nn.Module, offload: bool = False):
        from aapo_megatron.models.gpt import freeze

        self.model = freeze(model)
        self.offload = HostOffload(self.model, enabled=offload)
        self.offload.offload()

    @classmethod
    def from_hf_dir(cls, spec: ArchSpec, path: str, policy_config=None, dtype="auto",
                    offload: bool = False) -> "ReferenceModel":
        """Build the reference in the current TP/PP layout and load the HF directory `path` into it.

        policy_config: the policy's TransformerConfig; its parameter dtype and sequence parallelism are used
        (what decides the layout and the numbers), else `dtype` and no sequence parallelism.
        """
        from megatron.core import parallel_state as ps

        from aapo_megatron.checkpoint.hf import HFCheckpointReader
        from aapo_megatron.models.gpt import build_reference, transformer_config
        from aapo_megatron.models.mapping import WeightMapping
        from aapo_megatron.models.weights import load_hf_weights, model_naming

        config = None
        if policy_config is not None:
            dtype = policy_config.params_dtype
            config = transformer_config(spec, ps.get_tensor_model_parallel_world_size(),
                                        ps.get_pipeline_model_parallel_world_size(), dtype,
                                        sequence_parallel=policy_config.sequence_parallel)
        model = build_reference(spec, dtype=dtype, config=config)
        reader = HFCheckpointReader(path)
        load_hf_weights(model, WeightMapping(spec, naming=model_naming(model)), lambda name: reader.load([name])[name])
        return cls(model, offload=offload)

    def logprobs(self, micro_batches: list, temperature: float = 1.0) -> list[Optional[torch.Tensor]]:
        """Per micro-batch, the reference log-prob of each target [b, S] (fp32 nats, 0 where loss_mask is 0) under
        softmax(logits / temperature).

        Collective over the model-parallel group (Megatron's forward-only schedule); every rank of it passes the
        same-shaped micro-batches. Stages other than the last get None.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from aapo_megatron.ops.logprob import vocab_parallel_logprob
        from aapo_megatron.trainer.train_step import _device, causal_mask, segment_causal_mask

        if not micro_batches:
            return []
        device = _device()
        rows, seq_len = micro_batches[0].tokens.shape
        mask = causal_mask(seq_len, device)
        tp_group = ps.get_tensor_model_parallel_group()
        out: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            attn = mask if mb.segment_ids is None else segment_causal_mask(mb.segment_ids.to(device))
            output = model(mb.tokens.to(device), mb.position_ids.to(device), attn)  # last stage: [b, S, V/tp]

            def loss_func(logits: torch.Tensor):
                logp, _ = vocab_parallel_logprob(logits, mb.targets.to(device), tp_group=tp_group,
                                                 temperature=temperature)  # [b, S]
                out.append((logp.float() * mb.loss_mask.to(device)).cpu())
                return logits.new_zeros(()), {}

            return output, loss_func

        with torch.no_grad(), self.offload.on_device():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=[self.model],
                num_microbatches=len(micro_batches),
                seq_length=seq_len,
                micro_batch_size=rows,
                forward_only=True,
            )
        if not ps.is_pipeline_last_stage():
            return [None] * len(micro_batches)
        return out

    def fill_ref_logprobs(self, micro_batches: list, temperature: float = 1.0) -> None:
        """Set each micro-batch's `ref_logprobs` [b, S] at `temperature` (last PP stage; the loss runs only there)."""
        for mb, ref in zip(micro_batches, self.logprobs(micro_batches, temperature)):
            mb.ref_logprobs = ref


def needs_reference(cfg) -> bool:
    """Whether the run builds the frozen Megatron reference: algorithm.kl_beta > 0 or algorithm.reference_kl."""
    return cfg.trainer.mode == "rl" and (cfg.algorithm.kl_beta > 0 or cfg.algorithm.reference_kl)


def build_run_reference(cfg, spec: ArchSpec, policy: torch.nn.Module, hf_init: str) -> Optional[ReferenceModel]:
    """The run's reference from `hf_init` (the policy's weights at RL start), or None when the run needs none."""
    if not needs_reference(cfg):
        return None
    return ReferenceModel.from_hf_dir(spec, hf_init, policy_config=policy.config,
                                      offload=cfg.trainer.offload_reference)
