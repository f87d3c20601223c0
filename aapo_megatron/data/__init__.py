"""Prompt data: jsonl / parquet / reasoning-gym sources, chat templates, tokenisation, a resumable sampler."""

from aapo_megatron.data.dataset import BadRows, Prompt, PromptDataset, get_field
from aapo_megatron.data.readers import DataError, read_rows
from aapo_megatron.data.sampler import ResumableSampler, SamplerStateError
from aapo_megatron.data.templates import SYSTEM_PROMPTS, PromptFormatError, PromptRenderer, build_messages
from aapo_megatron.data.tokenizer import (
    DEMO_CHAT_TEMPLATE,
    corpus_texts,
    load_tokenizer,
    tokenizer_for_config,
    train_sentencepiece_tokenizer,
)

__all__ = [
    "BadRows", "DEMO_CHAT_TEMPLATE", "DataError", "Prompt", "PromptDataset", "PromptFormatError", "PromptRenderer",
    "ResumableSampler", "SYSTEM_PROMPTS", "SamplerStateError", "build_messages", "corpus_texts", "get_field",
    "load_tokenizer", "read_rows", "tokenizer_for_config", "train_sentencepiece_tokenizer",
]
