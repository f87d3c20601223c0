"""Weight transports, trainer -> vLLM policy engine (`rollout.weight_transport`); see docs/rollout.md."""

from aapo_megatron.rollout.transport.registry import CHOICES, TRANSPORTS, resolve_transport  # noqa: F401
