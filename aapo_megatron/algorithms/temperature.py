"""The temperature of the trainer's log-probs (`algorithm.logprob_temperature`) and the matching vLLM logprobs mode.

sampling: log-probs of softmax(logits / rollout.temperature), the distribution the engines sample from, as TRL's
GRPOTrainer (and so the authors' AAPO code) computes them; the rollout engines then return vLLM's
"processed_logprobs" (after temperature, and after top-k / top-p, which renormalise over the kept tokens) so the
mismatch metric compares like with like. raw: the logits as they are (T = 1) and vLLM's "raw_logprobs".
"""

from __future__ import annotations



def logprob_temperature(cfg) -> float:
    """The T the trainer divides the logits by (a Config): rollout.temperature for "sampling", 1.0 for "raw" and SFT."""
    if cfg.trainer.mode == "sft" or cfg.algorithm.logprob_temperature == "raw":
        return 1.0
    from aapo_megatron.config import ConfigError

    t = float(cfg.rollout.temperature)
    if t <= 0:
        raise ConfigError(f"algorithm.logprob_temperature=sampling needs rollout.temperature > 0 (got {t:g}: greedy "
                            f"sampling has no temperature to divide by); set algorithm.logprob_temperature=raw")
    return t


def engine_logprobs_mode(cfg) -> str:
    """vLLM's `logprobs_mode` engine argument matching the trainer's log-probs (a Config)."""
    return "processed_logprobs" if cfg.algorithm.logprob_temperature == "sampling" else "raw_logprobs"
