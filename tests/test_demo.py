"""`make demo`'s driver (tools/demo.py) end to end at tiny scale: real aapo-eval, aapo-train, vLLM-CPU and reward
workers on a tiny random Llama with its own tokenizer, one RL step of configs/demo_smollm2.yaml."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from aapo_megatron.eval.outputs import read_responses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_smollm2.yaml")
# What vLLM printed on every step or at every engine exit before the engines were quieted.
NOISE = ("RotaryEmbedding: Failed to load weights", "sleep mode is not supported", "nanobind: leaked",
         "Loading safetensors checkpoint shards")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """HF dir: a random 2-layer Llama (fp32; head_dim 32, as vLLM-CPU attention needs) with a sentencepiece tokenizer
    trained on the demo's task text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aapo_megatron.validation import load_config
    from aapo_megatron.data.reasoning_gym_source import generate_reasoning_gym
    from aapo_megatron.data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer

    data = load_config(CONFIG, []).data
    rows = generate_reasoning_gym(data.reasoning_gym_task, dict(data.reasoning_gym_args), 200, 0)
    root = tmp_path_factory.mktemp("demo_model")
    tok_dir, out = str(root / "tokenizer"), str(root / "model")
    texts = [r["question"] for r in rows] + [f"{data.system_prompt} \\boxed{{{r['answer']}}}" for r in rows]
    train_sentencepiece_tokenizer(texts, tok_dir, vocab_size=320)
    tok = load_tokenizer(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), out)
    return out


@pytest.mark.slow
def test_demo_driver_end_to_end(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a previous run\n")  # --overwrite replaces a previous run
    sets = [f"model.path={tiny_model}", "model.dtype=float32", f"trainer.run_dir={run_dir}", "trainer.steps=1",
            "data.train_size=32", "data.eval_size=12", "data.prompts_per_step=2", "rollout.num_generations=4",
            "rollout.max_new_tokens=8", "rollout.memory_fraction=0.05", "trainer.micro_batch_tokens=512",
            "optim.lr=1e-3"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--config", CONFIG, "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "VLLM_LOGGING_LEVEL"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    result = json.loads((run_dir / "demo.json").read_text())
    table = (run_dir / "demo_table.txt").read_text()
    assert (run_dir / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["plot"] == str(run_dir / "rewards.png")
    assert table.strip() in proc.stdout
    assert not (run_dir / "config.yaml").read_text().startswith("a previous run")

    held_out = [json.loads(line) for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 12
    scored = {}
    for name in ("before", "after"):
        responses = read_responses(str(run_dir / f"eval_{name}" / "responses.jsonl"))
        scored[name] = {r["index"]: bool(r["correct"]) for r in responses}
        assert len(responses) == len(scored[name]) == 12  # one greedy answer per held-out prompt
        row = result[name]
        assert row["n"] == 12
        assert row["correct"] == sum(scored[name].values())
        assert row["accuracy"] == pytest.approx(row["correct"] / row["n"])
        lo, hi = row["ci95"]
        assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0 and hi - lo > 0.1  # n=12: a wide interval
        assert f"{row['correct']:>6}/{row['n']:<3}{row['accuracy']:>10.3f}   [{lo:.3f}, {hi:.3f}]" in table
    assert set(scored["before"]) == set(scored["after"])  # the same prompts, by row number
    assert result["now_right"] == sum(scored["after"][i] and not scored["before"][i] for i in scored["before"])
    assert result["now_wrong"] == sum(scored["before"][i] and not scored["after"][i] for i in scored["before"])
    # the trained model is not the starting one: one update at lr 1e-3 moves it
    assert result["steps"] == 1 and (run_dir / "checkpoints").is_dir()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and "reward/ref_mean" in metrics[0]
    for text in NOISE:
        assert text not in output, text
