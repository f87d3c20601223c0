"""Shared fixtures for the data tests: one small trained sentencepiece tokenizer per session."""

import random

import pytest

from aapo_megatron.data import train_sentencepiece_tokenizer


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Arithmetic questions and answers, enough for a few hundred BPE merges."""
    rng = random.Random(seed)
    words = ["What", "is", "the", "sum", "of", "Compute", "Natalia", "sold", "clips", "to", "her", "friends",
             "How", "many", "did", "she", "sell", "altogether", "answer", "fraction", "simplify", "total"]
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        texts.append(" ".join(rng.choice(words) for _ in range(8)) + f" {a} + {b} = {a + b}?")
        texts.append(f"<think>\n{a} plus {b}\n</think>\n<answer>\n\\boxed{{{a + b}}}\n</answer>")
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "demo_tokenizer"
    train_sentencepiece_tokenizer(corpus(), str(out), vocab_size=384)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from aapo_megatron.data import load_tokenizer

    return load_tokenizer(tokenizer_dir)
