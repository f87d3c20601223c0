"""What `--model` points at: an HF directory, or a Megatron checkpoint to convert to a temporary HF directory.

    src = resolve_model("runs/quickstart")          # a trainer run dir -> its latest valid checkpoint
    with src.hf_dir() as hf:                          # converts Megatron checkpoints (aapo-convert's code)
        engine = VLLMRolloutEngine(hf, ...)

Accepted: an HF dir (config.json + *.safetensors); a trainer run dir (checkpoints/ inside); a checkpoint
root (step_XXXXXXXX dirs, `latest`); one step dir (MANIFEST.json, model/); a Megatron dist checkpoint
(metadata.json; from aapo-convert or a step's model/). A trainer checkpoint holds no HF config, so the
run's `hf_init/config.json` is used (found by walking up), or `model.hf_config`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from aapo_megatron.eval.benchmarks import EvalInputError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_SAMPLE_BYTES = 1 << 20


@dataclass
class ModelSource:
    """A resolved --model."""

    kind: str
    """'hf' or 'megatron'."""
    path: str
    """The HF dir, or the Megatron dist checkpoint dir (holding metadata.json)."""
    name: str
    """Short label (directory name; for checkpoints '<run>/step_N')."""
    tokenizer_dir: Optional[str]
    """Where the tokenizer is (None: not found; the caller must be given one)."""
    hf_config: Optional[str]
    """config.json for a Megatron checkpoint without its own (None: the checkpoint carries one, or HF)."""
    fingerprint: str
    """Content fingerprint: sha256 over config, file sizes and the first/last MiB of every weight file."""

    @contextlib.contextmanager
    def hf_dir(self, progress: bool = False) -> Iterator[str]:
        """The HF directory to load: the model itself, or a temporary conversion removed on exit."""
        if self.kind == "hf":
            yield self.path
            return
        from aapo_megatron.checkpoint.conversion.mcore_to_hf import convert_mcore_to_hf

        tmp_root = tempfile.mkdtemp(prefix="aapo-eval-hf-")
        try:
            out = os.path.join(tmp_root, "hf")
            convert_mcore_to_hf(self.path, out, hf_config=self.hf_config, progress=progress)
            yield out
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def weights_fingerprint(files: list[str], extra: bytes = b"") -> str:
    """sha256 over `extra` and, per file, its name, size and first and last MiB (cheap even for large models)."""
    h = hashlib.sha256(extra)
    for path in sorted(files):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(_SAMPLE_BYTES))
            if size > _SAMPLE_BYTES:
                fh.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
                h.update(fh.read())
    return h.hexdigest()


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _find_upwards(start: str, rel: str, levels: int = 4) -> Optional[str]:
    """The first `<ancestor>/rel` that exists, from `start` up `levels` directories."""
    d = os.path.abspath(start)
    for _ in range(levels + 1):
        cand = os.path.join(d, rel)
        if os.path.exists(cand):
            return cand
        d = os.path.dirname(d)
    return None


def _latest_step_dir(root: str) -> str:
    from aapo_megatron.checkpoint.manager import CheckpointManager

    info = CheckpointManager(root).latest()
    if info is None:
        raise EvalInputError(f"model {root}: no complete checkpoint in {root} (every step dir is partial or corrupt)")
    return info.path


def _megatron_dir(path: str) -> tuple[str, str]:
    """(dist checkpoint dir, label) for a run dir, checkpoint root, step dir or dist checkpoint."""
    from aapo_megatron.checkpoint.errors import CheckpointError
    from aapo_megatron.checkpoint.manager import verify

    label = os.path.basename(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, "latest")) or glob.glob(os.path.join(path, "step_" + "[0-9]" * 8)):
        path = _latest_step_dir(path)
    if os.path.isfile(os.path.join(path, "MANIFEST.json")):
        try:
            verify(path)
        except CheckpointError as exc:
            raise EvalInputError(f"model {path}: {exc}") from None
        label = f"{label}/{os.path.basename(path)}" if label != os.path.basename(path) else label
        path = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise EvalInputError(f"model {path} is neither an HF model directory (config.json + *.safetensors) nor a "
                             "Megatron checkpoint (trainer run dir, checkpoint dir, or dist checkpoint with metadata.json)")
    return path, label


def resolve_model(path: Optional[str], tokenizer: Optional[str] = None, hf_config: Optional[str] = None) -> ModelSource:
    """Classify --model and find its tokenizer and (for Megatron checkpoints) its HF config; EvalInputError if unusable."""
    if not path:
        raise EvalInputError("no model: pass --model DIR (an HF model directory or a Megatron checkpoint)")
    if not os.path.exists(path):
        raise EvalInputError(f"model {path} does not exist")
    if not os.path.isdir(path):
        raise EvalInputError(f"model {path} is not a directory")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise EvalInputError(f"tokenizer {tokenizer} does not exist")
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        weights = glob.glob(os.path.join(path, "*.safetensors"))
        if not weights:
            raise EvalInputError(f"model {path} has config.json but no *.safetensors weights")
        fp = weights_fingerprint(weights, _read(os.path.join(path, "config.json")))
        tok = tokenizer or (path if _has_tokenizer(path) else None)
        return ModelSource("hf", path, os.path.basename(path), tok, None, fp)

    ckpt, label = _megatron_dir(path)
    if hf_config is not None:
        cfg_file = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
        if not os.path.isfile(cfg_file):
            raise EvalInputError(f"hf_config {hf_config} has no config.json")
    elif os.path.isfile(os.path.join(ckpt, "aapo_checkpoint.json")):
        cfg_file = None  # an aapo-convert output carries its HF config
    else:
        cfg_file = _find_upwards(ckpt, os.path.join("hf_init", "config.json"))
        if cfg_file is None:
            raise EvalInputError(f"model {ckpt}: cannot tell the architecture of this Megatron checkpoint (no "
                                 "aapo_checkpoint.json, no hf_init/config.json above it); set --hf-config")
    tok = tokenizer
    if tok is None:
        for cand in ([os.path.dirname(cfg_file)] if cfg_file else []) + [os.path.join(ckpt, "hf")]:
            if os.path.isdir(cand) and _has_tokenizer(cand):
                tok = cand
                break
    if tok is None:
        tok = _find_upwards(ckpt, "tokenizer")
    files = glob.glob(os.path.join(ckpt, "*.distcp")) + [os.path.join(ckpt, "metadata.json")]
    meta = _read(cfg_file) if cfg_file else _read(os.path.join(ckpt, "aapo_checkpoint.json"))
    return ModelSource("megatron", ckpt, label, tok, cfg_file, weights_fingerprint(files, meta))


def model_config(source: ModelSource) -> dict:
    """The HF config dict of the model (for max_position_embeddings and the like)."""
    if source.kind == "hf":
        path = os.path.join(source.path, "config.json")
    elif source.hf_config:
        path = source.hf_config
    else:
        with open(os.path.join(source.path, "aapo_checkpoint.json")) as fh:
            return json.load(fh)["hf_config"]
    with open(path) as fh:
        return json.load(fh)
