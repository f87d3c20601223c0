"""GGUF file (Llama or Qwen2, any llama.cpp quantization) -> HF safetensors directory, via transformers' GGUF loader.

    convert_gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "/ckpt/smollm2-hf", dtype="bfloat16")

transformers dequantizes the tensors (needs the `gguf` package) and undoes llama.cpp's Q/K
row permutation; the model it returns is tagged with a GGUF quantization config that
`save_pretrained` refuses, so the weights are moved into a fresh model built from the same
config (without that tag) and saved from there, with the tokenizer (and its chat template).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from aapo_megatron.checkpoint.errors import ConversionError
from aapo_megatron.checkpoint.conversion.outdir import atomic_output_dir, check_output_dir
from aapo_megatron.errors import BadInputError
from aapo_megatron.models.families import FAMILIES

# GGUF `general.architecture` values this converter accepts: those the registered families declare.
SUPPORTED_ARCHITECTURES = tuple(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
GGUF_DTYPES = ("float32", "bfloat16")


class GGUFInputError(ConversionError, BadInputError):
    """The GGUF file is missing, unreadable, or of an unsupported architecture (checked before any work)."""


@dataclass
class GGUFConversion:
    """What `convert_gguf_to_hf` wrote."""

    out_dir: str
    architecture: str
    num_tensors: int
    bytes_written: int
    seconds: float


def gguf_architecture(path: str) -> str:
    """The `general.architecture` field of a GGUF file (e.g. "llama"); GGUFInputError if it cannot be read."""
    if not os.path.isfile(path):
        raise GGUFInputError(f"GGUF file {path} does not exist")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise GGUFInputError("reading GGUF files needs the `gguf` package: pip install gguf accelerate") from exc
    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as exc:
        raise GGUFInputError(f"GGUF file {path} has no general.architecture field") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a GGUF file we can read"
        raise GGUFInputError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc


def check_gguf_input(path: str) -> str:
    """The architecture of `path` after refusing a missing file or an architecture outside SUPPORTED_ARCHITECTURES."""
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFInputError(f"GGUF file {path} has architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def convert_gguf_to_hf(gguf_file: str, out: str, dtype: str = "bfloat16", force: bool = False) -> GGUFConversion:
    """Dequantize `gguf_file` into an HF directory `out` (config, safetensors in `dtype`, tokenizer); atomic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in GGUF_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    start = time.perf_counter()
    arch = check_gguf_input(gguf_file)
    check_output_dir(out, force, inputs=(gguf_file,))
    src_dir, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(f"{gguf_file}: weights do not match the {arch} config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    del loaded
    model = model.to(getattr(torch, dtype))
    with atomic_output_dir(out, force, inputs=(gguf_file,)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        written = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    return GGUFConversion(os.path.abspath(out), arch, len(model.state_dict()) - len(tied), written,
                          time.perf_counter() - start)
