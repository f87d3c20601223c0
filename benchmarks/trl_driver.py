"""TRL side of `bench_vs_trl.py`: TRL's GRPOTrainer on the prompts, weights and settings it is handed.

Runs in the optional TRL environment (`bash benchmarks/setup_trl_env.sh` -> .venv-trl), never in the
product's .venv, and imports nothing from aapo_megatron:

    .venv-trl/bin/python benchmarks/trl_driver.py --model-dir HF_DIR --prompts prompts.jsonl --out result.json \
        --steps 8 --prompts-per-step 32 --num-generations 8 --max-new-tokens 10 --lr 2e-4 --threads 2

`prompts.jsonl` holds the prompts in the order our trainer's sampler draws them, one object per line:
{"prompt": rendered text, "input_ids": our token ids, "rg_task", "rg_args", "rg_entry": JSON strings}. TRL
tokenizes the text itself; the driver checks that this gives our ids exactly before it trains.

Generation is HF `generate` (use_vllm=False: TRL's vLLM path needs a GPU). The reward is the task's own
reasoning-gym `score_answer` on the last <answer>...</answer> of the completion, as in our trainer. The
result JSON has one record per optimizer step: wall seconds between the trainer's step-begin and step-end
callbacks (generation, reward, forward/backward and the optimizer step) and the generated tokens (up to
and including the first EOS, TRL's own completion mask).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    """Command line of the driver."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--prompts", required=True, help="prompts.jsonl written by bench_vs_trl.py")
    ap.add_argument("--out", required=True, help="where to write the per-step result JSON")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps (one generation batch each)")
    ap.add_argument("--prompts-per-step", type=int, required=True, help="prompts per step, B")
    ap.add_argument("--num-generations", type=int, required=True, help="completions per prompt, G")
    ap.add_argument("--max-new-tokens", type=int, required=True, help="longest completion, tokens")
    ap.add_argument("--lr", type=float, required=True, help="learning rate (constant)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--answer-tag", default="answer", help="the answer is read from <tag>...</tag>")
    ap.add_argument("--seed", type=int, default=1234, help="trainer seed")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    return ap.parse_args(argv)


def load_prompts(path: str, needed: int) -> list[dict]:
    """The first `needed` rows of prompts.jsonl; ValueError if the file has fewer."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if len(rows) < needed:
        raise ValueError(f"{path} has {len(rows)} prompts, the run needs {needed} (steps x prompts per step)")
    return rows[:needed]


def check_prompt_ids(tokenizer, rows: list[dict]) -> None:
    """TRL tokenizes prompt text with the tokenizer's defaults; fail unless that reproduces our token ids."""
    ids = tokenizer([r["prompt"] for r in rows])["input_ids"]
    for i, (mine, ours) in enumerate(zip(ids, rows)):
        if list(mine) != list(ours["input_ids"]):
            raise ValueError(f"prompt {i}: TRL's tokenization {list(mine)[:12]}... differs from ours "
                             f"{ours['input_ids'][:12]}...; the two runs would not see the same prompts")


def make_reward(answer_tag: str, token_log: list, reward_times: list):
    """A TRL reward function: reasoning-gym score_answer of the last <answer_tag> content, in [0, 1].

    It also appends the generated tokens of its batch to `token_log` and its own seconds to `reward_times`
    (one call per step here).
    """
    import functools

    import reasoning_gym

    pattern = re.compile(rf"<{re.escape(answer_tag)}>(.*?)</{re.escape(answer_tag)}>", flags=re.DOTALL)

    @functools.lru_cache(maxsize=8)
    def scorer(task: str, args_json: str):
        return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(args_json))

    def reasoning_gym_reward(completions, completion_ids, rg_task, rg_args, rg_entry, **_):
        t0 = time.perf_counter()
        token_log.append(sum(len(ids) for ids in completion_ids))
        rewards = []
        for text, task, args, entry in zip(completions, rg_task, rg_args, rg_entry):
            found = pattern.findall(text)
            answer = found[-1].strip() if found else None
            rewards.append(float(scorer(task, args).score_answer(answer, json.loads(entry))))
        reward_times.append(time.perf_counter() - t0)
        return rewards

    return reasoning_gym_reward


def time_generation(trainer, generate_times: list) -> None:
    """Record the seconds of each call of the trainer's generation method (HF `generate` plus EOS masking)."""
    name = "_generate_single_turn"
    inner = getattr(trainer, name, None)
    if inner is None:
        return

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            generate_times.append(time.perf_counter() - t0)

    setattr(trainer, name, timed)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B, G = args.prompts_per_step, args.num_generations
    rows = load_prompts(args.prompts, args.steps * B)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    check_prompt_ids(tokenizer, rows)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "rg_task": r["rg_task"], "rg_args": r["rg_args"],
                                           "rg_entry": r["rg_entry"]} for r in rows])

    token_log: list[int] = []
    step_times: list[float] = []
    reward_times: list[float] = []
    generate_times: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, from step begin to step end."""

        def on_step_begin(self, _args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
            per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
            max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=args.clip_grad, beta=0.0, loss_type="dapo", max_steps=args.steps,
            shuffle_dataset=False, use_vllm=False, logging_steps=1, report_to="none", save_strategy="no",
            dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=make_reward(args.answer_tag, token_log, reward_times),
                              args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
        time_generation(trainer, generate_times)
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "reward" in h]

    if len(step_times) != args.steps or len(token_log) != args.steps:
        raise RuntimeError(f"expected {args.steps} steps, timed {len(step_times)} and counted tokens for "
                           f"{len(token_log)} generation batches")
    if len(generate_times) != args.steps:
        generate_times = []  # this TRL version generates elsewhere: report no generation phase
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "train_seconds": train_seconds,
        "steps": [{"step": i + 1, "time": t, "tokens": n, "reward": h.get("reward"), "time/reward": reward_times[i]}
                  for i, (t, n, h) in enumerate(zip(step_times, token_log, history + [{}] * len(step_times)))],
    }
    for i, g in enumerate(generate_times):
        rec = result["steps"][i]
        rec["time/rollout"] = rec["time/generate"] = g  # one engine: the generation phase is its rollout
        rec["time/train"] = rec["time"] - g - rec["time/reward"]  # log-probs, loss, backward, optimizer
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
