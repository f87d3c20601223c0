"""vLLM worker extension: in-place weight reload from safetensors files, one bucket per call.

vLLM mixes this class into its worker (`LLM(worker_extension_cls="aapo_megatron.rollout.worker_extension.
WeightSyncExtension")`), so `self` is the vLLM worker inside the engine's spawned process. Tensors do not
survive `collective_rpc` arguments, so each bucket travels as a safetensors file path (in /dev/shm).

A session is begin -> load per bucket -> finish. A bucket is either a safetensors file
(`aapo_load_weights_file`, used by the rollout server) or a region of a reusable shared-memory slot file
(`aapo_load_weights_shm`, used by an in-process engine: no tmpfs page allocation and no parsing per sync).

Layers whose live tensors are still in checkpoint format (embeddings, the LM head, norms) are loaded in place
by their own weight loaders, with no staging copy. Only layers whose weights vLLM re-formatted at load time
(on CPU: linear layers, whose weights were repacked for oneDNN and freed) go through vLLM's layerwise reload:
their tensors are buffered until the layer is complete, then the layer is materialized, loaded and repacked.
`finish` processes the rest and repacks the LM head's GEMM once.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


class ReloadSession:
    """One in-place reload of a live vLLM model's weights: begin, load per bucket, finish.

    Shared by the worker extension (shm buckets) and the gloo weight-transfer engine; callers hold
    `set_current_vllm_config`. Works on CPU, where linear weights were repacked and freed at load time.
    """

    def __init__(self) -> None:
        self.active = False
        self.aliases: dict[str, str] = {}
        self.inplace: list[Any] = []
        self.loaded: set[str] = set()

    def begin(self, model: Any) -> None:
        """Layers go to layerwise-reload mode (weights buffered until complete); in-place layers stay live."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            get_layerwise_info,
            initialize_layerwise_reload,
        )

        if self.active:
            raise RuntimeError("begin weight update: a weight update session is already active")
        self.aliases = _shared_parameters(model)
        self.inplace = [m for m in model.modules() if _loads_in_place(m)]
        # vLLM's initialize loop skips layers whose info reads "already initialized" (load_numel_total set);
        # resetting that right after leaves the in-place layers untouched: live tensors, original loaders.
        for layer in self.inplace:
            get_layerwise_info(layer).load_numel_total = 0
        initialize_layerwise_reload(model)
        for layer in self.inplace:
            get_layerwise_info(layer).reset()
        self.active = True
        self.loaded = set()

    def load(self, model: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (one bucket) into the model."""
        if not self.active:
            raise RuntimeError("weights loaded outside a weight update session")
        loaded = model.load_weights(tensors)
        if loaded:
            self.loaded.update(loaded)

    def finish(self, model: Any, model_config: Any) -> dict[str, Any]:
        """Process pending layers, re-tie, repack CPU GEMMs; returns {'loaded': n, 'not_loaded': [names]}."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not self.active:
            raise RuntimeError("finish weight update called without a begin")
        finalize_layerwise_reload(model, model_config)
        reformat = _retie(model, self.aliases)
        for layer in self.inplace:  # in-place layers: rebuild kernel-side copies (CPU GEMM packs)
            if hasattr(layer, "cpu_linear"):
                reformat[id(layer)] = layer
        for layer in reformat.values():
            _refresh_cpu_gemm(layer)
        self.active = False
        expected = {n for n, _ in model.named_parameters()}
        return {"loaded": len(self.loaded), "not_loaded": sorted(expected - self.loaded - set(self.aliases))}


class WeightSyncExtension:
    """Methods vLLM adds to its worker; called via `LLM.collective_rpc(name, args=...)`."""

    def _aapo_session(self) -> ReloadSession:
        session = self.__dict__.get("_aapo_reload")
        if session is None:
            session = self.__dict__["_aapo_reload"] = ReloadSession()
        return session

    def aapo_begin_weight_update(self) -> None:
        """Start a reload session: layers go to layerwise-reload mode (weights buffered until complete)."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self._aapo_session().begin(self.model_runner.get_model())

    def aapo_load_weights_file(self, path: str) -> int:
        """Load every tensor of one safetensors file (HF names) into the model; returns the tensor count."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        session = self._aapo_session()
        if not session.active:
            raise RuntimeError("aapo_load_weights_file called outside a weight update session")
        count = 0

        def tensors():  # zero-copy views of the (RAM-backed) file; the model copies them into its weights
            nonlocal count
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    count += 1
                    yield name, f.get_tensor(name)

        with set_current_vllm_config(self.vllm_config):
            session.load(self.model_runner.get_model(), tensors())
        return count

    def aapo_load_weights_shm(self, path: str, slot: int, entries: list) -> int:
        """Load one bucket from a shared-memory slot file: entries are [name, dtype, shape, byte offset]."""
        from vllm.config import set_current_vllm_config

        session = self._aapo_session()
        if not session.active:
            raise RuntimeError("aapo_load_weights_shm called outside a weight update session")
        buf = _slot_buffer(self, path, int(slot))  # [capacity] uint8, shared with the trainer

        def tensors():  # zero-copy views into the slot; loaders copy them into the weights
            for name, dtype, shape, offset in entries:
                dt = getattr(torch, dtype)
                numel = 1
                for d in shape:
                    numel *= int(d)
                nbytes = numel * dt.itemsize
                yield name, buf[offset:offset + nbytes].view(dt).view(list(shape))

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            session.load(model, tensors())
        # The trainer overwrites this slot two buckets later: layers still waiting for tensors from a later
        # bucket must own copies of what they buffered from this one.
        _own_buffered_tensors(model, buf)
        return len(entries)

    def aapo_finish_weight_update(self) -> dict[str, Any]:
        """End the session: process pending layers; returns {'loaded': n, 'not_loaded': [names]}."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            result = self._aapo_session().finish(self.model_runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()
        return result

    def aapo_abort_weight_update(self) -> None:
        """End a weight-transfer-engine update without loading it (its staging is dropped); vLLM's worker stays
        "in an update" after a finish that raised, and this lets the next start_weight_update begin."""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is not None:
            discard = getattr(engine, "discard", None)
            if callable(discard):
                discard()
            engine.reset_weight_update_target()
        self._weight_update_active = False

    def aapo_weight_checksum(self) -> float:
        """Sum of |w| over all parameters (a cheap fingerprint for tests), float64."""
        total = 0.0
        for _, p in self.model_runner.get_model().named_parameters():
            total += float(p.detach().double().abs().sum())
        return total

    def aapo_weights_digest(self) -> dict[str, str]:
        """{parameter name: sha256 of its bytes} over the served model (tests compare transports bitwise)."""
        import hashlib

        out = {}
        for name, p in self.model_runner.get_model().named_parameters():
            t = p.detach().contiguous().cpu()
            out[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
        return out


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


def _retie(model: Any, aliases: dict[str, str]) -> dict[int, Any]:
    """Point each alias back at its canonical parameter; returns the re-pointed owner modules by id.

    Layerwise reload re-creates parameters per layer, which would untie e.g. `lm_head.weight` from
    `model.embed_tokens.weight` (vLLM skips the lm_head tensor of tied checkpoints, so it would keep the old
    weights and log "ParallelLMHead: Failed to load weights"). Owners whose parameter changed must have their
    kernel-side copies rebuilt (`_refresh_cpu_gemm`).
    """
    changed: dict[int, Any] = {}
    for alias, canonical in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        param = model.get_parameter(canonical)
        if getattr(owner, attr) is not param:
            setattr(owner, attr, param)
            changed[id(owner)] = owner
    return changed


def _loads_in_place(layer: Any) -> bool:
    """True when every parameter of `layer` is live in checkpoint format, so its loaders can copy in place.

    Those are layers without a weight-processing method (norms) or with vLLM's unquantized embedding method
    (embeddings, LM head: on CPU the latter also keeps a packed GEMM copy, rebuilt by `_refresh_cpu_gemm`).
    Layers vLLM re-formats at load time (CPU linear layers free their weights after packing) return False.
    """
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    params = {n: p for n, p in layer._parameters.items() if p is not None}
    if not params or is_deferred_attention_layer(layer):
        return False
    quant_method = getattr(layer, "quant_method", None)
    if quant_method is not None and type(quant_method) is not UnquantizedEmbeddingMethod:
        return False
    meta_params, _ = get_layerwise_info(layer).restore_metadata
    if set(meta_params) != set(params):
        return False
    return all(p.shape == meta_params[n].shape and p.dtype == meta_params[n].dtype and not p.is_meta
               for n, p in params.items())


def _refresh_cpu_gemm(layer: Any) -> None:
    """Rebuild a layer's CPU GEMM weight pack from its live weight (only the LM head runs a GEMM).

    vLLM-CPU packs every `VocabParallelEmbedding`, but only `ParallelLMHead` multiplies with it; the input
    embedding's pack is dropped for a plain `F.linear` on the live weight (correct, never stale, no memory).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    if not hasattr(layer, "cpu_linear"):
        return
    if isinstance(layer, VocabParallelEmbedding) and not isinstance(layer, ParallelLMHead):
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
        return
    quant_method = getattr(layer, "quant_method", None)
    if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
        quant_method.process_weights_after_loading(layer)


def _slot_buffer(worker: Any, path: str, slot: int) -> torch.Tensor:
    """[capacity] uint8 view of a trainer slot file, mapped once and kept until the trainer replaces it."""
    import mmap

    maps = worker.__dict__.setdefault("_aapo_slot_maps", {})
    cached = maps.get(slot)
    if cached is not None and cached[0] == path:
        return cached[2]
    if cached is not None:  # never mmap.close(): tensors viewing it keep the mapping alive until they die
        maps.pop(slot)
        del cached
    with open(path, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    maps[slot] = (path, mm, buf)
    return buf


def _own_buffered_tensors(model: Any, buf: torch.Tensor) -> None:
    """Replace tensors that layerwise-pending layers buffered from `buf` by private copies."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    start = buf.data_ptr()
    end = start + buf.numel()
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
                        and start <= value.data_ptr() < end):
                    bound.arguments[key] = value.clone()
