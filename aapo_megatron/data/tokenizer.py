"""Tokenizers: load an HF tokenizer, or train a small sentencepiece BPE one for demo models.

`train_sentencepiece_tokenizer` writes an HF tokenizer directory (tokenizer.json, tokenizer_config.json
with a chat template, and the sentencepiece tokenizer.model) that `AutoTokenizer.from_pretrained` and
vLLM load, so an HF model directory can carry it. Token ids are the sentencepiece ids: 0 <unk>, 1 <s>,
2 </s>, 3 <pad>, then the reasoning tags as single tokens, 256 byte-fallback pieces and the merges.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any, Iterable, Optional, Sequence

from aapo_megatron.config import DataConfig
from aapo_megatron.data.readers import DataError, read_rows

DEMO_SYMBOLS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>", "\\boxed")
"""Strings kept as single tokens in trained tokenizers."""

DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Chat template given to trained tokenizers: system text, "User: ...", then "Assistant:"."""

_MIN_VOCAB = 4 + len(DEMO_SYMBOLS) + 256 + 16


def load_tokenizer(path: str) -> Any:
    """An HF tokenizer from a directory (tokenizer.json / tokenizer.model) or from a sentencepiece .model file."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if os.path.isfile(path) and path.endswith(".model"):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(path, "rb") as fh:
            proto.ParseFromString(fh.read())
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
            return LlamaTokenizer.from_pretrained(tmp, add_prefix_space=proto.normalizer_spec.add_dummy_prefix)
    if not os.path.isdir(path):
        raise DataError(f"tokenizer not found: {path} (expected an HF directory or a sentencepiece .model file)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a tokenizer from {path}: {exc}") from None


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int = 512,
    symbols: Sequence[str] = DEMO_SYMBOLS,
    chat_template: Optional[str] = DEMO_CHAT_TEMPLATE,
) -> Any:
    """Train a byte-fallback BPE sentencepiece model on `texts` and write it as an HF tokenizer dir; returns it.

    The vocabulary has at most `vocab_size` entries (fewer when the corpus is too small for that many
    merges). `out_dir` is written atomically and must not exist yet.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    if vocab_size < _MIN_VOCAB:
        raise DataError(f"tokenizer vocab_size={vocab_size} is too small: byte fallback and special tokens need "
                        f"at least {_MIN_VOCAB}")
    if os.path.exists(out_dir):
        raise DataError(f"tokenizer output directory already exists: {out_dir}")
    corpus = [t for t in texts if t and t.strip()]
    if not corpus:
        raise DataError("cannot train a tokenizer on an empty corpus")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True, hard_vocab_limit=False,
            # Keep text as is (newlines matter to the format reward) and add no dummy "▁" prefix, so that
            # the HF conversion below encodes exactly like sentencepiece.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(symbols),
            num_threads=1, minloglevel=2, max_sentence_length=1 << 16,
        )
    except RuntimeError as exc:
        raise DataError(f"sentencepiece training failed: {exc}") from None

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as fh:
            fh.write(model.getvalue())
        tok = LlamaTokenizer.from_pretrained(tmp, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                             pad_token="<pad>", add_prefix_space=False)
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_tokenizer(out_dir)


def corpus_texts(cfg: DataConfig) -> list[str]:
    """Raw question and answer strings of the training source (no tokenizer needed), for tokenizer training."""
    from aapo_megatron.data.dataset import get_field
    from aapo_megatron.data.templates import resolve_system_prompt

    texts: list[str] = []
    system = resolve_system_prompt(cfg.system_prompt)
    if system:
        texts.append(system)
    if cfg.source == "reasoning_gym":
        from aapo_megatron.data.reasoning_gym_source import generate_reasoning_gym

        rows = generate_reasoning_gym(cfg.reasoning_gym_task, dict(cfg.reasoning_gym_args), cfg.train_size, cfg.seed)
        pairs = [(r["question"], r["answer"]) for r in rows]
    else:
        if cfg.train_path is None:
            raise DataError(f"data.train_path is not set (data.source={cfg.source!r})")
        pairs = []
        for _, row in read_rows(cfg.train_path, cfg.source):
            if isinstance(row, dict):
                pairs.append((get_field(row, cfg.prompt_key), get_field(row, cfg.answer_key)))
    for prompt, answer in pairs:
        if isinstance(prompt, str):
            texts.append(prompt)
        elif isinstance(prompt, list):
            texts.extend(m["content"] for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str))
        if isinstance(answer, (str, int, float)):
            texts.append(str(answer))
    return texts


def tokenizer_for_config(cfg: Any, out_dir: str) -> Any:
    """The run's tokenizer: model.tokenizer, else one trained into `out_dir` (data.train_tokenizer), else model.path.

    A tokenizer already in `out_dir` is reused (resume) instead of retrained.
    """
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    if cfg.data.train_tokenizer:
        vocab = cfg.model.scratch.vocab_size
        if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
            tok = load_tokenizer(out_dir)
        else:
            tok = train_sentencepiece_tokenizer(corpus_texts(cfg.data), out_dir, vocab_size=vocab)
        if len(tok) > vocab:
            raise DataError(f"tokenizer in {out_dir} has {len(tok)} tokens, more than model.scratch.vocab_size={vocab}")
        return tok
    if cfg.model.path:
        return load_tokenizer(cfg.model.path)
    raise DataError("no tokenizer: set model.tokenizer or model.path, or data.train_tokenizer=true for a scratch model")
