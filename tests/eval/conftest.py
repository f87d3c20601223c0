"""Fixtures for the eval tests: a tiny HF Llama trained for a few seconds on a copy task, with its tokenizer.

The task: "Copy 4 7" -> "<answer>47</answer>". A short training run gives a model that is right on some
samples and wrong on others at temperature 1, so pass@k over sampled completions is not trivially 0 or 1.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

TEMPLATE = "plain"
STEPS = 60  # about 2 of 4 samples right per item at temperature 1 (80 steps: nearly all right)


def copy_rows(n: int, seed: int, prompt_key: str = "problem", answer_key: str = "answer") -> list[dict]:
    """n copy-task rows {prompt_key: "Copy 4 7", answer_key: "47"} (numbers 10..99, no repeats)."""
    numbers = random.Random(seed).sample(range(10, 100), n)
    return [{prompt_key: f"Copy {x // 10} {x % 10}", answer_key: str(x)} for x in numbers]


def write_jsonl(path: str, rows: list[dict]) -> str:
    """Rows as a jsonl file; returns the path."""
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def write_parquet(path: str, rows: list[dict]) -> str:
    """Rows as a parquet file; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A sentencepiece tokenizer (HF dir) trained on the copy task's text."""
    from aapo_megatron.data.tokenizer import train_sentencepiece_tokenizer

    out = str(tmp_path_factory.mktemp("eval_tok") / "tokenizer")
    rows = copy_rows(90, 0)
    texts = [r["problem"] for r in rows] + [f"<answer>{r['answer']}</answer>" for r in rows] * 3
    train_sentencepiece_tokenizer(texts, out, vocab_size=300)
    return out


@pytest.fixture(scope="session")
def copy_model_dir(tmp_path_factory, tokenizer_dir):
    """HF dir (weights + tokenizer) of a tiny Llama trained briefly on the copy task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aapo_megatron.data.templates import PromptRenderer, build_messages
    from aapo_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    render = PromptRenderer(tok, TEMPLATE)
    seqs = []
    for r in copy_rows(90, 0):
        text, special = render(build_messages(r["problem"], None))
        prompt = tok(text, add_special_tokens=special)["input_ids"]
        target = tok(f"<answer>{r['answer']}</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((prompt, target))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, t) in enumerate(seqs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    try:
        for _ in range(STEPS):
            batch = torch.randint(0, len(seqs), (32,), generator=gen)
            loss = model(input_ids=ids[batch], labels=labels[batch]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path_factory.mktemp("eval_model") / "copy_model")
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out

