"""Fixtures of the real-model tests: SmolLM2-135M-Instruct in HF transformers (fp32) and the spawned Megatron jobs.

Everything expensive is loaded or run once for this folder (package scope): one HF model, one TP=1 job (which
also hosts the only vLLM engine) and one TP=3 job. The model directory comes from `smollm2_dir` (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tests.distributed import run_ranks
from tests.real_model.jobs import engine_job, logits_job

MAX_NEW_TOKENS = 24
FEW_SHOT = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4, so the answer is \\boxed{4}."},
            {"role": "user", "content": "What is 7 + 5?"}]
ROWS = [
    {"problem": FEW_SHOT, "answer": "12"},  # the model answers "... \\boxed{12}."
    {"problem": "What is the capital of France?", "answer": "Paris"},
    {"problem": "Write a short poem about the sea.", "answer": "none"},  # runs to the length limit
    {"problem": FEW_SHOT, "answer": "13"},  # same completion as row 1, wrong gold answer
]
"""Benchmark rows (eval's `problem` / `answer` layout): a chat-message prompt with an earlier assistant turn, and text."""


def messages_of(problem) -> list[dict[str, str]]:
    """The chat messages of a row's prompt, built here independently of aapo_megatron.data."""
    return [{"role": "user", "content": problem}] if isinstance(problem, str) else [dict(m) for m in problem]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on `n` intra-op threads inside the block (two threads on a loaded 2-core box are ~6x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="package")
def hf_tokenizer(smollm2_dir):
    """transformers' own tokenizer of the model (the reference the project's prompt path is compared with)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="package")
def hf_model(smollm2_dir):
    """The model in HF transformers, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="package")
def bench_file(tmp_path_factory) -> str:
    """ROWS as a jsonl benchmark file."""
    path = tmp_path_factory.mktemp("smollm2_bench") / "smollm2_parity.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


@pytest.fixture(scope="package")
def logits_batch(hf_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [3, S] and padding mask [3, S]: the three distinct prompts of ROWS, chat-templated, right-padded."""
    seqs = [hf_tokenizer.apply_chat_template(messages_of(r["problem"]), add_generation_prompt=True)["input_ids"]
            for r in ROWS[:3]]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), hf_tokenizer.pad_token_id, dtype=torch.long)
    pad = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        pad[i, :len(s)] = 1
    return ids, pad


@pytest.fixture(scope="package")
def hf_logits(hf_model, logits_batch) -> torch.Tensor:
    """HF logits at the real tokens of logits_batch, [N, V] fp32."""
    ids, pad = logits_batch
    with torch.no_grad(), torch_threads(1):
        return hf_model(input_ids=ids, attention_mask=pad).logits[pad.bool()]


@pytest.fixture(scope="package")
def engine_run(smollm2_dir, logits_batch, bench_file) -> dict:
    """The TP=1 job's results (see tests/real_model/jobs.py engine_job)."""
    ids, pad = logits_batch
    return run_ranks(engine_job, 1, args=(smollm2_dir, ids, pad, bench_file, MAX_NEW_TOKENS),
                     env={"OMP_NUM_THREADS": "1"}, timeout_s=600)[0]


@pytest.fixture(scope="package")
def tp3_run(smollm2_dir, logits_batch) -> dict:
    """The TP=3 job's rank-0 results: {"tp", "logits"}."""
    ids, pad = logits_batch
    return run_ranks(logits_job, 3, args=(smollm2_dir, ids, pad), env={"OMP_NUM_THREADS": "1"}, timeout_s=600)[0]


@pytest.fixture(scope="package")
def hf_greedy_of(hf_model):
    """prompt ids -> HF greedy completion ids (MAX_NEW_TOKENS at most), generated once per distinct prompt."""
    cache: dict[tuple, list[int]] = {}

    def get(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in cache:
            cache[tuple(prompt)] = hf_greedy(hf_model, list(prompt), MAX_NEW_TOKENS)
        return cache[tuple(prompt)]

    return get


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate, greedy, fp32: the completion ids (the EOS <|im_end|> kept, as vLLM keeps its stop token)."""
    with torch.no_grad(), torch_threads(1):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
