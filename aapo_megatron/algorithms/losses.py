"""Policy losses over token log-probs: aapo_ce and grpo_clip (both with an optional k3 KL), sft_ce.

Every loss is a global token mean (see aggregation.py): a micro-batch returns sum(per_token * mask) * grad_scale / T
with T the step's token count, so summing micro-batches and averaging DP gradients gives the step's exact loss.
Metrics are returned as that micro-batch's share of the step mean (without grad_scale): sum them over micro-batches
and DP ranks to get the step value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from aapo_megatron.algorithms.aggregation import GlobalTokenMean
from aapo_megatron.algorithms.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

if TYPE_CHECKING:
    from aapo_megatron.config import AlgorithmConfig


@dataclass
class PolicyLossInputs:
    """Per-token inputs of one micro-batch; every tensor has the shape of the log-probs (e.g. [b, s])."""

    advantages: torch.Tensor
    """Per-token advantage (the sample's A_i repeated over its tokens)."""
    mask: torch.Tensor
    """Completion mask m: 1 on completion tokens up to and including the first EOS, else 0."""
    old_logp: Optional[torch.Tensor] = None
    """Log-probs of the policy that generated the samples (grpo_clip); None means on-policy (ratio 1)."""
    ref_logp: Optional[torch.Tensor] = None
    """Log-probs of the frozen reference model (kl_beta > 0)."""


@dataclass
class LossOutput:
    """A micro-batch's loss (scalar, differentiable) and its metric shares (detached scalars)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logp: Optional[torch.Tensor] = None
    """Token log-probs (detached) when computed from logits by `policy_loss_from_logits`."""
    entropy: Optional[torch.Tensor] = None
    """Token entropies (detached) when computed from logits by `policy_loss_from_logits`."""


class PolicyLoss:
    """Base class: (logp, inputs, normalizer) -> LossOutput."""

    name: str = ""
    needs_old_logp: bool = False
    needs_ref_logp: bool = False

    def __init__(self, cfg: "AlgorithmConfig"):
        self.cfg = cfg

    def per_token(self, logp: torch.Tensor, inputs: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss (shape of logp) and per-token metric values to average."""
        raise NotImplementedError

    def logp_coefficients(self, inputs: PolicyLossInputs, norm: GlobalTokenMean) -> Optional[torch.Tensor]:
        """d loss / d logp when it does not depend on logp (enables the one-pass fused op), else None."""
        return None

    def __call__(self, logp: torch.Tensor, inputs: PolicyLossInputs, norm: GlobalTokenMean) -> LossOutput:
        """Loss share of this micro-batch: sum(per_token * mask) * grad_scale / num_tokens_in_step."""
        _check_shapes(logp, inputs)
        values, per_token_metrics = self.per_token(logp, inputs)
        metric_norm = GlobalTokenMean(norm.num_tokens_in_step)
        metrics = {k: metric_norm(v.detach().float(), inputs.mask) for k, v in per_token_metrics.items()}
        loss = norm(values, inputs.mask)
        metrics["loss"] = metric_norm(values.detach().float(), inputs.mask)
        return LossOutput(loss=loss, metrics=metrics)


def _check_shapes(logp: torch.Tensor, inputs: PolicyLossInputs) -> None:
    for name in ("advantages", "mask", "old_logp", "ref_logp"):
        t = getattr(inputs, name)
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal the log-prob shape {tuple(logp.shape)}")


KL_METRIC = "kl/reference"
"""Token mean of the k3 KL of the policy to the frozen reference on the sampled tokens."""


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0 (shape of logp)."""
    log_r = ref_logp.to(logp.dtype) - logp
    return torch.exp(log_r) - log_r - 1.0


def _add_kl(cfg: "AlgorithmConfig", name: str, values: torch.Tensor, logp: torch.Tensor, inputs: PolicyLossInputs,
            metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """values + kl_beta * k3 (and the kl/reference metric) when kl_beta > 0."""
    if cfg.kl_beta <= 0:
        return values
    if inputs.ref_logp is None:
        raise ValueError(f"{name} with kl_beta > 0 needs ref_logp (reference-model log-probs)")
    k3 = k3_kl(logp, inputs.ref_logp)
    metrics[KL_METRIC] = k3
    return values + cfg.kl_beta * k3


@POLICY_LOSSES.register("aapo_ce")
class AAPOCrossEntropyLoss(PolicyLoss):
    """Advantage-weighted cross-entropy: -A * log pi(o_t), no ratio, no clipping (REINFORCE with the given advantage);
    + kl_beta * k3 KL to the reference when kl_beta > 0."""

    def __init__(self, cfg: "AlgorithmConfig"):
        super().__init__(cfg)
        self.needs_ref_logp = cfg.kl_beta > 0

    def per_token(self, logp, inputs):
        metrics: dict[str, torch.Tensor] = {}
        values = _add_kl(self.cfg, self.name, -inputs.advantages.to(logp.dtype) * logp, logp, inputs, metrics)
        return values, metrics

    def logp_coefficients(self, inputs, norm):
        if self.cfg.kl_beta > 0:
            return None  # the KL term is not linear in logp
        return -inputs.advantages.float() * norm.coefficient(inputs.mask)


@POLICY_LOSSES.register("sft_ce")
class SFTCrossEntropyLoss(PolicyLoss):
    """Supervised token cross-entropy -log pi(o_t) (the SFT phase: trainer.sft_steps, trainer.mode=sft)."""

    def per_token(self, logp, inputs):
        return -logp, {}

    def logp_coefficients(self, inputs, norm):
        return -norm.coefficient(inputs.mask)


@POLICY_LOSSES.register("grpo_clip")
class GRPOClipLoss(PolicyLoss):
    """PPO-style clipped ratio: -min(rho * A, clip(rho, 1-eps_low, 1+eps_high) * A) + beta * k3 KL to the reference."""

    needs_old_logp = True

    def __init__(self, cfg: "AlgorithmConfig"):
        super().__init__(cfg)
        self.needs_ref_logp = cfg.kl_beta > 0

    def per_token(self, logp, inputs):
        adv = inputs.advantages.to(logp.dtype)
        old = logp.detach() if inputs.old_logp is None else inputs.old_logp.to(logp.dtype)
        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1.0 - self.cfg.clip_eps_low, 1.0 + self.cfg.clip_eps_high)
        values = -torch.minimum(ratio * adv, clipped * adv)
        metrics = {"clip_fraction": ((ratio * adv) > (clipped * adv)).float(), "ratio": ratio}
        return _add_kl(self.cfg, self.name, values, logp, inputs, metrics), metrics


def default_loss_name(cfg: "AlgorithmConfig") -> str:
    """cfg.loss, or the default loss the estimator `cfg.name` declares where it is registered."""
    if cfg.loss is not None:
        return cfg.loss
    return ADVANTAGE_ESTIMATORS.get(cfg.name).default_loss


def build_policy_loss(cfg: "AlgorithmConfig") -> PolicyLoss:
    """The policy loss selected by the config (see `default_loss_name`)."""
    return POLICY_LOSSES.get(default_loss_name(cfg))(cfg)
