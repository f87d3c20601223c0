"""vLLM's weight-sync client protocol over an in-process `vllm.LLM`: what a colocated engine's transport talks to."""

from __future__ import annotations

from typing import Any, Optional


class LLMClient:
    """vLLM's `VLLMWeightSyncClient` protocol over an in-process `vllm.LLM` (a server uses vLLM's HTTP client)."""

    def __init__(self, llm: Any):
        self.llm = llm

    @property
    def num_workers(self) -> int:
        """Workers that receive the weights: TP x PP x DP of the engine."""
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        return int(parallel.world_size) * int(getattr(parallel, "data_parallel_size", 1) or 1)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Every worker joins the transfer group (blocks until the sender joins too)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        """Open the workers' update session."""
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """The workers receive and load one bucket."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        """Close the session (finalizes layerwise reload)."""
        self.llm.finish_weight_update(weight_version)

    def abort_weight_update(self) -> None:
        """End a failed session without loading it (our worker extension; vLLM's protocol has no abort)."""
        self.llm.collective_rpc("aapo_abort_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:
        """The workers leave the transfer group."""
        self.llm.shutdown_weight_transfer_engine()
