"""vLLM worker extension: in-place weight reload from safetensors files, one bucket per call.

vLLM mixes this class into its worker (`LLM(worker_extension_cls="aapo_megatron.rollout.worker_extension.
WeightSyncExtension")`), so `self` is the vLLM worker inside the engine's spawned process. Tensors do not
survive `collective_rpc` arguments, so each bucket travels as a safetensors file path (in /dev/shm).

A session is begin -> load(path) per bucket -> finish. `begin` puts every layer in vLLM's layerwise-reload
mode, so a layer whose tensors straddle two buckets is processed (CPU weight repacking) once all of its
tensors have arrived; `finish` processes the rest and restores untouched layers.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Methods vLLM adds to its worker; called via `LLM.collective_rpc(name, args=...)`."""

    def aapo_begin_weight_update(self) -> None:
        """Start a reload session: layers go to layerwise-reload mode (weights buffered until complete)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if getattr(self, "_aapo_update_active", False):
            raise RuntimeError("aapo_begin_weight_update: a weight update session is already active")
        model = self.model_runner.get_model()
        self._aapo_aliases = _shared_parameters(model)
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
        self._aapo_update_active = True
        self._aapo_loaded: set[str] = set()

    def aapo_load_weights_file(self, path: str) -> int:
        """Load every tensor of one safetensors file (HF names) into the model; returns the tensor count."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        if not getattr(self, "_aapo_update_active", False):
            raise RuntimeError("aapo_load_weights_file called outside a weight update session")

        count = 0

        def tensors():  # zero-copy views of the (RAM-backed) file; the model copies them into its weights
            nonlocal count
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    count += 1
                    yield name, f.get_tensor(name)

        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(tensors())
        if loaded:
            self._aapo_loaded.update(loaded)
        return count

    def aapo_finish_weight_update(self) -> dict[str, Any]:
        """End the session: process pending layers; returns {'loaded': n, 'not_loaded': [names]}."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not getattr(self, "_aapo_update_active", False):
            raise RuntimeError("aapo_finish_weight_update called without aapo_begin_weight_update")
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            _retie(model, self._aapo_aliases)
        self._aapo_update_active = False
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()
        expected = {n for n, _ in model.named_parameters()}
        loaded = self._aapo_loaded
        return {"loaded": len(loaded), "not_loaded": sorted(expected - loaded - set(self._aapo_aliases))}

    def aapo_weight_checksum(self) -> float:
        """Sum of |w| over all parameters (a cheap fingerprint for tests), float64."""
        import torch

        total = 0.0
        for _, p in self.model_runner.get_model().named_parameters():
            total += float(p.detach().double().abs().sum())
        return total


def _shared_parameters(model: Any) -> dict[str, str]:
    """{alias name: canonical name} for parameters that are one object (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _retie(model: Any, aliases: dict[str, str]) -> None:
    """Point each alias back at its canonical parameter.

    Layerwise reload re-creates parameters per layer, which unties e.g. `lm_head.weight` from
    `model.embed_tokens.weight` (vLLM skips the lm_head tensor of tied checkpoints, so it would keep the old
    weights and log "ParallelLMHead: Failed to load weights"). On CPU the alias's module also holds a
    repacked GEMM weight made at load time (`dispatch_cpu_unquantized_gemm`), so it is re-processed.
    """
    for alias, canonical in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        setattr(owner, attr, model.get_parameter(canonical))
        quant_method = getattr(owner, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(owner)
