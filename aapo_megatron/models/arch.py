"""Model architecture, independent of Megatron or HF: `ArchSpec`.

An `ArchSpec` is built from an HF `config.json` (Llama incl. llama3 rope scaling,
Qwen2, Qwen3) or from `config.ScratchModelConfig`, and turned back into an HF
config dict with `to_hf_config` (so a scratch model can be exported to HF):

    spec = ArchSpec.from_hf_dir("/ckpt/Qwen2.5-Math-7B")
    spec = ArchSpec.from_scratch(cfg.model.scratch)
    hf = to_hf_config(spec)                        # -> dict for config.json

Supported: the families registered in `models.families` (Llama, Qwen2, Qwen3: dense,
RMSNorm, SwiGLU, RoPE, GQA). Anything else raises `UnsupportedArchitectureError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from aapo_megatron.errors import BadInputError
from aapo_megatron.models.families import FAMILIES, ModelFamily, family_of_hf_architecture, get_family
from aapo_megatron.models.families import supported_hf_architectures as _supported


class UnsupportedArchitectureError(BadInputError, ValueError):
    """The HF config names an architecture (or a feature of one) that this project cannot build."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by this."""
    low_freq_factor: float = 1.0
    """Low-frequency boundary (see the llama3 formula)."""
    high_freq_factor: float = 4.0
    """High-frequency boundary; shorter wavelengths are left unscaled."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was trained with, tokens."""


