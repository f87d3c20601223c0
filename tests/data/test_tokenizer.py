"""Trained sentencepiece tokenizer: HF parity with sentencepiece, loading, an HF model dir carrying it."""

import os

import pytest
import sentencepiece as spm
import torch

from aapo_megatron.data import DEMO_CHAT_TEMPLATE, DataError, load_tokenizer, train_sentencepiece_tokenizer

from .conftest import corpus

TEXTS = [
    "What is 12 + 345?",
    "<think>\n12 plus 345\n</think>\n<answer>\n\\boxed{357}\n</answer>",
    "Ünïcödé falls back to bytes: 漢字 ∑ 🙂",
    "  leading spaces and\ttabs\nnew lines  ",
    "",
]


def test_hf_tokenizer_matches_sentencepiece(tokenizer_dir, tokenizer):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    assert len(tokenizer) == sp.get_piece_size() <= 384
    for text in TEXTS + corpus(20, seed=9):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert sp.decode(sp.encode(TEXTS[2])) == TEXTS[2]  # byte fallback: nothing is <unk>


def test_special_tokens_and_reasoning_tags(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    for i, tag in enumerate(["<think>", "</think>", "<answer>", "</answer>", "\\boxed"]):
        assert tokenizer.convert_tokens_to_ids(tag) == 4 + i
    assert tokenizer.chat_template == DEMO_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == "<s>Be brief.\nUser: 1+1?\nAssistant:"


def test_training_is_deterministic_and_atomic(tmp_path, tokenizer_dir):
    out = tmp_path / "again"
    train_sentencepiece_tokenizer(corpus(), str(out), vocab_size=384)
    for name in ("tokenizer.json", "tokenizer.model"):
        assert (out / name).read_bytes() == open(os.path.join(tokenizer_dir, name), "rb").read()
    with pytest.raises(DataError, match="tokenizer output directory already exists: .*again"):
        train_sentencepiece_tokenizer(corpus(), str(out), vocab_size=384)
    with pytest.raises(DataError, match="vocab_size=100 is too small: byte fallback and special tokens need at least 281"):
        train_sentencepiece_tokenizer(corpus(), str(tmp_path / "small"), vocab_size=100)
    with pytest.raises(DataError, match="cannot train a tokenizer on an empty corpus"):
        train_sentencepiece_tokenizer(["", "  "], str(tmp_path / "empty"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # failures leave nothing behind


def test_load_tokenizer_from_model_file_and_errors(tmp_path, tokenizer_dir, tokenizer):
    from_model = load_tokenizer(os.path.join(tokenizer_dir, "tokenizer.model"))
    assert from_model.encode(TEXTS[1], add_special_tokens=False) == tokenizer.encode(TEXTS[1], add_special_tokens=False)
    with pytest.raises(DataError, match="tokenizer not found: .*nope"):
        load_tokenizer(str(tmp_path / "nope"))


def test_an_hf_model_dir_carries_the_tokenizer(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0, : ids.shape[1]], skip_special_tokens=True) == "User: What is 2 + 2?\nAssistant:"


def test_tokenizer_for_config_trains_once_then_reuses(tmp_path):
    from aapo_megatron.validation import load_config
    from aapo_megatron.data import tokenizer_for_config

    cfg = load_config(None, ["data.source=reasoning_gym", "data.reasoning_gym_task=chain_sum", "data.train_size=300",
                             "data.train_tokenizer=true", "model.scratch.vocab_size=320"])
    out = tmp_path / "run" / "tokenizer"
    tok = tokenizer_for_config(cfg, str(out))
    assert 281 < len(tok) <= 320 and (out / "tokenizer.json").is_file()
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = tokenizer_for_config(cfg, str(out))  # resume: the same tokenizer, not retrained
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp and again.get_vocab() == tok.get_vocab()
    q = "State the final answer to the following arithmetic problem: 12 + 7 ="
    assert tok.decode(tok.encode(q, add_special_tokens=False)) == q
    cfg.model.scratch.vocab_size = 290
    with pytest.raises(DataError, match=f"tokenizer in .*tokenizer has {len(tok)} tokens, more than "
                                        "model.scratch.vocab_size=290"):
        tokenizer_for_config(cfg, str(out))
    cfg.data.train_tokenizer = False
    with pytest.raises(DataError, match="no tokenizer: set model.tokenizer or model.path, or data.train_tokenizer=true"):
        tokenizer_for_config(cfg, str(out))
    cfg.model.tokenizer = str(out)
    assert tokenizer_for_config(cfg, "unused").get_vocab() == tok.get_vocab()