@dataclass(frozen=True)
class ArchSpec:
    """A dense decoder-only transformer (Llama / Qwen2 / Qwen3 family): everything needed to build it."""

    family: str
    """Architecture family: a name registered in `models.families` (llama, qwen2, qwen3)."""
    vocab_size: int
    """Vocabulary size of the checkpoint (rows of the HF embedding)."""
    hidden_size: int
    """Model width H."""
    num_layers: int
    """Transformer layers L."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (query groups); divides num_attention_heads."""
    head_dim: int
    """Per-head width (Megatron kv_channels); H / heads unless the config says otherwise (Qwen3)."""
    ffn_hidden_size: int
    """SwiGLU inner width (HF intermediate_size)."""
    max_position_embeddings: int = 4096
    """Longest position the model supports, tokens."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Optional[RopeScaling] = None
    """llama3 RoPE scaling, or None."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """The output layer shares the input embedding (no separate lm_head / output_layer)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each query/key head before RoPE (Qwen3)."""
    bos_token_id: Optional[int] = None
    """Begin-of-sequence token id (carried through to the exported config)."""
    eos_token_id: Optional[Any] = None
    """End-of-sequence token id, or a list of ids."""
    pad_token_id: Optional[int] = None
    """Padding token id, if the config has one."""
    torch_dtype: str = "float32"
    """Checkpoint dtype named in the HF config (float32 / bfloat16 / float16)."""
    vocab_pad_multiple: int = 1
    """Megatron pads the vocab to a multiple of vocab_pad_multiple * TP (1: pad only when TP does not divide it)."""
    extra_hf: dict[str, Any] = field(default_factory=dict, compare=False)
    """Other HF config keys kept verbatim for export (e.g. sliding_window, max_window_layers)."""

    # ------------------------------------------------------------------ derived

    @property
    def model_family(self) -> ModelFamily:
        """The registered family (its HF name table and what it refuses)."""
        family = get_family(self.family)
        if family is None:
            raise UnsupportedArchitectureError(f"unsupported family {self.family!r}; supported: {_supported()}")
        return family

    @property
    def hf_architecture(self) -> str:
        """HF class name, e.g. "Qwen2ForCausalLM"."""
        return self.model_family.hf_architecture

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        """Rows of the HF q_proj weight: heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of the HF k_proj / v_proj weight: kv_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """Megatron vocab rows at this TP: vocab_size rounded up to vocab_pad_multiple * tp_size (rows >= vocab_size are padding)."""
        unit = max(1, self.vocab_pad_multiple) * max(1, tp_size)
        return -(-self.vocab_size // unit) * unit

    def validate(self) -> "ArchSpec":
        """Check internal consistency; raise ValueError naming the field. Returns self."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "ffn_hidden_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ArchSpec.{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ArchSpec.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        self.model_family  # noqa: B018 - raises UnsupportedArchitectureError for an unregistered family
        return self

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ArchSpec":
        """ArchSpec from an HF config dict (the content of config.json, or `PretrainedConfig.to_dict()`)."""
        hf = dict(hf)
        archs = hf.get("architectures") or []
        name = archs[0] if archs else None
        if name is not None:
            family = family_of_hf_architecture(name)
            if family is None:
                raise UnsupportedArchitectureError(
                    f"unsupported architecture {name!r}; supported architectures: {_supported()}"
                )
        else:
            model_type = hf.get("model_type")
            family = get_family(model_type) if isinstance(model_type, str) else None
            if family is None:
                raise UnsupportedArchitectureError(
                    f"unsupported architecture (model_type {model_type!r}, no 'architectures' entry); "
                    f"supported architectures: {_supported()}"
                )
        arch_name = family.hf_architecture

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ValueError(f"HF config for {arch_name} is missing required key {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"{arch_name} with hidden_act={act!r} is not supported (only 'silu')")
        for flag in family.refused_hf_flags:
            if hf.get(flag):
                raise UnsupportedArchitectureError(f"{arch_name} with {flag}=true is not supported")

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim") or hidden // heads

        # Rope: transformers >= 5 writes `rope_parameters` (incl. rope_theta); older files `rope_scaling` + `rope_theta`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope.get("factor", 8.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type not in ("default", None):
            raise UnsupportedArchitectureError(
                f"{arch_name} with rope type {rope_type!r} is not supported (supported: default, llama3)"
            )

        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta",
            "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "hidden_act", "mlp_bias",
            "use_sliding_window", "transformers_version", "layer_types",
        }
        extra = {k: v for k, v in hf.items() if k not in known and k in _EXPORTED_EXTRAS}
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            family=family.name,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            ffn_hidden_size=int(need("intermediate_size")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=str(dtype),
            extra_hf=extra,
        ).validate()

    @classmethod
    def from_hf_dir(cls, path: str) -> "ArchSpec":
        """ArchSpec from `<path>/config.json` (or a path to a config.json file)."""
        cfg_path = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no HF config.json at {cfg_path}")
        with open(cfg_path) as fh:
            try:
                hf = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
        return cls.from_hf_config(hf)

    @classmethod
    def from_scratch(cls, scratch: Any) -> "ArchSpec":
        """ArchSpec from `config.ScratchModelConfig` (biases and norms as the family's table has them: Qwen2 qkv bias,
        Qwen3 qk-norm, as in HF)."""
        family = get_family(scratch.architecture)
        if family is None:
            raise UnsupportedArchitectureError(f"unsupported scratch architecture {scratch.architecture!r}; "
                                               f"supported: {', '.join(FAMILIES)}")
        return cls(
            family=family.name,
            vocab_size=scratch.vocab_size,
            hidden_size=scratch.hidden_size,
            num_layers=scratch.num_layers,
            num_attention_heads=scratch.num_attention_heads,
            num_key_value_heads=scratch.num_key_value_heads,
            head_dim=scratch.hidden_size // scratch.num_attention_heads,
            ffn_hidden_size=scratch.ffn_hidden_size,
            max_position_embeddings=scratch.max_position_embeddings,
            rope_theta=float(scratch.rope_theta),
            tie_word_embeddings=scratch.tie_word_embeddings,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
        ).validate()

    def replace(self, **changes: Any) -> "ArchSpec":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes).validate()


# HF keys outside the core set that we carry through to the exported config when present.
_EXPORTED_EXTRAS = ("sliding_window", "max_window_layers", "initializer_range", "use_cache", "attention_dropout")


def to_hf_config(spec: ArchSpec) -> dict[str, Any]:
    """HF config.json dict for `spec` (loads with transformers' AutoConfig and round-trips through from_hf_config)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, **dataclasses.asdict(spec.rope_scaling)}
    out: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.pad_token_id,
        "torch_dtype": spec.torch_dtype,
        "use_cache": True,
    }
    if spec.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)  # transformers 4.x reads this key
    out.update(spec.model_family.hf_export_flags)
    out.update(spec.extra_hf)
    return out
